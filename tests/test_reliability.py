"""The reliability catalogue (docs/reliability.md): every bad input and fault of the second round, each checked for
its exit code, its one-line message and the files it leaves behind.

One tiny run (6 steps, a checkpoint every 2, stopped by Ctrl-C at step 4) is trained once; the cases that change a
run work on copies of it. A compilation cache shared by the module (in-process and subprocess jobs) turns the
compiles of the later jobs into cache reads.
"""

import contextlib
import gc
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from anllm_jax import checkpoints, config, convert, data, generate, records, train, trainstate
from anllm_jax import eval as ev
from anllm_jax.model import init_model
from anllm_jax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXT = ["The cat sat on the mat. The dog ran home.", "Rain fell all night. The river rose. The bridge was gone."]


def one_line(err: str, prefix: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err[-3000:]
    return lines[0]


def run_train(*argv: str) -> tuple[int, str]:
    """`python -m anllm_jax.train` in this process: (exit code, stderr)."""
    err = io.StringIO()
    handlers = {s: signal.getsignal(s) for s in train.STOP_SIGNALS}  # main ignores them once a signal stopped it
    with contextlib.redirect_stderr(err):
        try:
            train.main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    return code, err.getvalue()


def errors(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if "error:" in line]


def steps(run: Path, folder: str = "checkpoints") -> list[int]:
    return sorted(int(p.name) for p in (run / folder).iterdir() if p.name.isdigit())


def truncate_largest(step_dir: Path) -> None:
    big = max((f for f in step_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    from jax.experimental.compilation_cache import compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    cache = tmp_path_factory.mktemp("jax_cache")
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield cache
    for k, v in before.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def bpe_tokenizer() -> Tokenizer:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TEXT * 10, trainer)
    return Tokenizer(bpe=bpe, eos_id=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory, compile_cache):
    """The shared run, stopped by Ctrl-C (a real SIGINT, raised while step 4 is computed) at step 4 of 6."""
    root = tmp_path_factory.mktemp("reliability")
    bpe_tokenizer().save(str(root / "tok"))
    raw = {
        "run_name": "r",
        "output_dir": str(root / "runs"),
        "dataset_type": "synthetic",
        "steps": 6,
        "global_batch_size": 4,
        "log_every": 1,
        "model": {"preset": "tiny", "tokenizer_path": str(root / "tok"), "overrides": {"vocab_size": 320}},
        "data": {"anchor_mode": "ac", "seq_len": 16},
        "optimizer": {"lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"every_steps": 2, "keep": 2, "export_model": True},
        "guard": {"spike_window": 3},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(raw))
    real = train._next_batch

    def next_batch(job):
        if int(jax.device_get(job.state["step"])) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(job)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "_next_batch", next_batch)
        code, err = run_train("--config", str(root / "c.yaml"))
    return {"root": root, "run": root / "runs" / "r", "config": str(root / "c.yaml"), "code": code, "err": err}


@pytest.fixture()
def run(base, tmp_path) -> Path:
    """A copy of the shared run under tmp_path/runs/r (pass `output_dir` of `out(tmp_path)` to train it)."""
    shutil.copytree(base["run"], tmp_path / "runs" / "r")
    return tmp_path / "runs" / "r"


def resume(base, run: Path, *overrides: str) -> tuple[int, str]:
    return run_train("--config", base["config"], f"output_dir={run.parent}", *overrides)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Ownership: every writer replaces only what its manifest lists


def test_convert_replaces_only_its_own_output(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hf_like = tmp_path / "downloaded"  # an HF model folder (or a Trainer output) this program did not write
    hf_like.mkdir()
    (hf_like / "config.json").write_text("{}")
    (hf_like / "model.safetensors").write_bytes(b"weights")
    before = tree(hf_like)

    def conv(*argv: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as e:
            convert.main(["--input", str(base["run"]), "--to", "native", *argv])
            raise SystemExit(0)
        return e.value.code, capsys.readouterr().err

    code, err = conv("--output", str(hf_like))
    msg = one_line(err, "anllm_jax.convert: error: ")
    assert code == 2 and "holds config.json and 1 more that anllm_jax.convert did not write" in msg
    assert "no .anllm-output.json: an output of an older anllm_jax version" in msg and "--overwrite" in msg
    assert tree(hf_like) == before
    run_before = tree(base["run"])
    code, err = conv("--output", str(base["root"]), "--overwrite")  # holds the input's run: never replaced
    assert code == 2 and f"is the input {base['run']} or a folder that holds it" in one_line(err, "anllm_jax.")
    code, err = conv("--output", ".", "--overwrite")
    assert code == 2 and "is the current folder or a folder that holds it" in one_line(err, "anllm_jax.")
    assert tree(base["run"]) == run_before
    for _ in range(2):  # new, then its own earlier output: replaced
        assert conv("--output", "out")[0] == 0
    assert records.read_manifest(tmp_path / "out")["writer"] == "anllm_jax.convert"
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, err = conv("--output", "out")
    assert code == 2 and "holds notes.txt that anllm_jax.convert did not write" in one_line(err, "anllm_jax.")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert conv("--output", "out", "--to", "hf", "--overwrite")[0] == 0  # asked for: replaced whole
    assert not (tmp_path / "out" / "notes.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()


def eval_results() -> dict:
    mode = {"acc": 1.0, "acc_norm": None, "n": 1, "kv_full": 4, "kv_kept": 4, "kv_reduction": 0.0, "seconds": 0.1}
    return {"modes": ["full"], "results": {"0": {"piqa": {"n": 1, "modes": {"full": mode | {"compile_seconds": 0}}}}}}


def test_eval_output_follows_the_writers_rules(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "results.md").write_text("my own results")
    argv = ["--checkpoint", str(base["run"]), "--tasks", "piqa", "--limit", "1", "--no-progress"]
    for output, extra, message in (
        (notes, [], "holds results.md that anllm_jax.eval did not write"),
        (".", ["--overwrite"], "is the current folder"),
        (base["root"], ["--overwrite"], f"is the input {base['run']} or a folder that holds it"),
    ):
        assert ev.main([*argv, "--output", str(output), *extra]) == 2
        assert message in one_line(capsys.readouterr().err, "anllm_jax.eval: error: ")
    assert (notes / "results.md").read_text() == "my own results"
    out = tmp_path / "out"
    ev.write_outputs(eval_results(), {}, str(out))
    ev.write_outputs(eval_results(), {}, str(out))  # its own files: replaced
    assert sorted(records.read_manifest(out)["files"]) == [
        "loglikelihoods.json", "results.json", "results.md", "results.png",
    ]  # fmt: skip
    (out / "results.md").write_text("edited by hand")
    with pytest.raises(ValueError, match="holds results.md that anllm_jax.eval did not write"):
        ev.write_outputs(eval_results(), {}, str(out))
    ev.write_outputs(eval_results(), {}, str(notes), overwrite=True)  # its names replaced, the rest kept
    (notes / "mine.txt").write_text("kept")
    ev.write_outputs(eval_results(), {}, str(notes), overwrite=True)
    assert (notes / "mine.txt").read_text() == "kept" and "| piqa | full | 1 |" in (notes / "results.md").read_text()


def test_data_prepare_output_rules(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(TEXT[0])
    (tmp_path / "a_file").write_text("")
    cases = (
        ([str(tmp_path / "a_file")], "a_file is a file, not a folder"),
        ([str(tmp_path)], f"is the input {src} or a folder that holds it"),
        ([str(tmp_path), "--overwrite"], f"is the input {src} or a folder that holds it"),
    )
    for output, message in cases:
        assert data.main(["prepare", "--source", str(src), "--output", *output]) == 2
        assert message in one_line(capsys.readouterr().err, "anllm_jax.data: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "src"]


def test_a_folder_that_is_not_a_run_is_refused(base, tmp_path):
    mine = tmp_path / "runs" / "r"
    mine.mkdir(parents=True)
    (mine / "config.yaml").write_text("mine")
    code, err = resume(base, mine)
    msg = one_line(err, "anllm_jax.train: error: ")
    assert code == 1 and "is not empty and anllm_jax.train did not make it (no .anllm-output.json)" in msg
    assert 'echo \'{"writer": "anllm_jax.train"}\' >' in msg and tree(mine) == {"config.yaml": b"mine"}


# ---------------------------------------------------------------------------------------------------------------------
# 2. The guard never keeps a dead model


def test_guard_rules_condemn_the_parameters_they_saw():
    g = trainstate.Guard(config.GuardConfig(), vocab_size=256)
    ln_v = float(np.log(256))
    assert g.problem({"loss": 5.0, "grad_norm": 1.0, "finite": 1.0}) is None
    problem, condemned = g.problem({"loss": ln_v, "grad_norm": 0.0, "finite": 1.0})
    assert "the gradient norm is 0" in problem and condemned == 1  # on the step it appears
    g = trainstate.Guard(config.GuardConfig(zero_grad_steps=3), vocab_size=256)
    for _ in range(2):
        assert g.problem({"loss": 5.0, "grad_norm": 0.0, "finite": 1.0}) is None
    assert g.passed_through(10) == 7 and g.problem({"loss": 5.0, "grad_norm": 0.0, "finite": 1.0})[1] == 3
    g = trainstate.Guard(config.GuardConfig(zero_grad_steps=0), vocab_size=256)
    for loss in (3.0, 3.1, 2.9):
        assert g.problem({"loss": loss, "grad_norm": 1.0, "finite": 1.0}) is None
    problem, condemned = g.problem({"loss": ln_v + 1e-4, "grad_norm": 1.0, "finite": 1.0})
    assert "is back at ln(vocab), a uniform guess, from a median of 3.0000" in problem and condemned == 1
    g = trainstate.Guard(config.GuardConfig(spike_factor=5.0, spike_window=4), vocab_size=256)
    for loss in (2.0, 2.2, 1.9, 2.1, 9.0):  # 9.0 < 5 x median(2.0, 2.2, 1.9, 2.1): not a spike
        assert g.problem({"loss": loss, "grad_norm": 1.0, "finite": 1.0}) is None
    problem, condemned = g.problem({"loss": 12.0, "grad_norm": 1.0, "finite": 1.0})
    assert "is 5.6x the median 2.1500 of the previous 4 steps" in problem and condemned == 1
    assert g.problem({"loss": 2.0, "grad_norm": float("inf"), "finite": 1.0}) == ("the gradient norm is inf", 1)
    assert g.problem({"loss": 2.0, "grad_norm": 1.0, "finite": 0.0})[1] == 0  # only the update overflowed
    assert g.problem({"loss": float("nan"), "finite": 1.0}) == ("loss is nan", 1)


def test_sigint_checkpoints_like_sigterm(base):
    assert base["code"] == 130, base["err"][-2000:]
    assert "SIGINT: saved checkpoint at step 4; rerun the same command to resume" in base["err"]
    assert not errors(base["err"]) and steps(base["run"]) == [2, 4]
    assert not (base["run"] / "model").exists() and not (base["run"] / records.LOCK).exists()
    assert records.read_manifest(base["run"])["writer"] == "anllm_jax.train"


def test_the_guard_reference_travels_with_the_checkpoint_and_catches_a_spike_after_resume(base):
    losses = [json.loads(line)["loss"] for line in (base["run"] / "metrics.jsonl").read_text().splitlines()]
    reference = json.loads((base["run"] / "checkpoints/4/data/metadata").read_text())["guard"]
    assert reference["recent"] == pytest.approx(losses[-3:]) and len(losses) == 4  # guard.spike_window=3
    spike = {"loss": 10 * float(np.median(losses[-3:])), "grad_norm": 1.0, "finite": 1.0}
    cfg = config.GuardConfig(spike_window=3)
    assert trainstate.Guard(cfg, 320).problem(dict(spike)) is None  # without the reference: unseen for 3 steps
    problem, condemned = trainstate.Guard(cfg, 320, reference).problem(dict(spike))
    assert "x the median" in problem and condemned == 1


def test_a_dead_model_is_rejected_and_the_last_good_checkpoint_kept(base, run):
    code, err = resume(base, run, "optimizer.lr=1e6", "checkpoint.every_steps=1", "checkpoint.keep=1")
    (msg,) = errors(err)
    assert code == 1 and msg.startswith("anllm_jax.train: error: the gradient norm is 0 (loss 5.7683; ln(vocab)")
    assert "at step 6; stopped without saving it; checkpoint step 5 held those parameters: moved to " in msg
    assert f"the last good checkpoint is step 4 in {run / 'checkpoints'}" in msg and "optimizer.lr=100000" in msg
    assert steps(run) == [4] and steps(run, "rejected") == [5] and not (run / "model").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all(np.isfinite(r["loss"]) for r in rows)


def test_a_non_finite_learning_rate_is_refused_at_start(base, tmp_path):
    code, err = run_train("--config", base["config"], f"output_dir={tmp_path}", "optimizer.lr=nan")
    msg = one_line(err, "anllm_jax.train: error: ")
    assert code == 1 and "optimizer.lr=nan must be a finite number >= 0, e.g. optimizer.lr=2e-5" in msg
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# 3. Non-finite means refusal everywhere


def test_eval_refuses_non_finite_models_and_log_likelihoods(tmp_path, capsys):
    import orbax.checkpoint as ocp

    tok = bpe_tokenizer()
    model = init_model(config.preset("tiny", vocab_size=320))
    checkpoints.save(model, tok, str(tmp_path / "good"))
    shutil.copytree(tmp_path / "good", tmp_path / "nan", ignore=shutil.ignore_patterns("params"))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["final_norm"] = params["final_norm"] * np.nan
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(tmp_path / "nan" / "params"), params)
    argv = ["--checkpoint", str(tmp_path / "nan"), "--tasks", "piqa", "--limit", "1", "--output", str(tmp_path / "o")]
    assert ev.main(argv) == 2
    msg = one_line(capsys.readouterr().err, "anllm_jax.eval: error: ")
    assert "has non-finite (NaN/Inf) parameters; use an earlier checkpoint" in msg and not (tmp_path / "o").exists()
    # Finite weights whose logits overflow: the first non-finite log-likelihood stops the scoring.
    state = nnx.state(model, nnx.Param)
    state["final_norm"][...] = state["final_norm"][...] * 3e38
    enc = ev.tasks.EncodedTask("t", [None], [], [[([1, 2, 3], [4, 5]), ([1, 2, 3], [6])]])
    for score in (
        lambda: ev.score_masked(model, enc, "full", progress=False),
        lambda: ev.score_cached(model, enc, "full"),
    ):
        with pytest.raises(FloatingPointError, match=r"^t document 0 option 0: the log-likelihood under the "):
            score()
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        records.write_json(tmp_path / "x.json", {"acc": float("nan")})
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 4. Exports complete or redone; 5. checkpoints survive damage and contention


def test_a_resumed_run_exports_and_a_lost_export_is_redone(base, run, capsys):
    code, err = resume(base, run)
    assert code == 0 and not errors(err) and "resumed from" in err
    assert records.read_manifest(run / "model")["step"] == 6 and steps(run) == [4, 6]
    shutil.rmtree(run / "model")  # an export that failed or was interrupted
    (run / "model.tmp-0badc0de").mkdir()
    (run / "model.tmp-0badc0de" / "config.json").write_text("{")
    code, err = resume(base, run)
    assert code == 0 and "is already complete at step 6" in err and "model of step 6 written" in err
    assert records.read_manifest(run / "model")["step"] == 6 and not (run / "model.tmp-0badc0de").exists()
    checkpoints.load(str(run))
    assert f"{run}: loading its exported model {run / 'model'} (step 6)" in capsys.readouterr().err


def test_a_corrupt_newest_step_is_named_and_skipped(base, run, capsys, monkeypatch):
    truncate_largest(run / "checkpoints" / "4")
    leftovers = []  # what orbax's failed read leaves behind would print tracebacks after the one-line message
    monkeypatch.setattr(sys, "unraisablehook", leftovers.append)
    checkpoints.load(str(run))
    gc.collect()
    assert leftovers == []
    err = capsys.readouterr().err
    assert f"{run}: step 4 cannot be read (" in err and "incomplete or corrupt); trying the next newest" in err
    assert f"{run}: loading step 2" in err
    assert generate.main(["--checkpoint", str(run), "--prompt", "The cat", "--max-new-tokens", "2"]) == 0
    assert "step 4 cannot be read" in capsys.readouterr().err
    # A lock left by a job that is gone (its pid ended) is taken over; the resume falls back to step 2.
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    (run / records.LOCK).write_text(json.dumps(records.lock_owner(gone.pid) | {"started": "1"}))
    code, err = resume(base, run)
    assert code == 0 and not errors(err), err[-3000:]
    assert "checkpoint step 4 cannot be read (OUT_OF_RANGE: Error reading" in err
    assert f"moved to {run / 'rejected' / '4'}; resuming from step 2" in err
    assert steps(run, "rejected") == [4] and steps(run) == [4, 6] and not (run / records.LOCK).exists()


def test_no_readable_step_leaves_the_run_as_it_was(base, run):
    for step in (2, 4):
        truncate_largest(run / "checkpoints" / str(step))
    config_yaml = (run / "config.yaml").read_bytes()
    code, err = resume(base, run, "steps=8")
    msg = one_line(err.split("resuming from step 2\n")[-1], "anllm_jax.train: error: ")
    assert code == 1 and f"checkpoint step 2 in {run / 'checkpoints'} cannot be read (" in msg
    assert "no earlier step exists: move" in msg and (run / "config.yaml").read_bytes() == config_yaml
    assert steps(run) == [2] and steps(run, "rejected") == [4]


def test_resume_with_changed_model_settings_is_refused(base, run):
    config_yaml = (run / "config.yaml").read_bytes()
    for override, named in (
        ("model.overrides.n_layers=3", "model.overrides.n_layers '<unset>' -> 3"),
        ("load_parameters_path=smollm2", "load_parameters_path None -> 'smollm2'"),
    ):
        code, err = resume(base, run, override)
        msg = one_line(err, "anllm_jax.train: error: ")
        assert code == 1 and f"was started with other model settings ({named})" in msg
    assert (run / "config.yaml").read_bytes() == config_yaml and not (run / records.LOCK).exists()
    old = config.load_train_config(str(run / "config.yaml"))
    new = config.load_train_config(str(run / "config.yaml"), ["model.overrides.dtype=bfloat16"])
    assert train._resumed_model(new, old, run).dtype == "bfloat16"  # how it computes may change


def test_a_second_job_on_a_live_run_is_refused(base, run):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / records.LOCK).write_text(json.dumps(records.lock_owner(holder.pid)))
        before = tree(run)
        code, err = resume(base, run)
        msg = one_line(err, "anllm_jax.train: error: ")
        assert code == 1 and f"is in use by process {holder.pid} on {os.uname().nodename}" in msg
        assert "wait for that job to end or stop it" in msg and tree(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_ends_in_one_line_with_the_previous_step_intact(base, run, compile_cache):
    """From the first save on, a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes every large write fail as
    a full disk would."""
    code = f"""
import resource, signal, sys
from anllm_jax import train, trainstate
save = trainstate.Checkpoints.save
def save_on_a_full_disk(*args):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, {resource.RLIM_INFINITY}))
    save(*args)
trainstate.Checkpoints.save = save_on_a_full_disk
train.main(sys.argv[1:])
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(compile_cache))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--config", base["config"], f"output_dir={run.parent}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (msg,) = errors(proc.stderr)
    assert proc.returncode == 1 and msg.startswith(
        "anllm_jax.train: error: out of disk space writing checkpoint step 6"
    )
    assert f"to {run / 'checkpoints'} (" in msg and "File too large" in msg and " MiB are free there" in msg
    state_mib = 3 * config.preset("tiny", vocab_size=320).num_params() * 4 / 2**20  # weights and AdamW's 2 moments
    assert f"it needs about {state_mib:,.1f} MiB" in msg and "(step 4 is intact and a rerun resumes from it)" in msg
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"] and not (run / "model").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 6. Long prompts


def test_long_prompts_prefill_in_chunks_or_are_refused_first(monkeypatch):
    model = init_model(config.preset("tiny", anchor_mode="full", max_seq_len=2048))
    prompt = [list(np.random.default_rng(0).integers(1, 256, 1500))]
    calls = []
    real = generate._extend_jit
    monkeypatch.setattr(generate, "_extend_jit", lambda *a: calls.append(a[3].shape) or real(*a))
    cache, last = generate.prefill(model, prompt, policy="full")
    assert calls == [(1, 512)] * 3 and int(cache.length[0]) == 1500  # the default: 512-token chunks
    _, last_1024 = generate.prefill(model, prompt, policy="full", chunk_size=1024)
    np.testing.assert_allclose(last, last_1024, rtol=1e-4, atol=1e-4)
    calls.clear()
    monkeypatch.setattr(generate, "_free_memory", lambda: 2**20)
    with pytest.raises(
        ValueError, match=r"^the prefill of 1 prompt\(s\) needs about 0.\d\d GiB \(a cache of 1536 "
    ) as e:
        generate.prefill(model, prompt, policy="full")
    assert "0.00 GiB are free; pass a smaller chunk size (--chunk-size)" in str(e.value) and not calls
    with pytest.raises(ValueError, match="attention of 1504-token chunks over 1504 keys"):
        generate.generate(model, prompt, policy="none", max_new_tokens=4)
