"""Train step and job: loss masking, gradient accumulation, bad input, exact resume after SIGTERM/SIGKILL (the
divergence guard's cases are in test_reliability.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

from anllm_jax import config, data, sharding, train, trainstate, trainstep
from anllm_jax.config import MeshConfig
from anllm_jax.model import init_model

ROOT = Path(__file__).resolve().parent.parent
ANCHOR = 5


def tiny_config(tmp_path: Path, run_name: str, **top) -> dict:
    """A tiny synthetic-data job (float32, AnSAN-AC with token 5 as the anchor)."""
    cfg = {
        "run_name": run_name,
        "output_dir": str(tmp_path / "runs"),
        "dataset_type": "synthetic",
        "steps": 6,
        "global_batch_size": 8,
        "log_every": 1,
        "model": {"preset": "tiny", "overrides": {"anchor_ids": [ANCHOR], "dtype": "float32"}},
        "data": {"anchor_mode": "ac", "seq_len": 32},
        "optimizer": {"lr": 1e-3, "warmup_steps": 2},
        "checkpoint": {"every_steps": 2, "keep": 2},
    }
    cfg.update(top)
    return cfg


def _nll_reference(logits: np.ndarray, doc: np.ndarray) -> tuple[float, int]:
    logits = logits.astype(np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return float(-sum(logp[t, doc[t + 1]] for t in range(len(doc) - 1))), len(doc) - 1


def test_loss_on_packed_rows_equals_documents_alone():
    """Packed rows with padding give the same summed next-token loss as each document run on its own (float64
    reference): no target crosses a document boundary or touches padding, anchors are targets too, and the
    anchor mask never lets a document see another."""
    cfg = config.preset("tiny", anchor_mode="ac", anchor_ids=(ANCHOR,))
    model = init_model(cfg, seed=1)
    rng = np.random.default_rng(0)
    T = 32
    docs = [rng.integers(6, cfg.vocab_size, n).astype(np.int32) for n in (10, 12, 32)]
    for d in docs:
        d[rng.choice(len(d), len(d) // 4, replace=False)] = ANCHOR
    tokens = np.zeros((2, T), np.int32)
    seg = np.zeros((2, T), np.int32)
    tokens[0, :10], seg[0, :10] = docs[0], 1
    tokens[0, 10:22], seg[0, 10:22] = docs[1], 2
    tokens[0, 22:] = 7  # padding positions (segment 0) hold arbitrary ids
    tokens[1], seg[1] = docs[2], 1
    logits = jax.jit(lambda t, s: model(t, segment_ids_BT=s))(jnp.asarray(tokens), jnp.asarray(seg))
    nll, count = trainstep.next_token_nll(logits, jnp.asarray(tokens), jnp.asarray(seg))
    # Reference: each document alone at the start of its own row, no segment ids. Causal attention means the
    # filler after a document cannot change the logits of its positions.
    alone = np.full((3, T), 9, np.int32)
    for i, d in enumerate(docs):
        alone[i, : len(d)] = d
    alone_logits = np.asarray(jax.jit(model)(jnp.asarray(alone)))
    ref_nll, ref_count = 0.0, 0
    for i, d in enumerate(docs):
        n, c = _nll_reference(alone_logits[i, : len(d)], d)
        ref_nll, ref_count = ref_nll + n, ref_count + c
    assert int(count) == ref_count == 9 + 11 + 31
    np.testing.assert_allclose(float(nll), ref_nll, rtol=2e-5)


def _one_step_setup(micro_batches: int):
    """A jitted step with plain SGD at lr 1, so the parameter change is exactly minus the mean gradient."""
    mcfg = config.preset("tiny", anchor_mode="ac", anchor_ids=(ANCHOR,))
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    graphdef, state = nnx.split(init_model(mcfg, seed=0))
    params = nnx.to_pure_dict(state)
    tx = optax.sgd(1.0)
    step = trainstep.make_train_step(
        graphdef,
        mcfg,
        tx,
        lambda _: jnp.ones(()),
        micro_batches,
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), None)),
    )
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    return jax.jit(step), state


def test_gradient_accumulation_equals_one_big_batch():
    batch = next(data.SyntheticIterator(256, (ANCHOR,), 32, 8, seed=3))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    results = []
    for k in (1, 4):
        step, state = _one_step_setup(k)
        results.append(step(state, batch))
    (s1, m1), (s4, m4) = results
    assert float(m1["targets"]) == float(m4["targets"]) > 0
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert float(m1["grad_norm"]) > 0.1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), s4["params"], s1["params"])


def fast_env(tmp_path: Path, devices: int = 1) -> dict:
    """Environment for job subprocesses: CPU devices, XLA's quick (unoptimised) CPU codegen, which cuts compile
    time threefold, and a compilation cache shared by the runs of one test."""
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=str(ROOT),
    )


def run_job(tmp_path: Path, raw: dict) -> subprocess.CompletedProcess:
    """Write `raw` as a config and run the train job on it to the end."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return subprocess.run(
        [sys.executable, "-m", "anllm_jax.train", "--config", str(path)],
        cwd=ROOT,
        env=fast_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if "error" in line]


def test_resume_refuses_changed_data_settings(tmp_path):
    raw = tiny_config(tmp_path, "r", steps=2)
    assert run_job(tmp_path, raw).returncode == 0
    raw.update(steps=3, global_batch_size=4, data={"anchor_mode": "ac", "seq_len": 16})
    proc = run_job(tmp_path, raw)
    (msg,) = _errors(proc)
    assert (
        proc.returncode == 1
        and "resumes with other data settings (global_batch_size 8 -> 4; data.seq_len 32 -> 16)" in msg
    )
    assert "resume_with_new_data=true" in msg and len(list((tmp_path / "runs/r/checkpoints").iterdir())) == 1
    raw["resume_with_new_data"] = True
    proc = run_job(tmp_path, raw)
    assert proc.returncode == 0 and "the data stream starts afresh" in proc.stderr


def test_profile_traces_the_chosen_steps(tmp_path):
    raw = tiny_config(tmp_path, "prof", steps=3, profile={"first_step": 2, "steps": 1})
    out = train.train(config.train_config_from_dict(raw))
    assert [row["step"] for row in out["history"]] == [1, 2, 3]
    traces = list((tmp_path / "runs/prof/profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    with pytest.raises(ValueError, match="profile.first_step=0"):
        config.train_config_from_dict(tiny_config(tmp_path, "bad", profile={"first_step": 0, "steps": 2}))


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anllm_jax.train: error: ")
    return err[0]


def test_cli_bad_input_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, "bad")))
    assert "did you mean steps" in _cli_error(capsys, ["--config", str(path), "stesp=3"])
    n = len(jax.devices())
    assert f"are available; make the sizes multiply to {n}" in _cli_error(
        capsys, ["--config", str(path), f"mesh.ici_data={n + 1}", "mesh.ici_fsdp=1"]
    )
    assert "data.seq_len=1024 is longer than the model's max_seq_len=512" in _cli_error(
        capsys, ["--config", str(path), "data.seq_len=1024"]
    )
    assert "no prepared corpus at /nonexistent/corpus" in _cli_error(
        capsys, ["--config", str(path), "dataset_type=corpus", "data.path=/nonexistent/corpus"]
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: 3\ndata: {seq_len: 32\n")
    msg = _cli_error(capsys, ["--config", str(broken)])
    assert f"config file {broken} is not valid YAML at line 3" in msg and "fix the file" in msg
    (tmp_path / "a_file").write_text("")
    assert "is not writable" in _cli_error(capsys, ["--config", str(path), f"output_dir={tmp_path / 'a_file' / 'x'}"])


def test_bad_starting_points_end_in_one_line_without_shutdown_noise(tmp_path):
    """A missing or truncated load_parameters_path stops the job in one line, with no orbax thread tracebacks."""
    from anllm_jax import checkpoints

    raw = tiny_config(tmp_path, "start", load_parameters_path=str(tmp_path / "missing"))
    proc = run_job(tmp_path, raw)
    (msg,) = _errors(proc)
    assert proc.returncode == 1 and f"load_parameters_path {tmp_path / 'missing'} does not exist" in msg
    import importlib.util

    from anllm_jax.tokenizer import Tokenizer

    sp = Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"
    tok = Tokenizer.from_sentencepiece(str(sp))
    ckpt = tmp_path / "base"
    checkpoints.save(init_model(config.preset("tiny", vocab_size=tok.vocab_size)), tok, str(ckpt))
    for f in sorted((ckpt / "params").rglob("*")):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    raw["load_parameters_path"] = str(ckpt)
    proc = run_job(tmp_path, raw)
    (msg,) = _errors(proc)
    assert proc.returncode == 1 and "cannot be read" in msg and "incomplete or corrupt" in msg


def _last_per_step(path: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.001):
    start = time.time()
    while time.time() - start < timeout:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"job exited early with code {proc.returncode}: {proc.stdout.read()[-2000:]}")
        time.sleep(poll)
    raise AssertionError("timed out")


def test_exact_resume_after_sigterm_and_sigkill(tmp_path):
    """Uninterrupted run vs. a run stopped by SIGTERM, resumed, SIGKILLed while a checkpoint is being written, and
    resumed again: same per-step losses and data order; the half-written checkpoint is never used."""
    steps = 14
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, "x", steps=steps, checkpoint={"every_steps": 1, "keep": 2})))
    env = fast_env(tmp_path)
    cmd = [sys.executable, "-m", "anllm_jax.train", "--config", str(path)]

    def start(run_name):
        return subprocess.Popen(
            [*cmd, f"run_name={run_name}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    ref = start("ref")
    assert ref.wait(timeout=300) == 0, ref.stdout.read()[-2000:]
    run = tmp_path / "runs" / "cut"
    ckpt_dir = run / "checkpoints"

    def metrics_steps():
        path = run / "metrics.jsonl"
        return path.exists() and len(path.read_text().splitlines())

    proc = start("cut")
    _wait_for(lambda: metrics_steps() >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-2000:]
    assert "SIGTERM: saved checkpoint at step" in out
    term_step = int(out.split("SIGTERM: saved checkpoint at step ")[1].split(";")[0])
    assert term_step < steps

    def writing():
        names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
        tmp = [n for n in names if "tmp" in n and int(n.split(".")[0]) > term_step + 2]
        return tmp[0] if tmp else None

    proc = start("cut")
    partial = _wait_for(writing, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial_step = int(partial.split(".")[0])
    assert partial_step < steps
    assert partial in os.listdir(ckpt_dir), "the kill should land while the checkpoint is still a temporary dir"
    complete = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()]
    assert max(complete) < partial_step

    proc = start("cut")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-2000:]
    resumed_from = int(out.split("resumed from ")[1].split(" step ")[1].split()[0])
    assert resumed_from == max(complete)

    want, got = _last_per_step(tmp_path / "runs/ref/metrics.jsonl"), _last_per_step(run / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for s in want:
        assert got[s]["batch_crc"] == want[s]["batch_crc"], f"data order differs at step {s}"
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], abs=1e-6), f"loss differs at step {s}"
    assert (run / "loss.png").exists() and (run / "config.yaml").exists()
    assert any((run / "tensorboard").iterdir())


def test_job_on_a_prepared_corpus_with_ac_anchors(tmp_path):
    """The job on the real data pipeline: a local corpus prepared with anllm_jax.data, a sentencepiece tokenizer
    that gets <AC>, one document per row; every row's sentences end in <AC> (anchor density), the held-out
    perplexities are reported before and after, and the exported model loads with checkpoints.load."""
    import importlib.util

    docs = tmp_path / "docs"
    docs.mkdir()
    sentences = ["The river rose in the spring.", "Farmers moved the sheep to the hills.", "Dr. Reed measured 2.5 m."]
    for i in range(12):
        (docs / f"d{i}.txt").write_text(" ".join(sentences[(i + k) % 3] for k in range(2 + i % 3)))
    data.prepare([str(docs)], str(tmp_path / "corpus"), val_fraction=0.25)
    sp = Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"
    raw = tiny_config(
        tmp_path,
        "corpus",
        steps=3,
        global_batch_size=4,
        dataset_type="corpus",
        model={"preset": "tiny", "tokenizer_path": str(sp), "overrides": {"vocab_size": 32001}},
        data={"path": str(tmp_path / "corpus"), "anchor_mode": "ac", "seq_len": 48, "packing": False},
        eval={"batches": 1, "batch_size": 2, "every_steps": 1},
        checkpoint={"every_steps": 2, "keep": 1, "export_model": True},
    )
    proc = run_job(tmp_path, raw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs/corpus"
    logged = re.findall(r"held-out perplexity (.+?): full mask ([\d.]+) \| AnSAN mask ([\d.]+)", proc.stderr)
    assert [when for when, _, _ in logged] == ["before training", "at step 1", "at step 2", "after training"]
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 1, 2, 3]
    for e, (_, full, ansan) in zip(evals, logged, strict=True):
        assert e["ppl_full"] == pytest.approx(float(full), rel=1e-3) and e["ppl_ansan"] == pytest.approx(
            float(ansan), rel=1e-3
        )
        assert e["ppl_full"] > 1 and e["ppl_ansan"] > 1
    # Evaluation between steps must not disturb training: the metrics hold exactly the three steps.
    assert sorted(_last_per_step(run / "metrics.jsonl")) == [1, 2, 3]
    mcfg = json.loads((run / "model_config.json").read_text())
    assert mcfg["anchor_mode"] == "ac" and mcfg["anchor_ids"] == [32000]
    rows = _last_per_step(run / "metrics.jsonl")
    # Every document has 2-4 sentences of 7-10 tokens, each followed by <AC>; BOS starts each row.
    for row in rows.values():
        assert 0.07 < row["anchor_density"] < 0.15, row
        assert row["real_tokens"] >= 4 * 2 * 8
    from anllm_jax import checkpoints

    model, tokenizer = checkpoints.load(str(run / "model"))
    assert model.cfg.anchor_mode == "ac" and model.cfg.anchor_ids == (32000,) and tokenizer.anchor_ids("ac") == (32000,)
    _, state = trainstate.restore_train_state(run, sharding.make_mesh(MeshConfig(), jax.devices()[:1]))
    np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(state["params"]["embed"]))
    # Every CLI's --checkpoint takes the run directory (its exported model) or a step directory (that step's
    # parameters with the run's model config and tokenizer); without an export, the run's newest step.
    step_dir = run / "checkpoints" / "3"
    for path in (run, step_dir):
        loaded, tok = checkpoints.load(str(path))
        assert loaded.cfg == model.cfg and tok.anchor_ids("ac") == (32000,)
        jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))
    shutil.rmtree(run / "model")
    assert checkpoints.load(str(run))[0].cfg == model.cfg
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "anllm_jax.eval", "--checkpoint", str(step_dir), "--tasks", "winogrande"]
    cmd += ["--limit", "2", "--mode", "full,anchor-cache", "--output", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=fast_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["checkpoint"] == str(step_dir) and result["results"]["0"]["winogrande"]["n"] == 2


@pytest.mark.parametrize("mode", ["ep", "ac"])
def test_build_model_sets_the_anchor_variant_of_a_loaded_checkpoint(tmp_path, mode):
    """Continual pretraining from a plain checkpoint: ep resolves "." to its token id, ac adds <AC>."""
    import importlib.util

    from anllm_jax import checkpoints
    from anllm_jax.tokenizer import Tokenizer

    sp = Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"
    tok = Tokenizer.from_sentencepiece(str(sp))
    checkpoints.save(init_model(config.preset("tiny", vocab_size=tok.vocab_size)), tok, str(tmp_path / "base"))
    raw = tiny_config(
        tmp_path,
        "variant",
        load_parameters_path=str(tmp_path / "base"),
        model={"overrides": {"dtype": "float32"}},
        data={"anchor_mode": mode, "seq_len": 32},
    )
    mcfg, params, tokenizer = train.build_model(config.train_config_from_dict(raw))
    assert mcfg.anchor_mode == mode
    if mode == "ep":
        assert mcfg.anchor_ids == (tok.token_to_id("."),) and mcfg.vocab_size == tok.vocab_size
    else:
        assert mcfg.anchor_ids == (tokenizer.token_to_id("<AC>"),) and mcfg.vocab_size == tok.vocab_size + 1
        assert params["embed"].shape[0] == tok.vocab_size + 1
