"""Train config schema: YAML + overrides, validation messages, recipes, schedule, FLOP accounting, mesh shapes."""

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from anllm_jax import config, sharding, trainstep
from anllm_jax.config import MeshConfig, OptimizerConfig, load_train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\noptimizer: {lr: 2e-5, schedule: cosine}\nmodel: {overrides: {dtype: float32}}\n")
    cfg = load_train_config(str(path), ["optimizer.warmup_steps=3", "data.seq_len=128", "model.overrides.remat=full"])
    assert cfg.steps == 5
    assert cfg.optimizer.lr == 2e-5 and isinstance(cfg.optimizer.lr, float)  # YAML reads 2e-5 as a string
    assert cfg.optimizer.schedule == "cosine" and cfg.optimizer.warmup_steps == 3
    assert cfg.data.seq_len == 128
    assert cfg.model.overrides == {"dtype": "float32", "remat": "full"}
    # The resolved config round-trips through its plain-dict form.
    assert config.train_config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimzer.lr=1", "unknown config key 'optimzer' (did you mean optimizer?)"),
        ("optimizer.warmup_step=5", "unknown config key 'optimizer.warmup_step' (did you mean warmup_steps?)"),
        ("data.seqlen=64", "unknown config key 'data.seqlen' (did you mean seq_len?)"),
        ("model.overrides.dmodel=8", "unknown config key 'model.overrides.dmodel' (did you mean d_model"),
        ("steps=abc", "steps='abc' must be an integer"),
        ("steps=1.5", "steps=1.5 must be an integer"),
        ("checkpoint.async_save=maybe", "checkpoint.async_save='maybe' must be true or false"),
        ("optimizer.lr=fast", "optimizer.lr='fast' must be a number"),
        ("model.overrides.n_layers=two", "model.overrides.n_layers='two' must be an integer"),
        ("optimizer.schedule=exp", "optimizer.schedule='exp' is not one of constant, cosine, linear"),
        ("micro_batches=3", "global_batch_size=8 is not divisible by micro_batches=3"),
        ("optimizer=3", "optimizer must be a mapping of OptimizerConfig fields"),
        ("steps", "override 'steps' is not key=value"),
    ],
)
def test_bad_config_gives_one_line_error(override, message):
    with pytest.raises(ValueError) as e:
        load_train_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_train_config("/nonexistent/x.yaml")


def test_every_shipped_config_is_valid():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert {"demo.yaml", "anllm-ac-llama2-7b.yaml", "anllm-ep-llama2-7b.yaml"} <= set(names)
    assert any("smollm2" in n and "-ac-" in n for n in names) and any("smollm2" in n and "-ep-" in n for n in names)
    for name in names:
        load_train_config(str(CONFIGS / name))


@pytest.mark.parametrize("variant", ["ac", "ep"])
def test_paper_recipe(variant):
    cfg = load_train_config(str(CONFIGS / f"anllm-{variant}-llama2-7b.yaml"))
    o = cfg.optimizer
    assert (cfg.global_batch_size, cfg.data.seq_len, cfg.steps) == (512, 4096, 1818)
    assert (o.lr, o.warmup_steps, o.schedule, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip) == (
        2e-5,
        20,
        "constant",
        0.9,
        0.999,
        1e-8,
        0.0,
        1.0,
    )
    assert cfg.data.anchor_mode == variant and cfg.data.packing is False
    assert cfg.model.overrides.get("dtype", "bfloat16") == "bfloat16"


def _reference_lr(o: OptimizerConfig, total: int, step: int) -> float:
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    frac = min(max((step - o.warmup_steps) / (total - o.warmup_steps), 0.0), 1.0)
    end = o.end_lr_fraction
    if o.schedule == "cosine":
        return o.lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac)))
    if o.schedule == "linear":
        return o.lr * (1 - (1 - end) * frac)
    return o.lr


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule(schedule):
    o = OptimizerConfig(lr=1e-3, warmup_steps=4, schedule=schedule, end_lr_fraction=0.1)
    fn = trainstep.lr_schedule(o, 20)
    for step in range(0, 25):
        assert float(fn(step)) == pytest.approx(_reference_lr(o, 20, step), rel=1e-6)
    assert float(fn(3)) == pytest.approx(1e-3)  # warm-up reaches the peak on its last step


def test_weight_decay_mask():
    params = {"embed": 0, "final_norm": 0, "lm_head": 0, "blocks": {"attn_norm": 0, "wq": 0, "mlp_norm": 0}}
    mask = trainstep.decay_mask(OptimizerConfig(), params)
    assert mask == {
        "embed": False,
        "final_norm": False,
        "lm_head": True,
        "blocks": {"attn_norm": False, "wq": True, "mlp_norm": False},
    }
    mask = trainstep.decay_mask(OptimizerConfig(decay_norms=True, decay_embeddings=True), params)
    assert all(jax.tree.leaves(mask))


def test_flops_per_token_counts_every_matmul_weight():
    from flax import nnx

    from anllm_jax.model import init_model

    for name in ("tiny", "smollm2-135m"):
        cfg = config.preset(name)
        abstract = nnx.eval_shape(lambda cfg=cfg: init_model(cfg))
        sizes = {
            "/".join(map(str, p)): int(np.prod(x.shape)) for p, x in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
        }
        # The input embedding lookup does no matmul; a tied table is used once, as the output head.
        matmul = sum(sizes.values()) - (0 if cfg.tie_embeddings else sizes["embed"])
        T = 1024
        attn = 2 * 2 * cfg.n_heads * cfg.head_dim * T / 2 * cfg.n_layers * 3  # QK^T + AV, causal half, fwd+bwd
        assert trainstep.flops_per_token(cfg, T) == pytest.approx(6 * matmul + attn)


def test_peak_flops_table():
    assert trainstep.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert trainstep.peak_flops("NVIDIA H200") == 989e12
    assert trainstep.peak_flops("TPU v5 lite") == 197e12
    assert trainstep.peak_flops("TPU v5p") == 459e12
    assert trainstep.peak_flops("cpu") is None


def test_mesh_shapes():
    assert sharding.resolve_shape(MeshConfig(ici_data=2, ici_fsdp=-1, ici_tensor=2), 8) == ((2, 2, 2), (1, 1, 1))
    assert sharding.resolve_shape(MeshConfig(ici_fsdp=-1, dcn_data=2), 16) == ((1, 8, 1), (2, 1, 1))
    with pytest.raises(ValueError, match=r"needs 6 devices but 8 are available"):
        sharding.resolve_shape(MeshConfig(ici_data=3, ici_fsdp=2), 8)
    with pytest.raises(ValueError, match="8 is not divisible by 3"):
        sharding.resolve_shape(MeshConfig(ici_data=3, ici_fsdp=-1), 8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.resolve_shape(MeshConfig(ici_data=-1, ici_fsdp=-1), 8)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.axis_rules(MeshConfig(logical_axis_rules=[("heads", "model")]))
