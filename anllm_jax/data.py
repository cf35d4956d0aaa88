"""Training data: corpus preparation, anchor-aware tokenization, sharded and resumable grain loading.

API used by the trainer:

    cfg = config.DataConfig(path="data/corpus", anchor_mode="ac", seq_len=4096, packing=False, shuffle_seed=0)
    it = make_iterator(cfg, tokenizer, global_batch_size, jax.process_index(), jax.process_count())
    batch = next(it)             # process-local numpy: {"tokens": int32[b, T], "segment_ids": int32[b, T]}
    arrays = to_global(batch, sharding)   # global jax.Arrays, b * process_count rows
    state = it.get_state()       # JSON-serialisable dict; save one per process in every checkpoint
    it.set_state(state)          # a fresh iterator continues with exactly the same batches

- `b = global_batch_size // process_count`. With `split_by="rows"` (the default) every process reads the whole
  stream and keeps rows `[process_index * b, (process_index + 1) * b)` of each global batch, so the global batch is
  the same for any process count; with `split_by="documents"` each process reads only documents
  `process_index::process_count`.
- `segment_ids`: 1 for the tokens of a one-document row, 1..n for the documents of a packed row, 0 for padding.
  Padding positions hold `tokenizer.pad_id` (0 if it has none); segment_ids == 0 is what marks them.
  Targets are the next token, shifted by the trainer, which also drops targets across segment boundaries.
- Documents start with BOS when the tokenizer has one (and `add_bos`). In anchor_mode "ac" the `<AC>` id follows
  the last token of every sentence (`anllm_jax.sentences`); in "ep" and "full" the text is tokenized as is.
- Shuffling is seeded and differs per epoch; the stream repeats over epochs (`num_epochs=None`) or stops after
  `num_epochs`, the last batch then filled with padding rows. Tokenization runs on the fly inside grain, so the
  iterator state is just a few positions and resuming is instant.

`python -m anllm_jax.data prepare [--source registry|PATH ...] [--output DIR] [--val-fraction F]` writes the raw
documents as a tfds dataset (array_record) under DIR; see `anllm_jax.corpus.sources` for the accepted files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from anllm_jax import records
from anllm_jax.anchors import TextTokenizer, ac_id, encode_document, encode_prefix
from anllm_jax.config import DataConfig
from anllm_jax.corpus import REGISTRY, AnllmCorpus, iter_documents

DATASET_NAME = "anllm_corpus"
PREPARE_RECORD = "prepare.json"
PREPARE_WRITER = "anllm_jax.data prepare"


# ----------------------------------------------------------------------------------------------------------------
# Corpus preparation


def _split_validation(keys: Sequence[str], val_fraction: float) -> frozenset[str]:
    """A fixed-seed random share of whole documents (at least one, at most all but one)."""
    if val_fraction <= 0 or len(keys) < 2:
        return frozenset()
    n_val = min(max(round(len(keys) * val_fraction), 1), len(keys) - 1)
    chosen = np.random.default_rng(0).choice(len(keys), size=n_val, replace=False)
    return frozenset(keys[i] for i in chosen)


def scan_sources(sources: Sequence[str], max_docs: int | None = None) -> tuple[list[str], dict[str, Any]]:
    """Read every source once: the keys of the non-empty documents and counts. Raises on unusable input."""
    keys: list[str] = []
    seen: set[str] = set()
    per_source: dict[str, dict[str, int]] = {}
    empty = 0
    for source in sources:
        for doc in iter_documents(source, max_docs):
            if not doc.text.strip():
                empty += 1
                continue
            if doc.key in seen:
                raise ValueError(f"two documents are named {doc.key!r}; give the corpus folders different names")
            seen.add(doc.key)
            keys.append(doc.key)
            counts = per_source.setdefault(doc.source if source == REGISTRY else source, dict(documents=0, words=0))
            counts["documents"] += 1
            counts["words"] += len(doc.text.split())
    if not keys:
        raise ValueError(f"all {empty} documents in {', '.join(sources)} are empty; nothing to train on")
    stats = {
        "documents": len(keys),
        "words": sum(c["words"] for c in per_source.values()),
        "empty_skipped": empty,
        "sources": per_source,
    }
    return keys, stats


def prepare(
    sources: Sequence[str] = (REGISTRY,),
    output: str = "data/corpus",
    val_fraction: float = 0.01,
    max_docs: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build the raw-document tfds dataset under `output`; returns the dataset folder.

    An existing dataset built from the same arguments is reused; a different one, or files edited since, need
    `overwrite=True`. The folder is written whole into a temporary sibling and renamed into place; it may hold
    only an earlier output of `prepare` (records.check_output_dir), never a source.
    """
    if not sources:
        raise ValueError(f"no corpus source given; pass '{REGISTRY}' or folders of .txt/.jsonl files")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    spec = {
        "sources": [s if s == REGISTRY else str(Path(s).expanduser().resolve()) for s in sources],
        "val_fraction": val_fraction,
        "max_docs": max_docs,
    }
    out = Path(output)
    record_path = out / PREPARE_RECORD
    if record_path.is_file() and not overwrite:
        record = json.loads(record_path.read_text())
        if record["spec"] == spec and Path(record["dataset_dir"]).exists():
            return Path(record["dataset_dir"])
        raise ValueError(f"{out} holds a corpus prepared from {record['spec']}; pass --overwrite to replace it")
    inputs = [s for s in spec["sources"] if s != REGISTRY]
    records.check_output_dir(out, PREPARE_WRITER, overwrite, inputs)
    keys, stats = scan_sources(spec["sources"], max_docs)
    validation_keys = _split_validation(keys, val_fraction)

    def write(tmp: str) -> None:
        builder = AnllmCorpus(sources=spec["sources"], validation_keys=validation_keys, max_docs=max_docs, data_dir=tmp)
        builder.download_and_prepare()
        stats["splits"] = {name: info.num_examples for name, info in builder.info.splits.items()}
        final = out.resolve() / Path(builder.data_dir).resolve().relative_to(Path(tmp).resolve())
        records.write_json(Path(tmp) / PREPARE_RECORD, {"spec": spec, "dataset_dir": str(final), "stats": stats})

    records.replace_dir(out, write, PREPARE_WRITER, overwrite, inputs)
    return Path(json.loads(record_path.read_text())["dataset_dir"])


def dataset_dir(path: str | Path) -> Path:
    """The tfds dataset folder of a prepared corpus, given it or the `prepare --output` folder above it."""
    p = Path(path).expanduser()
    if (p / "dataset_info.json").exists():
        return p
    versions = sorted((p / DATASET_NAME).glob("*/dataset_info.json"), key=lambda f: tfds.core.Version(f.parent.name))
    if not versions:
        raise FileNotFoundError(f"no prepared corpus at {p}; run `python -m anllm_jax.data prepare --output {p}` first")
    return versions[-1].parent


def open_split(path: str | Path, split: str) -> Any:
    """Random-access source of the raw records ({"text": bytes, "source": bytes}) of one split."""
    builder = tfds.builder_from_directory(str(dataset_dir(path)))
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} is not in {path}; it has {', '.join(builder.info.splits)}")
    return builder.as_data_source(split=split)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _pad_value(tokenizer: TextTokenizer) -> int:
    return 0 if tokenizer.pad_id is None else int(tokenizer.pad_id)


def _one_document_row(ids: list[int], seq_len: int, pad: int) -> dict[str, np.ndarray]:
    n = min(len(ids), seq_len)
    tokens = np.full(seq_len, pad, np.int32)
    tokens[:n] = ids[:n]
    segment_ids = np.zeros(seq_len, np.int32)
    segment_ids[:n] = 1
    return {"tokens": tokens, "segment_ids": segment_ids}


class _PackIterator(grain.DatasetIterator):
    """Concatenates documents and cuts the stream into rows of `seq_len`; each piece of a document is a segment.

    The state is the parent's state before the current document plus how many of its tokens were emitted, so a
    restore replays nothing but that one document.
    """

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad = pad
        self._doc: np.ndarray | None = None
        self._doc_state = parent.get_state()
        self._offset = 0

    def __next__(self) -> dict[str, np.ndarray]:
        tokens = np.full(self._seq_len, self._pad, np.int32)
        segment_ids = np.zeros(self._seq_len, np.int32)
        filled = segment = 0
        while filled < self._seq_len:
            if self._doc is None or self._offset == len(self._doc):
                state = self._parent.get_state()
                try:
                    doc = next(self._parent)
                except StopIteration:
                    if filled == 0:
                        raise
                    break
                self._doc, self._doc_state, self._offset = doc, state, 0
            n = min(self._seq_len - filled, len(self._doc) - self._offset)
            segment += 1
            tokens[filled : filled + n] = self._doc[self._offset : self._offset + n]
            segment_ids[filled : filled + n] = segment
            filled += n
            self._offset += n
        return {"tokens": tokens, "segment_ids": segment_ids}

    def get_state(self) -> dict[str, Any]:
        return {"document": self._doc_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["document"])
        self._doc_state, self._offset = state["document"], state["offset"]
        self._doc = next(self._parent) if self._offset else None


class _Pack(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, seq_len: int, pad: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad = pad

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad)


def _fill_batch(batch: dict[str, np.ndarray], rows: int, pad: int) -> dict[str, np.ndarray]:
    """Pads the last, short batch of a finite stream with empty rows so that every batch has the same shape."""
    missing = rows - batch["tokens"].shape[0]
    if missing == 0:
        return batch
    return {
        "tokens": np.pad(batch["tokens"], ((0, missing), (0, 0)), constant_values=pad),
        "segment_ids": np.pad(batch["segment_ids"], ((0, missing), (0, 0))),
    }


def make_iterator(
    cfg: DataConfig,
    tokenizer: TextTokenizer,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Iterator over this process's batches {"tokens", "segment_ids"} (int32 [global_batch_size // count, T]).

    The iterator has `get_state()` / `set_state(state)`; the state is a JSON-serialisable dict.
    Process index and count default to `jax.process_index()` / `jax.process_count()`.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
        )
    local_batch = global_batch_size // process_count
    if cfg.anchor_mode == "ac":
        ac_id(tokenizer)  # fail now rather than inside a reader thread
    pad = _pad_value(tokenizer)
    by_rows = cfg.split_by == "rows"
    readers, reader = (1, 0) if by_rows else (process_count, process_index)

    source = open_split(cfg.path, cfg.split)
    ds = grain.MapDataset.source(source)[reader::readers]
    if len(ds) == 0:
        raise ValueError(
            f"split {cfg.split!r} of {cfg.path} has {len(source)} documents, fewer than process_count={process_count}"
        )
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    ds = ds.repeat(cfg.num_epochs)
    if cfg.packing:
        ds = ds.map(
            lambda r: np.asarray(encode_document(r["text"].decode(), tokenizer, cfg.anchor_mode, cfg.add_bos), np.int32)
        )
    else:
        ds = ds.map(
            lambda r: _one_document_row(
                encode_prefix(r["text"].decode(), tokenizer, cfg.anchor_mode, cfg.seq_len, cfg.add_bos),
                cfg.seq_len,
                pad,
            )
        )
    rows = global_batch_size if by_rows else local_batch
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * rows))
    if cfg.packing:
        it_ds = _Pack(it_ds, cfg.seq_len, pad)
    it_ds = it_ds.batch(rows, drop_remainder=False)
    if cfg.num_epochs is not None:
        it_ds = it_ds.map(lambda b: _fill_batch(b, rows, pad))
    if by_rows:
        mine = slice(process_index * local_batch, (process_index + 1) * local_batch)
        it_ds = it_ds.map(lambda b: {k: v[mine] for k, v in b.items()})
    return iter(it_ds)


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Global jax.Arrays from every process's local batch; `sharding` splits the batch axis over processes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class SyntheticIterator:
    """Deterministic random batches for benchmarks and tests: rows of 1-3 packed documents, a padded tail on some
    rows, and anchors at random positions (about one token in 12). The global batch depends only on (seed, step),
    so any process count sees the same data; each process yields its block of rows."""

    def __init__(
        self,
        vocab_size: int,
        anchor_ids: tuple[int, ...],
        seq_len: int,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        seed: int = 0,
    ):
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {process_count} processes")
        self.vocab_size, self.anchor_ids, self.seq_len = vocab_size, anchor_ids, seq_len
        self.global_batch_size, self.seed, self.step = global_batch_size, seed, 0
        rows = global_batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)

    def __iter__(self) -> SyntheticIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        B, T = self.global_batch_size, self.seq_len
        tokens = rng.integers(3, self.vocab_size, (B, T), dtype=np.int32)
        if self.anchor_ids:
            anchor = rng.random((B, T)) < 1 / 12
            tokens[anchor] = rng.choice(np.asarray(self.anchor_ids, np.int32), int(anchor.sum()))
        segment_ids = np.zeros((B, T), np.int32)
        for b in range(B):
            cuts = np.sort(rng.choice(np.arange(1, T), rng.integers(0, 3), replace=False))
            end = T if rng.random() < 0.5 else int(rng.integers(T // 2, T + 1))
            for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, T], strict=True), start=1):
                segment_ids[b, lo : min(hi, end)] = doc
        tokens[segment_ids == 0] = 0
        self.step += 1
        return {"tokens": tokens[self.rows], "segment_ids": segment_ids[self.rows]}

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anllm_jax.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the raw-document tfds dataset (array_record)")
    p.add_argument(
        "--source",
        nargs="+",
        default=[REGISTRY],
        help=f"'{REGISTRY}' (Wikipedia leads + King James Bible from installed packages) or .txt/.jsonl folders/files",
    )
    p.add_argument("--output", default="data/corpus", help="folder to write the dataset to (default: data/corpus)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--max-docs", type=int, default=None, help="keep only the first N documents of each source")
    p.add_argument("--overwrite", action="store_true", help="replace a corpus prepared with other arguments")
    args = parser.parse_args(argv)
    try:
        path = prepare(args.source, args.output, args.val_fraction, args.max_docs, args.overwrite)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"anllm_jax.data: error: {e}", file=sys.stderr)
        return 2
    stats = json.loads((Path(args.output) / PREPARE_RECORD).read_text())["stats"]
    print(f"prepared {path}")
    print(
        f"documents {stats['documents']:,} ({', '.join(f'{k} {v:,}' for k, v in stats['splits'].items())}), "
        f"words {stats['words']:,}, empty documents skipped {stats['empty_skipped']:,}"
    )
    for name, counts in stats["sources"].items():
        print(f"  {name}: {counts['documents']:,} documents, {counts['words']:,} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
