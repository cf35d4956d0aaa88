"""External checkpoint layouts: HF Llama directories (safetensors) in and out, GGUF Llama files in, and the
assembly of a model from either. Nothing here unpickles: weights come from safetensors or GGUF (dequantized
with `gguf`).

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
"""

from __future__ import annotations

import importlib.resources
import json
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from anllm_jax import gguf_file, masks, records
from anllm_jax.config import ModelConfig, RopeScaling
from anllm_jax.model import Llama
from anllm_jax.tokenizer import Tokenizer

HF_WEIGHTS = "model.safetensors"


HF_INDEX = "model.safetensors.index.json"
HF_MODELING = "modeling_anllm.py"  # the transformers model an AnSAN export carries (anllm_jax/hf_template/)


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


def build(cfg: ModelConfig, arrays: dict[str, Any]) -> Llama:
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
    return build(cfg, arrays)


def _special_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _dedicated_pad(pad: int | None, bos: int | None, eos: int | None) -> int | None:
    # The model masks every token equal to pad_id, so only a pad id that no real text uses is kept.
    return None if pad is None or pad in (bos, eos) else pad


def _hf_config(directory: str, overrides: dict[str, Any]) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    c = records.read_json(path)
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


def load_hf(directory: str, overrides: dict[str, Any]) -> tuple[Llama, Tokenizer | None]:
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


def _ansan(cfg: ModelConfig) -> bool:
    """Whether the model runs under the AnSAN mask (ep or ac, no other policy): what modeling_anllm.py computes."""
    return (
        cfg.anchor_mode != "full" and bool(cfg.anchor_ids) and masks.parse_policy(cfg.policy or "ansan").name == "ansan"
    )


def export_hf(
    model: Llama,
    tokenizer: Tokenizer | None,
    directory: str,
    overwrite: bool = False,
    *,
    anchor_code: bool = True,
    writer: str = "anllm_jax.formats.export_hf",
    inputs: Sequence[str] = (),
) -> None:
    """Write `directory` so that `transformers.LlamaForCausalLM.from_pretrained(directory)` loads the model.

    Weights go into one `model.safetensors` in the model's parameter dtype; the tokenizer files (if any) beside.
    An AnSAN model (ep or ac) also gets `modeling_anllm.py` and an `auto_map` (unless `anchor_code` is False), so
    that `AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)` runs it under the AnSAN mask
    with the anchor cache. A model with non-finite parameters is refused, and so is a `directory` that holds files
    `writer` did not write (unless `overwrite`; records.check_output_dir).
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
    code = anchor_code and _ansan(cfg)
    if code:
        hf_cfg["auto_map"] = {"AutoModelForCausalLM": f"{HF_MODELING[:-3]}.AnLLMForCausalLM"}

    def write(tmp: str) -> None:
        save_file(tensors, os.path.join(tmp, HF_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        if tokenizer is not None:
            tokenizer.hf_tokenizer_files(tmp)
        if code:
            template = importlib.resources.files("anllm_jax") / "hf_template" / HF_MODELING
            with open(os.path.join(tmp, HF_MODELING), "w") as f:
                f.write(template.read_text())

    if not records.all_finite(p):
        raise FloatingPointError(f"the model has non-finite parameters; not exporting it to {directory}")
    records.replace_dir(directory, write, writer, overwrite, inputs)


def load_gguf(path: str, overrides: dict[str, Any]) -> tuple[Llama, Tokenizer]:
    try:
        meta, tensors = gguf_file.read(path)
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
        return gguf_file.dequantized(data, tensors[name])

    def fix(p: str, w: np.ndarray) -> np.ndarray:
        if p == "wq":
            return _unpermute_rope_rows(w, cfg.n_heads)
        if p == "wk":
            return _unpermute_rope_rows(w, cfg.n_kv_heads)
        return w

    names = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
    model = _assemble(cfg, get, lambda p, i: f"blk.{i}.{_LAYER_NAMES[p][1]}", names, path, fix)
    return model, tokenizer
