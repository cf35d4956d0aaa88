"""Eval runner: transformers parity (real SmolLM2, full mode), anchor cache == AnSAN, tokenization, CLI."""

import json

import jax
import numpy as np
import pytest

from anllm_jax import eval as ev
from anllm_jax import tasks
from anllm_jax.config import preset
from anllm_jax.model import init_model

DOT = ord(".")
AC = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids; id 256 is <AC>."""

    def encode(self, text, add_bos=False):
        return list(text.encode("utf-8"))

    def token_to_id(self, token):
        assert token == "<AC>"
        return AC


@pytest.fixture(scope="module")
def ep_model():
    return init_model(preset("tiny", anchor_mode="ep", anchor_ids=(DOT,), max_seq_len=8192), seed=0)


@pytest.fixture(scope="module")
def ac_model():
    return init_model(preset("tiny", vocab_size=257, anchor_mode="ac", anchor_ids=(AC,), max_seq_len=8192), seed=1)


# ------------------------------------------------------------------------------------------------------------
# Real model against transformers


@pytest.fixture(scope="module")
def smollm2():
    from anllm_jax import checkpoints
    from bench import eval_parity

    model, tokenizer = checkpoints.load(checkpoints.smollm2_gguf_path(), dtype="float32")
    return model, tokenizer, eval_parity.load_hf_reference(checkpoints.smollm2_gguf_path())


@pytest.mark.slow
def test_full_mode_loglikelihoods_match_transformers(smollm2):
    from bench import eval_parity

    model, tokenizer, hf = smollm2
    report = eval_parity.compare(tasks.TASKS, 1, 0, model, tokenizer, hf)
    assert set(report) == set(tasks.TASKS)
    for name, r in report.items():
        assert r["docs"] == 1, name
        assert r["max_abs_diff"] < 1e-3, (name, r)
        assert r["same_acc"] == r["same_acc_norm"] == 1, (name, r)


@pytest.mark.slow
def test_fewshot_tokens_match_harness_tokenization(smollm2):
    """Demonstrations encoded one by one give the tokens the harness gets from the whole prompt string."""
    _, tokenizer, (_, hf_tokenizer) = smollm2
    enc_hf = lambda s: hf_tokenizer(s, add_special_tokens=False)["input_ids"]
    for name in tasks.TASKS:
        demos, docs = tasks.fewshot(tasks.load_task(name), 5)
        enc = tasks.encode_task(tokenizer, name, demos, docs[:1])
        for o, (context, continuation) in enumerate(tasks.harness_requests(docs[0], demos)):
            whole, ctx = enc_hf(context + continuation), enc_hf(context)
            ours_ctx, ours_cont = enc.options[0][o]
            assert enc.prefix + ours_ctx == ctx, name
            assert ours_cont == whole[len(ctx) :], name


# ------------------------------------------------------------------------------------------------------------
# Anchor cache against one masked forward


@pytest.mark.parametrize(("name", "shots"), [("sciq", 1), ("winogrande", 0), ("arc_easy", 2)])
def test_anchor_cache_equals_ansan_ep(ep_model, name, shots):
    r, lls = ev.evaluate_task(ep_model, ByteTokenizer(), name, shots, ["ansan", "anchor-cache"], 2, progress=False)
    a, c = lls["ansan"], lls["anchor-cache"]
    assert len(a) == len(c) == 2
    for x, y in zip(a, c, strict=True):
        assert np.argmax(x) == np.argmax(y)
        np.testing.assert_allclose(x, y, atol=1e-3, rtol=0)
    # The mode's accounting shows the compaction ("." closes every WinoGrande sentence and SciQ passage).
    stats = r["modes"]["anchor-cache"]
    assert stats["kv_kept"] < stats["kv_full"]
    assert stats["prefills"] == (1 if shots else 2)
    if name == "sciq":
        assert stats["prefix_entries_kept"] < stats["prefix_tokens"]


@pytest.mark.parametrize("name", ["sciq", "hellaswag"])
def test_full_mode_with_demonstrations_equals_causal_forward(ep_model, name):
    """Few-shot full mode scores against the demonstrations' full KV cache: the same log-likelihoods as one
    causal forward over each whole prompt."""
    r, lls = ev.evaluate_task(ep_model, ByteTokenizer(), name, 2, ["full"], 3, progress=False)
    assert r["modes"]["full"]["prefills"] == 1
    assert r["modes"]["full"]["prefix_entries_kept"] == r["modes"]["full"]["prefix_tokens"] > 0
    demos, docs = tasks.fewshot(tasks.load_task(name), 2)
    enc = tasks.encode_task(ByteTokenizer(), name, demos, docs[:3])
    forward = ev.score_masked(ep_model, enc, "full", progress=False)[0]
    for x, y in zip(lls["full"], forward, strict=True):
        assert np.argmax(x) == np.argmax(y)
        np.testing.assert_allclose(x, y, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["sciq", "piqa"])
def test_cached_modes_equal_masked_forward_in_float64(name):
    """In float64 the cached scores equal the masked forward to rounding (1e-9), for the anchor cache and the full
    cache alike: the ~1e-3 gaps seen in float32 on long option sums are rounding, not a difference in function."""
    with jax.enable_x64(True):
        model = init_model(preset("tiny", dtype="float64", anchor_mode="ep", anchor_ids=(DOT,), max_seq_len=4096))
        _, lls = ev.evaluate_task(model, ByteTokenizer(), name, 2, ["full", "ansan", "anchor-cache"], 2, progress=False)
        demos, docs = tasks.fewshot(tasks.load_task(name), 2)
        full = ev.score_masked(
            model, tasks.encode_task(ByteTokenizer(), name, demos, docs[:2]), "full", progress=False
        )[0]
    for x, y in zip(lls["ansan"], lls["anchor-cache"], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-9, rtol=0)
    for x, y in zip(full, lls["full"], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-9, rtol=0)


def test_anchor_cache_equals_ansan_ac(ac_model):
    r, lls = ev.evaluate_task(ac_model, ByteTokenizer(), "arc_easy", 2, ["ansan", "anchor-cache"], 2, progress=False)
    for x, y in zip(lls["ansan"], lls["anchor-cache"], strict=True):
        assert np.argmax(x) == np.argmax(y)
        np.testing.assert_allclose(x, y, atol=1e-3, rtol=0)
    # Only the two <AC> anchors of the demonstrations survive in the prefix cache.
    assert r["modes"]["anchor-cache"]["prefix_entries_kept"] == 2
    assert r["modes"]["ansan"]["kv_reduction"] > 0.5
    assert r["modes"]["ansan"]["acc_norm"] is not None


def test_masked_scores_equal_unpadded_rows(ep_model):
    """Batched, padded, bucketed scoring equals each row scored alone without padding (float64 softmax), and so
    does its greedy flag (every option token the argmax)."""
    demos, docs = tasks.fewshot(tasks.load_task("sciq"), 1)
    enc = tasks.encode_task(ByteTokenizer(), "sciq", demos, docs[:1])
    lls, greedy = ev.score_masked(ep_model, enc, "model", progress=False)
    batched = lls[0]
    forward = jax.jit(lambda t: ep_model(t, mask="anchor"))
    for o, (ctx, cont) in enumerate(enc.options[0]):
        row = np.asarray([enc.prefix + ctx + cont], np.int32)
        logits = np.asarray(forward(row), np.float64)[0]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
        n = row.shape[1]
        expected = sum(logp[t - 1, row[0, t]] for t in range(n - len(cont), n))
        assert abs(batched[o] - expected) < 1e-3
        assert greedy[0][o] == all(np.argmax(logp[t - 1]) == row[0, t] for t in range(n - len(cont), n))


# ------------------------------------------------------------------------------------------------------------
# Tokenization


def test_ac_after_each_demonstration_and_sentence():
    demos = [tasks.Doc("First one. Second one.", ("yes",), 0), tasks.Doc("Third.", ("no",), 0)]
    tok = ByteTokenizer()
    ids = tasks.encode_demonstrations(tok, demos, AC)
    assert ids == tok.encode("First one. Second one. yes") + [AC] + tok.encode("\n\nThird. no") + [AC]
    ids = tasks.encode_demonstrations(tok, demos, AC, ac_sentences=True)
    assert ids == (
        tok.encode("First one.") + [AC] + tok.encode(" Second one. yes") + [AC] + tok.encode("\n\nThird. no") + [AC]
    )
    assert tasks.encode_demonstrations(tok, demos) == tok.encode("First one. Second one. yes\n\nThird. no")


def test_encode_pair_moves_trailing_space():
    tok = ByteTokenizer()
    assert tasks.encode_pair(tok, "Answer: ", "yes") == (tok.encode("Answer:"), tok.encode(" yes"))


def test_empty_option_tokens_error():
    class Silent(ByteTokenizer):
        def encode(self, text, add_bos=False):
            return [] if text.endswith("!") else super().encode(text)

    doc = tasks.Doc("Q", ("fine", "!"), 0)
    with pytest.raises(ValueError, match="piqa document 0 option 1 encodes to no tokens"):
        tasks.encode_task(Silent(), "piqa", [], [doc])


# ------------------------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "arc_esay"], "unknown task 'arc_esay' (did you mean arc_easy"),
        (["--tasks", "arc_challenge", "--shots", "5000"], "fewer than --shots 5000"),
        (["--mode", "full,cached"], "unknown mode 'cached'"),
        (["--shots", "five"], "--shots 'five' must be an integer"),
        (["--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_cli_errors(capsys, args, message):
    assert ev.main(["--checkpoint", "/nonexistent", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_missing_checkpoint(capsys):
    assert ev.main(["--checkpoint", "/nonexistent/model.gguf", "--tasks", "boolq", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anllm_jax.eval: error: ") and "does not exist" in err and len(err.splitlines()) == 1


def test_cli_writes_reports(tmp_path, monkeypatch, capsys, ep_model):
    monkeypatch.setattr(ev, "_load", lambda checkpoint, dtype: (ep_model, ByteTokenizer()))
    out = tmp_path / "out"
    argv = ["--checkpoint", "tiny", "--tasks", "boolq", "--shots", "1", "--limit", "2", "--no-progress"]
    assert ev.main([*argv, "--mode", "no-cache,anchor-cache", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["shots"] == [1] and results["modes"] == ["no-cache", "anchor-cache"]
    r = results["results"]["1"]["boolq"]
    assert r["n"] == 2 and r["time_ratio_no_cache_over_anchor_cache"] > 0
    for mode in results["modes"]:
        m = r["modes"][mode]
        assert set(m) >= {"acc", "acc_norm", "n", "kv_full", "kv_kept", "kv_reduction", "seconds"}
        assert 0 <= m["acc"] <= 1 and m["acc_norm"] is None  # BoolQ has no length-normalised accuracy
        assert m["kv_kept"] <= m["kv_full"]
    lls = json.loads((out / "loglikelihoods.json").read_text())
    assert np.asarray(lls["1"]["boolq"]["anchor-cache"]).shape == (2, 2)
    np.testing.assert_allclose(lls["1"]["boolq"]["anchor-cache"], lls["1"]["boolq"]["no-cache"], atol=1e-3)
    table = (out / "results.md").read_text()
    assert "| boolq | anchor-cache | 2 |" in table and "### 1-shot" in table
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| boolq | no-cache | 2 |" in capsys.readouterr().out
    assert results["complete"] is True and "Partial" not in table


def test_stopped_run_keeps_finished_tasks(tmp_path, monkeypatch, ep_model):
    """Reports are rewritten after every task: a run that dies on its second task keeps the first."""
    real = ev.evaluate_task

    def dies_on_boolq(model, tokenizer, name, *args, **kwargs):
        if name == "boolq":
            raise KeyboardInterrupt
        return real(model, tokenizer, name, *args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_task", dies_on_boolq)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ev.run(ep_model, ByteTokenizer(), ["piqa", "boolq"], [0], ["full"], 2, progress=False, output=str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and list(results["results"]["0"]) == ["piqa"]
    assert results["results"]["0"]["piqa"]["modes"]["full"]["n"] == 2
    assert (out / "results.md").read_text().startswith("**Partial results**")

    # --resume takes piqa from the stopped run and evaluates only boolq.
    evaluated = []
    monkeypatch.setattr(
        ev, "evaluate_task", lambda m, t, name, *a, **k: evaluated.append(name) or real(m, t, name, *a, **k)
    )
    resumed, lls = ev.run(
        ep_model, ByteTokenizer(), ["piqa", "boolq"], [0], ["full"], 2, progress=False, output=str(out), resume=True
    )
    assert evaluated == ["boolq"] and resumed["complete"] is True
    assert resumed["results"]["0"]["piqa"] == results["results"]["0"]["piqa"] and len(lls["0"]["boolq"]["full"]) == 2
    with pytest.raises(ValueError, match=r"other settings \(limit\); drop --resume"):
        ev.run(ep_model, ByteTokenizer(), ["piqa"], [0], ["full"], 3, progress=False, output=str(out), resume=True)


def test_parse_shots_and_modes():
    assert ev.parse_shots("0,5") == [0, 5]
    assert ev.parse_modes("ansan, full,ansan") == ["ansan", "full"]
    with pytest.raises(ValueError, match="must hold integers >= 0"):
        ev.parse_shots("-1")


def test_cli_checks_its_output_folder_before_scoring(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert ev.main(["--checkpoint", "/nonexistent", "--tasks", "boolq", "--output", str(tmp_path / "a_file")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--output {tmp_path / 'a_file'} is not writable" in err and len(err.splitlines()) == 1
