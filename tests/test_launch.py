"""Launchers against real and stand-in schedulers: launch/slurm_gpu.sbatch on a one-node SLURM cluster
(scripts/slurm_local.sh) trains with two jax.distributed processes that match one process, checkpoints on the
scheduler's SIGTERM, resumes when resubmitted and fails as a whole when a task dies; launch/tpu_pod.sh hands every
TPU worker one command whose arguments reach python intact."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_multihost import OPTIMIZER
from test_train import fast_env, tiny_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24
# A job here takes seconds; the bound is for a loaded machine. A job still running at the bound is cancelled.
JOB_TIMEOUT = 300.0
# One worker runs the SLURM tests one after the other: their jobs need the same two CPUs.
slurm_test = pytest.mark.xdist_group("slurm")
UNFINISHED = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


class Slurm:
    """Submits launch/slurm_gpu.sbatch as two CPU tasks on one node and waits for jobs, cancelling leftovers."""

    def __init__(self, tmp_path: Path, config: Path) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.jobs: list[str] = []
        self.env = fast_env(tmp_path, 2)
        # The coordinator must come from SLURM's environment alone, not from variables the test run may carry.
        for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            self.env.pop(name, None)
        self.env["PYTHON"] = sys.executable

    def submit(self, *overrides: str) -> str:
        proc = subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--chdir={ROOT}",
                f"--output={self.tmp_path}/slurm-%j.out",
                "--gpus-per-node=0",
                "--ntasks-per-node=2",
                "--cpus-per-task=1",
                "launch/slurm_gpu.sbatch",
                "--config",
                str(self.config),
                *overrides,
            ],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def state(self, job: str) -> tuple[str, str]:
        """(JobState, ExitCode) as scontrol reports them, e.g. ("FAILED", "143:0")."""
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        return re.search(r"\bJobState=(\S+)", out)[1], re.search(r"\bExitCode=(\S+)", out)[1]

    def output(self, job: str) -> str:
        path = self.tmp_path / f"slurm-{job}.out"
        return path.read_text() if path.exists() else ""

    def wait(self, job: str, timeout: float = JOB_TIMEOUT) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while (state := self.state(job))[0] in UNFINISHED:
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job], timeout=60)
                raise AssertionError(f"job {job} still {state[0]} after {timeout} s; cancelled\n{self.output(job)}")
            time.sleep(0.2)
        return state

    def wait_for(self, job: str, predicate: Callable[[], bool], timeout: float = JOB_TIMEOUT) -> None:
        """Until `predicate` holds while the job runs; a job that ends first fails the test."""
        deadline = time.monotonic() + timeout
        while not predicate():
            state = self.state(job)[0]
            assert state in UNFINISHED, f"job {job} ended ({state}) too early:\n{self.output(job)[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting on job {job}:\n{self.output(job)[-3000:]}"
            time.sleep(0.05)

    def cancel_leftovers(self) -> None:
        if self.jobs:
            subprocess.run(["scancel", *self.jobs], capture_output=True, timeout=60)


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[Slurm]:
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (as root, scripts/slurm_local.sh installs and starts a one-node cluster)")
    nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=60).stdout.split()
    if not {"idle", "mixed", "allocated", "completing"} & set(nodes):
        proc = subprocess.run(["bash", "scripts/slurm_local.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"SLURM is installed but has no usable node: {proc.stderr.strip()}"
    # Two CPU devices per process and a mesh over four: it only fits when both processes joined one job.
    cfg = tiny_config(
        tmp_path,
        "two",
        steps=STEPS,
        optimizer=OPTIMIZER,
        checkpoint={"every_steps": 8, "keep": 2},
        mesh={"ici_data": 1, "ici_fsdp": 2, "ici_tensor": 1, "dcn_fsdp": 2},
    )
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    s = Slurm(tmp_path, config)
    yield s
    s.cancel_leftovers()


def _metrics(run: Path) -> dict[int, dict]:
    """The last row logged for each step (a resumed run logs again from its checkpoint)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def _steps_logged(run: Path) -> int:
    """Complete lines in metrics.jsonl, which the job may be appending to."""
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _tasks_exited(srun_output: str, code: int) -> set[int]:
    """Task ids from srun's "task 1: Exited with exit code N" / "tasks 0-1: ..." lines for one exit code."""
    tasks: set[int] = set()
    for spec in re.findall(rf"tasks? ([\d,-]+): Exited with exit code {code}$", srun_output, re.M):
        for part in spec.split(","):
            first, _, last = part.partition("-")
            tasks.update(range(int(first), int(last or first) + 1))
    return tasks


@pytest.mark.slow
@slurm_test
def test_slurm_two_tasks_train_checkpoint_on_sigterm_and_resume(slurm: Slurm, tmp_path: Path) -> None:
    """Two SLURM tasks train with the losses of one process; the scheduler's SIGTERM reaches both, which checkpoint
    and exit 143; resubmitting the same command resumes from that step and ends with the uninterrupted job's
    per-step losses and data order."""
    runs = tmp_path / "runs"
    job = slurm.submit()
    assert slurm.wait(job) == ("COMPLETED", "0:0"), slurm.output(job)[-3000:]
    out = slurm.output(job)
    # Only process 0 logs steps: two processes that had not joined would each be process 0 of its own run (and fail
    # on the mesh, which needs both processes' devices).
    assert len(re.findall(rf"step 1/{STEPS} \|", out)) == 1, out[-3000:]
    two = _metrics(runs / "two")
    assert sorted(two) == list(range(1, STEPS + 1))

    one = subprocess.run(
        [sys.executable, "-m", "anllm_jax.train", "--config", str(slurm.config), "run_name=one"]
        + ["mesh.ici_fsdp=1", "mesh.dcn_fsdp=1"],
        cwd=ROOT,
        env=fast_env(tmp_path, 1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    ref = _metrics(runs / "one")
    np.testing.assert_allclose([two[s]["loss"] for s in ref], [ref[s]["loss"] for s in ref], rtol=0, atol=1e-5)

    cut = slurm.submit("run_name=cut")
    slurm.wait_for(cut, lambda: _steps_logged(runs / "cut") >= 2)
    subprocess.run(["scancel", "--signal=TERM", cut], check=True, timeout=60)
    assert slurm.wait(cut) == ("FAILED", "143:0"), slurm.output(cut)[-3000:]
    out = slurm.output(cut)
    # Both tasks left through the trainer's handler rather than being killed.
    assert _tasks_exited(out, 143) == {0, 1}, out[-3000:]
    term_step = int(re.search(r"SIGTERM: saved checkpoint at step (\d+)", out)[1])
    assert 2 <= term_step < STEPS
    assert (runs / "cut/checkpoints" / str(term_step)).is_dir()

    again = slurm.submit("run_name=cut")
    assert slurm.wait(again) == ("COMPLETED", "0:0"), slurm.output(again)[-3000:]
    out = slurm.output(again)
    assert int(re.search(r"resumed from \S+ step (\d+)", out)[1]) == term_step, out[-3000:]
    got = _metrics(runs / "cut")
    assert sorted(got) == sorted(two)
    for s in two:
        assert got[s]["batch_crc"] == two[s]["batch_crc"], f"data order differs at step {s}"
        assert got[s]["loss"] == pytest.approx(two[s]["loss"], abs=1e-6), f"loss differs at step {s}"


@pytest.mark.slow
@slurm_test
def test_slurm_job_fails_on_a_bad_argument_and_on_a_dead_task(slurm: Slurm, tmp_path: Path) -> None:
    """A config key the trainer rejects fails the job with the trainer's one-line error and no checkpoint. A task
    killed mid-run fails the job within SLURM's KillWait: srun stops the other process (SIGTERM, then SIGKILL, as it
    cannot finish a step without its peer), which would otherwise wait in a collective until jax.distributed's
    heartbeat timeout (100 s)."""
    job = slurm.submit("run_name=bad", "stesp=3")
    assert slurm.wait(job)[0] == "FAILED"
    out = slurm.output(job)
    assert "anllm_jax.train: error: unknown config key 'stesp' (did you mean steps?)" in out, out[-3000:]
    # The first task to exit reports 1; srun may stop the other one with SIGTERM while it is exiting.
    assert _tasks_exited(out, 1) and "SIGTERM: saved checkpoint" not in out, out[-3000:]
    assert not (tmp_path / "runs/bad/checkpoints").exists()

    job = slurm.submit("run_name=kill", "steps=100000")
    slurm.wait_for(job, lambda: _steps_logged(tmp_path / "runs/kill") >= 2)
    pids = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True, timeout=60, check=True)
    # Columns: PID JOBID STEPID LOCALID GLOBALID; task 1 of step 0 is the second training process.
    task1 = [int(f[0]) for f in (line.split() for line in pids.stdout.splitlines()[1:]) if f[2:5] == ["0", "1", "1"]]
    assert len(task1) == 1, pids.stdout
    killed = time.monotonic()
    os.kill(task1[0], signal.SIGKILL)
    state, _ = slurm.wait(job, timeout=120)
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    kill_wait = int(re.search(r"^KillWait\s*=\s*(\d+)", config, re.M)[1])
    assert time.monotonic() - killed < kill_wait + 15
    assert state == "FAILED"
    assert "task 1: Killed" in slurm.output(job)


def test_tpu_pod_runs_one_command_on_every_worker_with_arguments_intact(tmp_path: Path) -> None:
    """launch/tpu_pod.sh calls `gcloud ... ssh --worker=all --command CMD` (a stand-in gcloud records it); CMD, run by
    a shell as each worker does, starts the venv's python in the repository with every argument unchanged, spaces,
    quotes, $ and backquotes included. Arguments without the `--` separator are refused before gcloud runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "gcloud_args"
    (bin_dir / "gcloud").write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "{record}"\n')
    repo = tmp_path / "repo dir"
    venv = tmp_path / "venv 'v'"
    (venv / "bin").mkdir(parents=True)
    repo.mkdir()
    argv = tmp_path / "argv"
    (venv / "bin/python").write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$PWD" "$@" > "{argv}"\n')
    for script in (bin_dir / "gcloud", venv / "bin/python"):
        script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", REPO_DIR=str(repo), VENV=str(venv))
    train_args = ["--config", "configs/my run.yaml", 'run_name=it\'s "q"', "data.path=$HOME/*", "x=`id`", ""]

    def launch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "launch/tpu_pod.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    proc = launch("my-tpu", "us-central2-b", "my project", "--", *train_args)
    assert proc.returncode == 0, proc.stderr
    gcloud = record.read_text().split("\0")[:-1]
    assert gcloud[:-1] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b"] + [
        "--project",
        "my project",
        "--worker=all",
        "--command",
    ]
    subprocess.run(["bash", "-c", gcloud[-1]], cwd=tmp_path, env=dict(os.environ), check=True, timeout=60)
    assert argv.read_text().split("\0")[:-1] == [str(repo), "-m", "anllm_jax.train", *train_args]

    record.unlink()
    proc = launch("my-tpu", "us-central2-b", "--", "steps=3")
    assert proc.returncode == 0, proc.stderr
    assert "--project" not in record.read_text().split("\0")

    record.unlink()
    proc = launch("my-tpu", "us-central2-b", "--config", "x.yaml")
    assert proc.returncode == 2 and proc.stderr.startswith("usage:"), proc.stderr
    assert not record.exists()
