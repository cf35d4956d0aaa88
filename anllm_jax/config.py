"""Model configuration and named presets."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any

import yaml

ANCHOR_MODES = ("full", "ep", "ac")
ATTENTION_IMPLS = ("xla", "cudnn", "cudnn_causal", "anchor", "anchor_pallas")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {', '.join(choices)}")


def _suggest(name: str, names: Any) -> str:
    close = difflib.get_close_matches(name, list(names), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Frozen and hashable so it can be a static jit argument."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    remat: str = "none"
    attention: str = "xla"
    # Anchor mode of the model: "full" (plain causal), "ep" (existing tokens such as "." are anchors) or
    # "ac" (the added <AC> token). anchor_ids are the token ids that count as anchors in ep/ac.
    anchor_mode: str = "full"
    anchor_ids: tuple[int, ...] = ()
    # Attention policy the model trains and runs under, as a `masks.parse_policy` spec such as
    # "streaming:sinks=4,window=252" or "ansan-bounded:anchors=16" ("" = the anchor mode's own mask: causal for
    # "full", AnSAN for ep/ac). Set it in training with model.overrides.policy; docs/policies.md lists the policies.
    policy: str = ""
    pad_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None

    def __post_init__(self) -> None:
        _check_choice("anchor_mode", self.anchor_mode, ANCHOR_MODES)
        _check_choice("attention", self.attention, ATTENTION_IMPLS)
        _check_choice("remat", self.remat, REMAT_POLICIES)
        if self.attention == "cudnn_causal" and self.anchor_mode != "full":
            raise ValueError(
                f"attention=cudnn_causal is plain causal attention and cannot apply anchor_mode={self.anchor_mode}; "
                "use attention=cudnn, anchor or anchor_pallas for AnSAN"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs whole groups"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "anchor_ids", tuple(int(i) for i in self.anchor_ids))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["anchor_ids"] = list(self.anchor_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ValueError(f"unknown model config key {key!r}{_suggest(key, names)}")
        return cls(**d)

    def num_params(self) -> int:
        d, f, h = self.d_model, self.ffn_dim, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.n_layers * per_layer + d + head


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        rope_theta=100000.0,
        tie_embeddings=True,
        max_seq_len=8192,
        bos_id=1,
        eos_id=2,
    ),
    "llama3.2-1b": ModelConfig(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        ffn_dim=8192,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        tie_embeddings=True,
        max_seq_len=131072,
        bos_id=128000,
        eos_id=128001,
    ),
    "llama2-7b": ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        ffn_dim=11008,
        rope_theta=10000.0,
        max_seq_len=4096,
        bos_id=1,
        eos_id=2,
    ),
    # Small sizes for tests and CPU smoke runs.
    "tiny": ModelConfig(
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        max_seq_len=512,
        dtype="float32",
    ),
    "small": ModelConfig(
        vocab_size=8192,
        d_model=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        head_dim=32,
        ffn_dim=704,
        max_seq_len=2048,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the named preset, with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}{_suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Training job configuration: a tree of dataclasses, read from YAML plus `key=value` dotted overrides, validated
# (unknown keys and wrong types fail at once, naming the closest valid keys).


@dataclasses.dataclass
class ModelSection:
    """Which model to train. A fresh init uses `preset`; `load_parameters_path` (top level) brings real weights."""

    preset: str = "tiny"
    # ModelConfig fields replaced on top of the preset or the loaded model's config (dtype, remat, attention, ...).
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Tokenizer for a fresh init (a native checkpoint dir or a GGUF/HF model); loaded models bring their own.
    tokenizer_path: str | None = None
    # The anchor variant trained is data.anchor_mode: "ac" adds the <AC> token after every sentence, "ep" uses
    # `ep_strings` as anchors, "full" trains with the plain causal mask.
    anchor_init: str = "dot"  # new <AC> embedding rows: "dot" copies the "." rows, "mean" the mean row
    ep_strings: tuple[str, ...] = (".",)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to cut it into rows.

    path: a prepared corpus (the `--output` folder of `prepare`, or the dataset folder inside it).
    split: "train" or "validation".
    anchor_mode: "ac" inserts `<AC>` after every sentence; "ep" and "full" keep the raw text.
    seq_len: tokens per row.
    packing: False = one document per row, right-truncated and padded (the AnLLM recipe);
        True = documents concatenated and cut into full rows, each piece its own segment.
    shuffle / shuffle_seed: seeded document shuffle, a different permutation every epoch.
    num_epochs: None repeats forever.
    add_bos: start each document with the tokenizer's BOS (if it has one). Turn off for tokenizers whose "BOS"
        is a chat marker (the SmolLM2 GGUF names <|im_start|>).
    read_threads: threads that tokenize ahead of the consumer.
    split_by: how the processes of a multi-process job share the stream. "rows": every process reads the whole
        stream and keeps its block of each global batch, so batches (and a resumed iterator) are the same for any
        process count; "documents": each process reads every N-th document, which scales to many hosts but makes
        the batches depend on the process count.
    """

    path: str = "data/corpus"
    split: str = "train"
    anchor_mode: str = "ac"
    seq_len: int = 4096
    packing: bool = False
    shuffle: bool = True
    shuffle_seed: int = 0
    num_epochs: int | None = None
    add_bos: bool = True
    read_threads: int = 4
    split_by: str = "rows"

    def __post_init__(self) -> None:
        if self.anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"anchor_mode={self.anchor_mode!r} is not one of {', '.join(ANCHOR_MODES)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be at least 2 (a token and its next-token target)")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs={self.num_epochs} must be a positive number of epochs or None (forever)")
        if not 0 <= self.shuffle_seed < 2**32:
            raise ValueError(f"shuffle_seed={self.shuffle_seed} must be in [0, 2**32)")
        _check_choice("data.split_by", self.split_by, ("rows", "documents"))
        if self.read_threads < 1:
            raise ValueError(f"read_threads={self.read_threads} must be at least 1")


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW with linear warm-up then a constant, cosine or linear schedule."""

    lr: float = 2e-5
    warmup_steps: int = 20
    schedule: str = "constant"  # constant | cosine | linear
    end_lr_fraction: float = 0.1  # cosine/linear decay to lr * end_lr_fraction at the last step
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_norms: bool = False  # apply weight decay to RMSNorm scales
    decay_embeddings: bool = False  # apply weight decay to the embedding table
    grad_clip: float = 1.0  # global-norm clip; 0 disables


@dataclasses.dataclass
class MeshConfig:
    """Device mesh with axes (data, fsdp, tensor). Within-slice sizes (`ici_*`) times across-slice or across-node
    sizes (`dcn_*`) give each axis; one `ici_*` may be -1 to take the remaining devices."""

    ici_data: int = 1
    ici_fsdp: int = -1
    ici_tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    # Logical parameter/activation axis -> mesh axis (or list of axes, or null for replicated).
    logical_axis_rules: list[tuple[str, Any]] = dataclasses.field(
        default_factory=lambda: [
            ("batch", ["data", "fsdp"]),
            ("vocab", "tensor"),
            ("embed", "fsdp"),
            ("heads", "tensor"),
            ("kv_heads", "tensor"),
            ("mlp", "tensor"),
            ("head_dim", None),
            ("layers", None),
        ]
    )


@dataclasses.dataclass
class CheckpointConfig:
    """Orbax checkpoints under <run dir>/checkpoints: every `every_steps`, at the end and on SIGTERM."""

    every_steps: int = 100
    keep: int = 3
    async_save: bool = True
    # At the end, also write the model as a native checkpoint (<run dir>/model) that checkpoints.load, the
    # generation and the eval CLIs read. Single-process jobs only.
    export_model: bool = False


@dataclasses.dataclass
class DistributedConfig:
    """jax.distributed settings. Left unset, they come from the environment (SLURM, TPU pods, JAX_COORDINATOR_*)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300


@dataclasses.dataclass
class EvalConfig:
    """Held-out perplexity under the full and the AnSAN mask, before and after training and every `every_steps`
    steps (0: only before and after): the first `batches` batches of `batch_size` rows of the data's validation
    split (0 disables)."""

    batches: int = 0
    batch_size: int = 4
    every_steps: int = 0


@dataclasses.dataclass
class GuardConfig:
    """Stops a diverging run before it saves anything. Non-finite losses, gradients, parameters or optimizer state
    and a loss back at ln(vocab) after the model had learned (a dead model) always stop it; besides:
    `zero_grad_steps` consecutive steps with a gradient norm of exactly 0 (a dead model; 0 disables), and a loss
    above `spike_factor` times the median of the previous `spike_window` steps (0 disables).
    """

    zero_grad_steps: int = 1
    spike_factor: float = 5.0
    spike_window: int = 20


@dataclasses.dataclass
class ProfileConfig:
    """A jax.profiler trace (XProf / TensorBoard / Perfetto) of `steps` optimizer steps from step `first_step`
    (1-based, as logged; pick one after compilation), written by the first process to <run dir>/profile."""

    first_step: int = 3
    steps: int = 0  # 0 disables


@dataclasses.dataclass
class TrainConfig:
    run_name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batches: int = 1  # gradient accumulation: the global batch is split into this many micro-batches
    log_every: int = 10
    dataset_type: str = "corpus"  # corpus (anllm_jax.data) | synthetic (random tokens, for benchmarks and tests)
    # A resumed run refuses settings that change its data stream (RESUME_KEYS) unless this is set; the data
    # iterator then starts afresh instead of continuing from the checkpoint's position.
    resume_with_new_data: bool = False
    # Weights-only start (fresh optimizer) when the run has no checkpoint yet: HF dir, GGUF file or native
    # checkpoint; "smollm2" names the packaged SmolLM2-135M GGUF.
    load_parameters_path: str | None = None
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        _check_choice("dataset_type", self.dataset_type, ("corpus", "synthetic"))
        _check_choice("optimizer.schedule", self.optimizer.schedule, ("constant", "cosine", "linear"))
        _check_choice("model.anchor_init", self.model.anchor_init, ("dot", "mean"))
        for name in ("steps", "global_batch_size", "micro_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        g = self.guard
        if g.zero_grad_steps < 0 or g.spike_factor < 0 or (g.spike_factor and g.spike_window < 1):
            raise ValueError(
                f"guard: zero_grad_steps={g.zero_grad_steps} and spike_factor={g.spike_factor} must be >= 0 "
                f"(0 disables), spike_window={g.spike_window} >= 1"
            )
        if self.eval.every_steps < 0:
            raise ValueError(f"eval.every_steps={self.eval.every_steps} must be >= 0 (0: only before and after)")
        if self.profile.steps < 0 or (self.profile.steps and self.profile.first_step < 1):
            raise ValueError(
                f"profile.first_step={self.profile.first_step}, profile.steps={self.profile.steps}: "
                "steps must be >= 0 (0 disables) and first_step >= 1"
            )
        if self.global_batch_size % self.micro_batches:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by micro_batches={self.micro_batches}"
            )
        for key in self.model.overrides:
            if key not in MODEL_FIELDS:
                raise ValueError(f"unknown config key 'model.overrides.{key}'{_suggest(key, MODEL_FIELDS)}")
        self.model.overrides = {
            k: _coerce(_hints(ModelConfig)[k], v, f"model.overrides.{k}") for k, v in self.model.overrides.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
# Settings that decide which rows a run reads in which order: a resume must keep them (resume_with_new_data).
RESUME_KEYS = (
    "dataset_type", "global_batch_size", "seed", "data.path", "data.split", "data.anchor_mode", "data.seq_len",
    "data.packing", "data.shuffle", "data.shuffle_seed", "data.add_bos", "data.split_by",
)  # fmt: skip


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """`value` checked against (and converted to) the annotated type `tp`; ValueError naming `name` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, name)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, name + ".")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name}={value!r} must be a list")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple:
            if len(value) != len(args):
                raise ValueError(f"{name}={value!r} must have {len(args)} items")
            items = [_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
        else:
            items = [_coerce(args[0] if args else Any, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}={value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r} must be an integer")
        return value
    if tp is float:
        # YAML 1.1 reads "2e-5" as a string; accept any spelling float() accepts.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r} must be a number") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r} must be a string")
        return value
    if isinstance(value, tp):
        return value
    raise ValueError(f"{name}={value!r} must be of type {_type_name(tp)}")


def _build(cls: type, d: dict[str, Any], prefix: str = "") -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            raise ValueError(f"unknown config key '{prefix}{key}'{_suggest(key, names)}")
    hints = _hints(cls)
    return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in d.items()})


def _to_plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, list | tuple):
        return [_to_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    return x


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = d.setdefault(p, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {dotted!r}: {p!r} is not a section")
        d = child
    d[leaf] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> nested dict; values are read as YAML (numbers, true/false, null, [lists])."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. optimizer.lr=1e-4)")
        _set_dotted(out, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, d)


def load_train_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML train config (or the defaults when `path` is None) and apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path} does not exist; pass --config configs/<name>.yaml")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ValueError(f"config file {path} is not valid YAML{where}: {problem}; fix the file") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a YAML mapping at the top level")
    return train_config_from_dict(_merge(raw, parse_overrides(overrides)))
