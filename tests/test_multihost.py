"""Sharded training: meshes over 8 fake CPU devices and two real processes match one device; checkpoints written by
two processes restore in one process on another mesh."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_train import fast_env, tiny_config

ROOT = Path(__file__).resolve().parent.parent


# Adam's first steps divide each gradient by its own magnitude, which turns float reduction-order noise in
# near-zero gradient entries into O(lr) differences; a larger eps keeps the comparison well-conditioned.
OPTIMIZER = {"lr": 1e-3, "warmup_steps": 2, "eps": 1e-4}


def _run_python(code: str, env: dict, timeout: int = 400) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_meshes_match_one_device(tmp_path):
    """(data, fsdp, tensor) = (2,2,2), (1,8,1), (8,1,1) give the loss and updated parameters of one device,
    with gradient accumulation over 2 micro-batches on the sharded batch."""
    base = tiny_config(
        tmp_path,
        "one",
        steps=2,
        global_batch_size=16,
        micro_batches=2,
        optimizer=OPTIMIZER,
        checkpoint={"every_steps": 100, "keep": 1},
    )
    code = f"""
        import jax, numpy as np
        from anllm_jax import config, train
        base = {base!r}
        def run(name, mesh, devices=None):
            raw = dict(base, run_name=name, mesh=dict(ici_data=mesh[0], ici_fsdp=mesh[1], ici_tensor=mesh[2]))
            out = train.train(config.train_config_from_dict(raw), devices=devices)
            return [h["loss"] for h in out["history"]], jax.device_get(out["state"]["params"]), out["state"]
        ref_loss, ref_params, _ = run("one", (1, 1, 1), jax.devices()[:1])
        assert len(jax.devices()) == 8
        for mesh in [(2, 2, 2), (1, 8, 1), (8, 1, 1)]:
            loss, params, state = run("mesh" + "".join(map(str, mesh)), mesh)
            np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-5)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params, ref_params)
            # The parameters really are spread over the devices (FSDP on 'embed', tensor on heads/mlp/vocab).
            wq = state["params"]["blocks"]["wq"]
            assert len({{str(s.index) for s in wq.addressable_shards}}) == mesh[1] * mesh[2], (mesh, wq.sharding)
            print("mesh", mesh, "losses", loss)
        print("OK")
    """
    out = _run_python(code, fast_env(tmp_path, 8))
    assert out.strip().endswith("OK")


def test_two_processes_match_one_and_restore_on_another_mesh(tmp_path):
    """Two jax.distributed processes (2 CPU devices each, launched by launch/local_multiprocess.sh) train with the
    losses of one single-device process; their checkpoint restores in one process on a (2, 1, 2) mesh with the same
    parameters as the single-process run."""
    cfg = tiny_config(
        tmp_path,
        "two",
        steps=4,
        optimizer=OPTIMIZER,
        checkpoint={"every_steps": 2, "keep": 2},
        mesh={"ici_data": 1, "ici_fsdp": 2, "ici_tensor": 1, "dcn_fsdp": 2},
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(fast_env(tmp_path, 2), PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", "--config", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log")) if (tmp_path / "logs").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]

    code = f"""
        import json, jax, numpy as np
        from anllm_jax import config, sharding, train, trainstate
        from anllm_jax.config import MeshConfig
        raw = {cfg!r}
        raw.update(run_name="one", mesh={{}})
        out = train.train(config.train_config_from_dict(raw), devices=jax.devices()[:1])
        ref = jax.device_get(out["state"]["params"])
        mesh = sharding.make_mesh(MeshConfig(ici_data=2, ici_fsdp=1, ici_tensor=2))
        mcfg, state = trainstate.restore_train_state("{tmp_path}/runs/two", mesh)
        assert int(state["step"]) == 4 and mcfg.anchor_ids == (5,)
        assert state["params"]["embed"].sharding.mesh.shape == mesh.shape
        restored = jax.device_get(state["params"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), restored, ref)
        print(json.dumps([h["loss"] for h in out["history"]]))
    """
    one = json.loads(_run_python(code, fast_env(tmp_path, 4)).strip().splitlines()[-1])
    two = [json.loads(line)["loss"] for line in (tmp_path / "runs/two/metrics.jsonl").read_text().splitlines()]
    assert len(two) == len(one) == 4
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


def _demo(tmp_path: Path, corpus: Path, run: str, steps: int) -> list[str]:
    """The README's demo job, cut to `steps` steps and one held-out batch, evaluated every 2 steps."""
    return [
        "--config", "configs/demo.yaml", f"run_name={run}", f"output_dir={tmp_path / 'runs'}", f"data.path={corpus}",
        f"steps={steps}", "eval.batches=1", "eval.every_steps=2", "checkpoint.every_steps=2", "checkpoint.keep=2",
        "checkpoint.export_model=false",
    ]  # fmt: skip


def _launch(args: list[str], env: dict, processes: int) -> None:
    cmd = ["bash", "launch/local_multiprocess.sh", str(processes)] if processes > 1 else [sys.executable, "-m"]
    cmd += [] if processes > 1 else ["anllm_jax.train"]
    proc = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in Path(env["LOG_DIR"]).glob("*.log"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:] + logs[-3000:]


def _curves(run_dir: Path) -> tuple[dict[int, float], dict[int, tuple[float, float]]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}, {e["step"]: (e["ppl_full"], e["ppl_ansan"]) for e in evals}


@pytest.mark.slow
def test_readme_multiprocess_demo_equals_one_process(tmp_path):
    """`launch/local_multiprocess.sh 2 --config configs/demo.yaml` (the real SmolLM2, the registry corpus, the
    default mesh, one CPU device per process) trains with the one-process losses and held-out perplexities, and its
    checkpoint restores (restore_train_state) and resumes on one process."""
    from anllm_jax import data

    corpus = tmp_path / "corpus"
    data.prepare(output=str(corpus))
    env = dict(fast_env(tmp_path, 1), PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"))
    _launch(_demo(tmp_path, corpus, "one", 3), env, 1)
    _launch(_demo(tmp_path, corpus, "two", 2), env, 2)
    one_loss, one_ppl = _curves(tmp_path / "runs/one")
    two_loss, two_ppl = _curves(tmp_path / "runs/two")
    assert sorted(two_loss) == [1, 2] and sorted(two_ppl) == [0, 2]
    np.testing.assert_allclose([two_loss[s] for s in (1, 2)], [one_loss[s] for s in (1, 2)], rtol=2e-5)
    np.testing.assert_allclose(two_ppl[0], one_ppl[0], rtol=2e-5)
    # After two Adam steps, reduction-order noise in near-zero gradient entries has moved those entries by up to
    # +-lr each step (Adam divides a gradient by its own magnitude): 1e-4 here, so the models agree to ~2e-4.
    np.testing.assert_allclose(two_ppl[2], one_ppl[2], rtol=1e-3)
    code = f"""
        import jax, numpy as np
        from anllm_jax import trainstate
        _, a = trainstate.restore_train_state("{tmp_path}/runs/two")
        _, b = trainstate.restore_train_state("{tmp_path}/runs/one", step=2)
        assert int(a["step"]) == int(b["step"]) == 2
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=2.5e-4), a["params"], b["params"])
        print("OK")
    """
    assert _run_python(code, fast_env(tmp_path, 1)).strip().endswith("OK")
    _launch(_demo(tmp_path, corpus, "two", 3), env, 1)  # resumed on one process: the same step 3, same batch
    resumed = [json.loads(line) for line in (tmp_path / "runs/two/metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "runs/one/metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["step"] == 3 and resumed[-1]["batch_crc"] == reference[-1]["batch_crc"]
    np.testing.assert_allclose(resumed[-1]["loss"], reference[-1]["loss"], rtol=1e-3)


def test_launcher_failure_names_the_process_and_its_log(tmp_path):
    """One process failing stops the others; the launcher exits with its code and names it, without shell noise."""
    env = dict(os.environ, PYTHON=sys.executable, MODULE="anllm_jax.no_such_tool", LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("local_multiprocess:")]
    assert len(lines) == 1 and "failed with exit code 1" in lines[0], proc.stderr
    assert "its output is above" in lines[0] or f"its log: {tmp_path / 'logs'}/process_1.log" in lines[0]
    assert "no such job" not in proc.stderr and "wait:" not in proc.stderr
