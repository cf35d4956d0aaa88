"""scripts/reproduce.sh: the whole reproduction pipeline at smoke size on the real SmolLM2-135M, and its errors."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "reproduce.sh"
MODELS = ("base", "control", "ep", "ac")
STAGES = (
    "convert",
    "prepare",
    "train-control",
    "train-ep",
    "train-ac",
    "eval-base",
    "eval-control",
    "eval-ep",
    "eval-ac",
    "timing",
    "report",
)
MODEL_MODES = {"base": ("full", "anchor-cache"), "control": ("full",), "ep": ("full", "anchor-cache"),
               "ac": ("full", "anchor-cache")}  # fmt: skip


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict, str]]:
    out = tmp_path_factory.mktemp("reproduce")
    r = _run("--smoke", "--out", str(out), "--publish", str(out / "published"), timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    yield out, json.loads((out / "results.json").read_text()), r.stdout
    shutil.rmtree(out)  # ~8 GB of checkpoints and runs


# The tests below share one smoke run: on one xdist worker (--dist loadgroup), in file order.
pytestmark = pytest.mark.xdist_group("reproduce")


@pytest.mark.slow
def test_smoke_table_rows_and_numbers(smoke: tuple[Path, dict, str]) -> None:
    out, report, _ = smoke
    assert report["smoke"] is True and report["profile"] == "smoke"
    tasks = report["tasks"]
    assert tasks == ["winogrande"]
    keys = [(r["shots"], r["model"], r["mode"]) for r in report["rows"]]
    assert sorted(keys) == sorted((k, m, mode) for k in (0, 5) for m in MODELS for mode in MODEL_MODES[m])
    for r in report["rows"]:
        evaluated = json.loads((out / "eval" / r["model"] / "results.json").read_text())
        per_task = evaluated["results"][str(r["shots"])]
        for t in tasks:
            assert r["n"][t] == 1
            assert r["acc"][t] == pytest.approx(100 * per_task[t]["modes"][r["mode"]]["acc"])
        assert r["average"] == pytest.approx(sum(r["acc"].values()) / len(tasks))
        assert 0 <= r["average"] <= 100 and 0 <= r["kv_reduction"] < 100
        if r["mode"] == "full":
            assert r["kv_reduction"] == 0
        timed = r["mode"] == "anchor-cache" and r["shots"] == 5 and r["model"] in ("ep", "ac")
        if timed:
            assert r["time_ratio"] == report["timing"][r["model"]]["time_ratio"] > 0
        else:
            assert r["time_ratio"] is None
    # 5-shot AC prefix: the five demonstrations end in <AC> each, so exactly their five anchors stay cached.
    ac5 = json.loads((out / "eval" / "ac" / "results.json").read_text())["results"]["5"]["winogrande"]["modes"]
    stats = ac5["anchor-cache"]
    assert stats["prefix_entries_kept"] == 5
    ac_row = next(r for r in report["rows"] if (r["shots"], r["model"], r["mode"]) == (5, "ac", "anchor-cache"))
    assert ac_row["prefix_kv_reduction"] == pytest.approx(100 * (1 - 5 / stats["prefix_tokens"]))
    assert report["checks"]["ac_5shot_prefix_kv_reduction"] == ac_row["prefix_kv_reduction"]
    # Paired differences: full minus anchor-cache of one model is the difference of its two rows' averages.
    paired = {(tuple(p["a"]), tuple(p["b"])): p for p in report["paired"]}
    avg = {(r["model"], r["mode"]): r["average"] for r in report["rows"] if r["shots"] == 5}
    for (a, b), p in paired.items():
        assert p["points"] == pytest.approx(avg[a] - avg[b]) and p["ci95"][0] <= p["points"] <= p["ci95"][1]
    # Anchor-cache scoring and one AnSAN forward per row (the timing stage's two modes) are the same function.
    assert set(report["timing"]) == {"ep", "ac"}
    for name, t in report["timing"].items():
        timed = json.loads((out / "timing" / name / "results.json").read_text())["results"]["5"]["winogrande"]
        assert t["seconds"]["no-cache"] == timed["modes"]["no-cache"]["seconds"]
        assert t["time_ratio"] == pytest.approx(t["seconds"]["no-cache"] / t["seconds"]["anchor-cache"])
        assert t["max_abs_loglik_diff"] < 5e-3


@pytest.mark.slow
def test_smoke_training_runs_and_checkpoints(smoke: tuple[Path, dict, str]) -> None:
    out, report, _ = smoke
    expected = {"control": ("full", 49152), "ep": ("ep", 49152), "ac": ("ac", 49153)}
    assert set(report["training"]) == set(expected)
    for name, (mode, vocab) in expected.items():
        t = report["training"][name]
        assert t["anchor_mode"] == mode and t["steps"] == 2
        steps = [json.loads(line)["step"] for line in (Path(t["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        assert math.isfinite(t["first_loss"]) and math.isfinite(t["final_loss"])
        cfg = json.loads((out / "runs" / name / "model" / "config.json").read_text())
        assert (cfg["anchor_mode"], cfg["vocab_size"]) == (mode, vocab)
        # The control trains with full attention but knows "." (id 30) as anchors, from its base-ep start.
        assert cfg["anchor_ids"] == ([49152] if mode == "ac" else [30])
        # Learning curves: held-out perplexity before training and after each step, under both masks.
        curve = [json.loads(line) for line in (Path(t["run_dir"]) / "eval.jsonl").read_text().splitlines()]
        assert [row["step"] for row in curve] == [0, 1, 2]
        assert t["heldout_ppl_before"] == {"step": 0, "full": curve[0]["ppl_full"], "ansan": curve[0]["ppl_ansan"]}
        assert t["heldout_ppl_after"]["step"] == 2
        assert all(row["ppl_ansan"] >= row["ppl_full"] for row in curve), (name, curve)
    # The first step's loss is that of the untrained SmolLM2-135M, which predicts worse under the AnSAN mask.
    assert report["training"]["control"]["first_loss"] < report["training"]["ep"]["first_loss"]


@pytest.mark.slow
def test_smoke_files_and_printout(smoke: tuple[Path, dict, str]) -> None:
    out, report, stdout = smoke
    for png in ("loss_curves.png", "learning_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --publish holds the small outputs, byte for byte, and none of the checkpoints.
    published = {p.relative_to(out / "published") for p in (out / "published").rglob("*") if p.is_file()}
    expected = {Path(f) for f in ("results.json", "results.md", "learning_curves.png", "loss_curves.png")}
    expected |= {
        Path("runs") / r / f for r in ("control", "ep", "ac") for f in ("metrics.jsonl", "eval.jsonl", "config.yaml")
    }
    expected |= {Path("eval") / m / f for m in MODELS for f in ("results.json", "results.md", "loglikelihoods.json")}
    expected |= {Path("timing") / m / "results.json" for m in ("ep", "ac")}
    assert published == expected
    assert (out / "published" / "results.json").read_bytes() == (out / "results.json").read_bytes()
    assert list(report["stage_seconds"]) == list(STAGES)
    assert all(v >= 0 for v in report["stage_seconds"].values())
    assert report["total_seconds"] >= sum(report["stage_seconds"].values()) - 1e-6
    md = (out / "results.md").read_text()
    assert "SMOKE RUN" in md
    header = "| model | mode | winogrande | avg | KV red. % rows | KV red. % prefix | time ratio |"
    assert md.count(header) == 2
    labels = ("SmolLM2-135M (base)", "control (full attention)", "AnLLM-EP", "AnLLM-AC")
    data_rows = [line for line in md.splitlines() if line.startswith(tuple(f"| {label} | " for label in labels))]
    assert len(data_rows) == 14 and all(line.count("|") == header.count("|") for line in data_rows)
    for avg in ("65.8", "64.6", "65.1"):
        assert f"| {avg} |" in md
    for stage in STAGES:
        assert stage in stdout
    assert f"commit {report['commit']}" in stdout and report["hardware"] in stdout


def test_bad_input_is_refused() -> None:
    r = _run("--smoke", "--tasks", "nosuchtask", timeout=300)
    assert r.returncode == 2 and "unknown task 'nosuchtask'" in r.stderr, r.stderr[-2000:]
    r = _run("--limit", "-1", timeout=300)
    assert r.returncode == 2 and "--limit must be >= 0" in r.stderr


@pytest.mark.slow
def test_a_rerun_reuses_every_finished_stage(smoke: tuple[Path, dict, str]) -> None:
    """Rerunning the same command does no training or scoring again and reports the same table."""
    out, report, _ = smoke
    r = _run("--smoke", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == report["rows"] and again["timing"] == report["timing"]
    assert again["training"] == report["training"]
    log = r.stdout + r.stderr
    assert log.count("reusing the finished run") == 3
    assert log.count("winogrande: taken from") == 2 * 4 + 2  # 0 and 5 shots of four models, then the timing
    assert "step 1/2" not in log
    # --report rebuilds the tables, checks and paired differences from the files, keeping the run's stage times.
    r = _run("--smoke", "--report", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rebuilt = json.loads((out / "results.json").read_text())
    assert rebuilt["stage_seconds"] == again["stage_seconds"] and rebuilt["rows"] == again["rows"]
    assert [(p["a"], p["b"]) for p in rebuilt["paired"]] == [(p["a"], p["b"]) for p in again["paired"]]
    assert "## Paired differences" in (out / "results.md").read_text()


def test_the_three_runs_differ_only_in_their_mask() -> None:
    """Every profile trains the control, EP and AC on the same data, order, steps, batch and learning rate."""
    driver = _driver()
    for profile in driver.PROFILES.values():
        configs = {}
        for name in driver.RUNS:
            cfg = driver._train_config(name, Path("/o"), f"/o/base-{name}", "/o/corpus", profile).to_dict()
            assert (cfg["run_name"], cfg["data"]["anchor_mode"]) == (name, driver.RUNS[name])
            for key in ("run_name", "load_parameters_path"):
                cfg.pop(key)
            cfg["data"].pop("anchor_mode")
            configs[name] = cfg
        assert configs["control"] == configs["ep"] == configs["ac"], profile.name
        assert configs["ep"]["eval"]["every_steps"] > 0  # learning curves in every profile


def _driver():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is being executed
    spec.loader.exec_module(module)
    return module


def test_workers_run_at_most_jobs_at_once_and_failures_name_their_log(tmp_path: Path) -> None:
    driver = _driver()
    script = "import os, sys, time; print('start', time.time(), os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']); "
    script += "time.sleep(0.6); print('end', time.time())"
    commands = {f"w{i}": [sys.executable, "-c", script] for i in range(3)}
    texts = driver.run_workers(commands, tmp_path, jobs=2)
    spans = {}
    for name, text in texts.items():
        (_, start, fraction), (_, end) = (line.split() for line in text.splitlines())
        spans[name] = (float(start), float(end))
        assert float(fraction) == pytest.approx(driver.WORKER_MEMORY / 2, abs=1e-3)
        assert (tmp_path / "logs" / f"{name}.log").read_text() == text
    # w2 waits for a free slot: it starts only after w0 or w1 has ended.
    assert spans["w2"][0] >= min(spans["w0"][1], spans["w1"][1])
    assert spans["w1"][0] < spans["w0"][1]
    bad = {"ok": [sys.executable, "-c", "print('fine')"], "bad": [sys.executable, "-c", "print('boom'); exit(3)"]}
    with pytest.raises(RuntimeError, match=r"bad failed:\n--- bad .*\nboom"):
        driver.run_workers(bad, tmp_path, jobs=2)


@pytest.mark.slow
def test_worker_processes_give_the_same_results(smoke: tuple[Path, dict, str]) -> None:
    """--jobs 2 (the GPU default's path: train and eval as separate processes sharing a compilation cache) trains
    and scores exactly as the in-process run. Runs last: it replaces the shared run's trainings and evaluations."""
    out, report, _ = smoke
    for folder in ("runs", "eval", "timing"):
        shutil.rmtree(out / folder)
    r = _run("--smoke", "--jobs", "2", "--out", str(out), timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    workers = json.loads((out / "results.json").read_text())
    assert workers["jobs"] == 2
    assert list(workers["stage_seconds"]) == ["convert", "prepare", "train", "eval", "timing", "report"]
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(
        [f"train-{run}.log" for run in ("control", "ep", "ac")] + [f"eval-{m}.log" for m in MODELS]
    )
    for run in ("control", "ep", "ac"):
        for key in ("steps", "tokens", "first_loss", "final_loss"):
            assert workers["training"][run][key] == report["training"][run][key], (run, key)
    strip = lambda row: {k: v for k, v in row.items() if k != "time_ratio"}
    assert [strip(row) for row in workers["rows"]] == [strip(row) for row in report["rows"]]
    for name in ("ep", "ac"):
        assert workers["timing"][name]["max_abs_loglik_diff"] == report["timing"][name]["max_abs_loglik_diff"]
