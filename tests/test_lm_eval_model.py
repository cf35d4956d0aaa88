"""The lm-evaluation-harness model `anllm-jax`: the 8 benchmarks through lm-eval equal `anllm_jax.eval`, and a
generation task and a rolling-perplexity task run end to end against brute-force masked forwards. No hub: every
task is a YAML over local JSON files."""

# ruff: noqa: E402  (no hub: the offline switches are set before lm-eval and datasets read them)
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util
import json

import jax
import lm_eval
import numpy as np
import pytest

from anllm_jax import checkpoints, formats, lm_eval_model, masks, tasks
from anllm_jax import eval as ev
from anllm_jax.config import preset
from anllm_jax.model import init_model
from anllm_jax.tokenizer import Tokenizer

DOCS = 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A tiny random EP model ("." anchors) over the 32k-piece sentencepiece vocabulary, exported as HF."""
    sp = os.path.join(os.path.dirname(importlib.util.find_spec("mistral_common").origin), "data", "tokenizer.model.v1")
    tok = Tokenizer.from_sentencepiece(sp)
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, max_seq_len=2048)
    model, tok = checkpoints.set_anchor_mode(init_model(cfg, seed=3), tok, "ep")
    path = str(tmp_path_factory.mktemp("lm_eval") / "tiny_ep")
    formats.export_hf(model, tok, path)
    return path


@pytest.fixture(scope="module")
def loaded(ckpt):
    return checkpoints.load(ckpt, dtype="float32")


def _evaluate(ckpt: str, include: str, names: list[str], limit: int, **model_args) -> dict:
    from lm_eval.tasks import TaskManager

    args = ",".join(f"{k}={v}" for k, v in {"checkpoint": ckpt, **model_args}.items())
    # include_defaults=False: indexing lm-eval's thousands of built-in task files takes tens of seconds.
    manager = TaskManager(include_path=include, include_defaults=False)
    return lm_eval.simple_evaluate(
        model=lm_eval_model.NAME,
        model_args=args,
        tasks=names,
        task_manager=manager,
        limit=limit,
        log_samples=True,
        batch_size=8,
        cache_requests=False,
    )


def _option_lls(samples: list[dict]) -> dict[int, list[float]]:
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}


def test_eight_tasks_equal_the_eval_cli(ckpt, loaded, tmp_path):
    """lm-eval's own task definitions over the registry packages' validation rows, scored by the plugin, give the
    per-document option log-likelihoods of `anllm_jax.eval` (0-shot), for the anchor cache and the full cache."""
    names = lm_eval_model.write_tasks(str(tmp_path / "tasks"), limit=DOCS)
    model, tok = loaded
    for cache, mode in (("anchor", "anchor-cache"), ("full", "full")):
        out = _evaluate(ckpt, str(tmp_path / "tasks"), [lm_eval_model.LOCAL_TAG], DOCS, cache=cache)
        for name in tasks.TASKS:
            _, ours = ev.evaluate_task(model, tok, name, 0, [mode], DOCS, progress=False)
            got = _option_lls(out["samples"][name + lm_eval_model.LOCAL_SUFFIX])
            assert sorted(got) == list(range(DOCS)), name
            for d in range(DOCS):
                np.testing.assert_allclose(got[d], ours[mode][d], atol=1e-4, rtol=0, err_msg=f"{name} {cache}")
        info = out["config"]
        assert info["anllm_cache"] == cache and info["anllm_anchor_ids"] == list(model.cfg.anchor_ids)
        assert (info["kv_entries_kept"] < info["kv_entries_full"]) == (cache == "anchor")
    assert names == [n + lm_eval_model.LOCAL_SUFFIX for n in tasks.TASKS]


def _write_task(folder, name: str, rows: list[dict], spec: dict) -> None:
    folder.mkdir(exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data)}}}
    (folder / f"{name}.yaml").write_text(json.dumps(base | {"validation_split": "validation"} | spec))


def _padded_forward(model, mask, width: int = 160):
    """Logits [T, V] of one row under `mask`, padded to one shape (one compilation)."""
    fn = jax.jit(lambda t, s: model(t, segment_ids_BT=s, mask=mask))

    def forward(ids: list[int]) -> np.ndarray:
        tokens, segs = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
        tokens[0, : len(ids)], segs[0, : len(ids)] = ids, 1
        return np.asarray(fn(tokens, segs), np.float64)[0, : len(ids)]

    return forward


def test_generation_task_end_to_end(ckpt, loaded, tmp_path):
    """A generate_until task: the plugin's anchor-cache greedy text equals greedy decoding by a whole masked forward
    per step (AnSAN), cut at the task's stop strings."""
    rows = [{"question": d.query, "answer": d.choices[d.gold]} for d in tasks.load_task("sciq").docs[:3]]
    until = ["\n", "Question:"]
    spec = {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": until, "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    _write_task(tmp_path / "gen", "tiny_gen", rows, spec)
    out = _evaluate(ckpt, str(tmp_path / "gen"), ["tiny_gen"], 3, cache="anchor", max_length=160)
    model, tok = loaded
    forward = _padded_forward(model, "anchor")
    samples = sorted(out["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == 3
    for s, row in zip(samples, rows, strict=True):
        ids = tok.encode(row["question"])[-(160 - 6) :]
        new = []
        for _ in range(6):
            new.append(int(np.argmax(forward(ids + new)[-1])))
            if new[-1] == tok.eos_id:
                break
        text = tok.decode([t for t in new if t != tok.eos_id])
        cuts = [text.index(u) for u in until if u in text]
        assert s["resps"][0][0] == (text[: min(cuts)] if cuts else text)
    assert "exact_match,none" in out["results"]["tiny_gen"]


def test_rolling_perplexity_task_end_to_end(ckpt, loaded, tmp_path):
    """A loglikelihood_rolling task under a StreamingLLM cache, in windows of max_length=48 tokens: each text's
    log-likelihood is the sum over lm-eval's windows of a float64 log-softmax of one masked forward per window."""
    from lm_eval import utils as lm_utils

    supports = [d.query.split("\nQuestion:")[0] for d in tasks.load_task("sciq").docs]
    texts = [t for t in supports if 300 < len(t) < 600][:2]
    spec = {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
    }
    _write_task(tmp_path / "roll", "tiny_roll", [{"text": t} for t in texts], spec)
    args = {"cache": "streaming", "sinks": 2, "window": 16, "max_length": 48}
    out = _evaluate(ckpt, str(tmp_path / "roll"), ["tiny_roll"], 2, **args)
    model, tok = loaded
    forward = _padded_forward(model, masks.Policy("streaming", sinks=2, window=16), width=64)
    samples = sorted(out["samples"]["tiny_roll"], key=lambda s: s["doc_id"])
    for s, text in zip(samples, texts, strict=True):
        windows = lm_utils.get_rolling_token_windows(tok.encode(text), tok.bos_id, 48, 1)
        expected, n_windows = 0.0, 0
        for ctx, cont in map(lm_utils.make_disjoint_window, windows):
            ids = ctx + cont
            logits = forward(ids)
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
            expected += sum(logp[t - 1, ids[t]] for t in range(len(ids) - len(cont), len(ids)))
            n_windows += 1
        assert n_windows > 1  # the text is longer than one window
        assert abs(s["resps"][0][0] - expected) < 1e-3 * max(1.0, abs(expected) / 100)
    assert out["results"]["tiny_roll"]["word_perplexity,none"] > 1
    assert out["config"]["kv_entries_kept"] < out["config"]["kv_entries_full"]


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("checkpoint={ckpt},colour=red", "unknown model argument(s) colour for --model anllm-jax"),
        ("checkpoint={ckpt}/missing", "missing does not exist"),
        ("cache=anchor", "needs --model_args checkpoint=PATH"),
        ("checkpoint={ckpt},cache=sliding", "policy 'sliding' is not one of"),
    ],
)
def test_bad_model_arguments_are_one_line_errors(ckpt, capsys, model_args, message):
    """Checked before lm-eval indexes its tasks (tens of seconds) or anything loads."""
    argv = ["--model", "anllm-jax", "--model_args", model_args.format(ckpt=ckpt), "--tasks", "arc_easy"]
    assert lm_eval_model.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anllm_jax.lm_eval_model: error:") and message in err[0], err
