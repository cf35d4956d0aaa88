"""Data pipeline: corpus preparation (tfds array_record), anchor-aware tokenization, packing, sharding, resume."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from anllm_jax import anchors, data
from anllm_jax.config import DataConfig
from anllm_jax.masks import anchor_mask
from anllm_jax.sentences import split_sentences
from anllm_jax.tokenizer import Tokenizer

N_TXT, N_JSONL = 20, 10


def _doc(k: int) -> str:
    # Distinct, multi-sentence documents with abbreviations, decimals and quotes; "Document k" names them.
    extra = " ".join(f"Line {j} of it holds {k}.{j} units." for j in range(k % 5))
    return (
        f'Document {k} begins here. Dr. Smith measured 3.14 units on day {k}! Was it right? "Yes." {extra}\n'
        f"Then e.g. the U.S. Army came (on foot). The end"
    )


def _doc_ids(tokenizer: Tokenizer, tokens: np.ndarray) -> list[int]:
    return [int(k) for k in re.findall(r"Document (\d+) begins", tokenizer.decode(tokens.tolist()))]


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    """The Llama-style sentencepiece model mistral-common ships, with <AC> added."""
    model = Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"
    tok = Tokenizer.from_sentencepiece(str(model))
    tok.add_token("<AC>")
    return tok


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    """A small GPT-2-style byte-level BPE trained here, with <AC> added."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator([_doc(k) for k in range(40)], trainer)
    tok = Tokenizer(bpe=hf, bos_id=0)
    tok.add_token("<AC>")
    return tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A prepared corpus of 20 .txt documents and a .jsonl with 10; 10% held out. Returns (output dir, docs)."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    docs = {}
    for k in range(N_TXT):
        (src / "sub" / f"d{k:02d}.txt").write_text(_doc(k), encoding="utf-8")
        docs[f"src/sub/d{k:02d}.txt"] = _doc(k)
    lines = []
    for k in range(N_TXT, N_TXT + N_JSONL):
        lines.append(json.dumps({"text": _doc(k), "meta": k}))
        docs[f"src/more.jsonl:{len(lines)}"] = _doc(k)
    (src / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (src / "README.md").write_text("not a corpus file")
    out = root / "out"
    data.prepare([str(src)], str(out), val_fraction=0.1)
    return out, docs


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _train_doc_ids(corpus) -> set[int]:
    out, _ = corpus
    return {int(re.search(r"Document (\d+)", r["text"].decode()).group(1)) for r in data.open_split(out, "train")}


# ----------------------------------------------------------------------------------------------------------------
# Preparation


def test_prepare_writes_array_record_readable_without_tensorflow(corpus):
    out, docs = corpus
    ds_dir = data.dataset_dir(out)
    assert sorted(p.name for p in ds_dir.glob("*.array_record-*")) == [
        "anllm_corpus-train.array_record-00000-of-00001",
        "anllm_corpus-validation.array_record-00000-of-00001",
    ]
    sources = tfds.data_source("anllm_corpus", data_dir=str(out))
    train = [r["text"].decode() for r in sources["train"]]
    val = [r["text"].decode() for r in sources["validation"]]
    assert len(val) == 3 and len(train) == N_TXT + N_JSONL - 3
    assert sorted(train + val) == sorted(docs.values())
    assert {r["source"].decode().rsplit("/", 1)[-1] for r in sources["train"]} <= {"more.jsonl"} | {
        f"d{k:02d}.txt" for k in range(N_TXT)
    }
    assert "tensorflow" not in sys.modules
    stats = json.loads((out / data.PREPARE_RECORD).read_text())["stats"]
    assert stats["documents"] == N_TXT + N_JSONL and stats["empty_skipped"] == 0
    assert stats["words"] == sum(len(d.split()) for d in docs.values())
    # the same arguments reuse the dataset; other arguments need overwrite
    assert data.prepare([str(out.parent / "src")], str(out), val_fraction=0.1) == ds_dir
    with pytest.raises(ValueError, match="--overwrite"):
        data.prepare([str(out.parent / "src")], str(out), val_fraction=0.2)


def test_registry_slice_prepares_and_tokenizes(tmp_path, sp_tok):
    out = data.prepare(["registry"], str(tmp_path / "reg"), val_fraction=0.1, max_docs=25)
    stats = json.loads((tmp_path / "reg" / data.PREPARE_RECORD).read_text())["stats"]
    assert stats["sources"]["wiki"]["documents"] == 25 and stats["sources"]["kjv"]["documents"] == 25
    assert stats["splits"] == {"train": 45, "validation": 5}
    texts = [r["text"].decode() for r in data.open_split(out, "train")]
    assert any(t.startswith("In the beginning God created the heaven and the earth.") for t in texts)
    assert all("[" not in t for t in texts if "God" in t)  # KJV supplied-word brackets removed
    cfg = DataConfig(path=str(tmp_path / "reg"), anchor_mode="ac", seq_len=128, packing=True)
    batch = next(data.make_iterator(cfg, sp_tok, 4, 0, 1))
    assert batch["tokens"].shape == (4, 128) and (batch["segment_ids"] > 0).all()
    ac = sp_tok.anchor_ids("ac")[0]
    assert 0.01 < np.mean(batch["tokens"] == ac) < 0.2


# ----------------------------------------------------------------------------------------------------------------
# Tokenization


@pytest.mark.parametrize("tok_name", ["sp_tok", "bpe_tok"])
def test_ac_after_every_sentence(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    ac = tok.anchor_ids("ac")[0]
    for k in range(12):
        text = _doc(k)
        ids = anchors.encode_document(text, tok, "ac")
        assert ids[0] == tok.bos_id and ids[-1] == ac
        body = ids[1:]
        cuts = [i for i, t in enumerate(body) if t == ac]
        pieces = [body[a + 1 : b] for a, b in zip([-1, *cuts[:-1]], cuts, strict=True)]
        sentences = split_sentences(text)
        assert len(pieces) == len(sentences) > 4
        assert [tok.decode(p).strip() for p in pieces] == sentences
        # removing the anchors gives back the plain tokenization of the whole text
        assert [t for t in body if t != ac] == tok.encode(text)
        assert anchors.encode_document(text, tok, "ep") == [tok.bos_id, *tok.encode(text)]


@pytest.mark.parametrize("tok_name", ["sp_tok", "bpe_tok"])
def test_prompts_keep_an_unfinished_last_sentence_open(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    ac = tok.anchor_ids("ac")[0]
    closed = "Dr. Reed measured 2.5 m of rope. The river rose in the spring."
    assert anchors.encode_prompt(closed, tok, "ac") == anchors.encode_document(closed, tok, "ac", add_bos=False)
    assert anchors.encode_prompt(closed, tok, "ac").count(ac) == 2
    open_ = "Dr. Reed measured 2.5 m of rope. The capital of France is"
    ids = anchors.encode_prompt(open_, tok, "ac")
    assert ids.count(ac) == 1 and ids[-1] != ac
    assert [t for t in ids if t != ac] == tok.encode(open_)
    assert anchors.encode_prompt(open_, tok, "ep") == tok.encode(open_)
    assert anchors.encode_prompt("", tok, "ac", add_bos=True) == [tok.bos_id]
    for closed_end in ("The river rose…", "He said «it rose.»", "The river rose.)"):
        assert anchors.encode_prompt(closed_end, tok, "ac")[-1] == ac
    assert anchors.encode_prompt("The book was written by Dr.", tok, "ac")[-1] != ac


@pytest.mark.parametrize("tok_name", ["sp_tok", "bpe_tok"])
def test_long_documents_are_cut_exactly(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    text = " ".join(_doc(k) for k in range(60))
    for mode in ("ac", "full"):
        for max_len in (20, 64):
            assert len(text) > 8 * max_len
            assert anchors.encode_prefix(text, tok, mode, max_len) == anchors.encode_document(text, tok, mode)[:max_len]


def test_rows_are_truncated_padded_documents(corpus, sp_tok):
    out, _ = corpus
    texts = {
        int(re.search(r"Document (\d+)", r["text"].decode()).group(1)): r["text"].decode()
        for r in data.open_split(out, "train")
    }
    for mode, seq_len in [("ac", 256), ("full", 48)]:
        cfg = DataConfig(path=str(out), anchor_mode=mode, seq_len=seq_len, num_epochs=1)
        rows = 0
        for batch in data.make_iterator(cfg, sp_tok, 4, 0, 1):
            for tokens, seg in zip(batch["tokens"], batch["segment_ids"], strict=True):
                if not seg.any():
                    continue  # filler row of the last batch
                rows += 1
                (k,) = _doc_ids(sp_tok, tokens[:12])
                expected = anchors.encode_document(texts[k], sp_tok, mode)[:seq_len]
                n = len(expected)
                assert tokens[:n].tolist() == expected and (seg[:n] == 1).all()
                assert (seg[n:] == 0).all() and (tokens[n:] == 0).all()  # no pad id: padding holds 0
        assert rows == len(texts)
    cfg = DataConfig(path=str(out), anchor_mode="ep", seq_len=300, add_bos=False, shuffle=False, num_epochs=1)
    first = next(data.make_iterator(cfg, sp_tok, 2, 0, 1))["tokens"][0]
    text = data.open_split(out, "train")[0]["text"].decode()
    assert first[: len(sp_tok.encode(text))].tolist() == sp_tok.encode(text) and sp_tok.bos_id not in first
    # the "ac" rows above fit whole documents, the "full" rows were cut
    assert max(len(anchors.encode_document(t, sp_tok, "full")) for t in texts.values()) > 48


# ----------------------------------------------------------------------------------------------------------------
# Packing


def test_packed_rows_never_attend_across_documents(corpus, bpe_tok):
    out, _ = corpus
    ac = bpe_tok.anchor_ids("ac")
    cfg = DataConfig(path=str(out), anchor_mode="ac", seq_len=96, packing=True, num_epochs=1)
    batches = list(data.make_iterator(cfg, bpe_tok, 4, 0, 1))
    tokens = np.concatenate([b["tokens"] for b in batches])
    seg = np.concatenate([b["segment_ids"] for b in batches])
    assert seg.max() >= 2  # rows really hold several documents
    mask = np.asarray(anchor_mask(jnp.asarray(tokens), jnp.asarray(ac), None, jnp.asarray(seg)))
    same_doc = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    assert not (mask & ~same_doc).any()
    # inside each piece the mask is exactly that of the piece alone in its own row
    pieces = [(r, np.flatnonzero(seg[r] == s)) for r in range(len(seg)) for s in range(1, seg[r].max() + 1)]
    alone_tokens = np.zeros((len(pieces), seg.shape[1]), np.int32)
    alone_seg = np.zeros_like(alone_tokens)
    for i, (r, idx) in enumerate(pieces):
        alone_tokens[i, : len(idx)] = tokens[r, idx]
        alone_seg[i, : len(idx)] = 1
    alone = np.asarray(anchor_mask(jnp.asarray(alone_tokens), jnp.asarray(ac), None, jnp.asarray(alone_seg)))
    for i, (r, idx) in enumerate(pieces):
        np.testing.assert_array_equal(mask[r][np.ix_(idx, idx)], alone[i, : len(idx), : len(idx)])
    # packing loses and adds nothing: every token of the epoch's documents is there once
    n_train = len(data.open_split(out, "train"))
    total = sum(len(anchors.encode_document(r["text"].decode(), bpe_tok, "ac")) for r in data.open_split(out, "train"))
    assert int((seg > 0).sum()) == total and n_train > 20


# ----------------------------------------------------------------------------------------------------------------
# Order, resume, sharding


@pytest.mark.parametrize("packing", [False, True])
def test_exact_resume_from_saved_state(corpus, sp_tok, packing):
    out, _ = corpus
    cfg = DataConfig(path=str(out), anchor_mode="ac", seq_len=64, packing=packing, shuffle_seed=7)
    it = data.make_iterator(cfg, sp_tok, 4, 0, 1)
    head = _take(it, 9)  # past the 27-document epoch for one-document rows
    state = json.loads(json.dumps(it.get_state()))
    tail = _take(it, 6)
    resumed = data.make_iterator(cfg, sp_tok, 4, 0, 1)
    resumed.set_state(state)
    for a, b in zip(tail, _take(resumed, 6), strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])
    # a fresh iterator replays the same stream from the start
    fresh = _take(data.make_iterator(cfg, sp_tok, 4, 0, 1), 15)
    for a, b in zip(head + tail, fresh, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_epochs_are_reshuffled_with_the_seed(corpus, sp_tok):
    out, _ = corpus
    train_ids = _train_doc_ids(corpus)

    def order(**kw) -> list[int]:
        cfg = DataConfig(path=str(out), anchor_mode="full", seq_len=16, **kw)
        return [k for b in data.make_iterator(cfg, sp_tok, 3, 0, 1) for k in _doc_ids(sp_tok, b["tokens"].ravel())]

    two = order(num_epochs=2, shuffle_seed=1)
    n = len(train_ids)
    assert len(two) == 2 * n and set(two[:n]) == set(two[n:]) == train_ids
    assert two[:n] != two[n:]
    assert order(num_epochs=1, shuffle_seed=2) != two[:n]
    assert order(num_epochs=1, shuffle_seed=1) == two[:n]
    assert order(num_epochs=1, shuffle=False) == [
        int(re.search(r"Document (\d+)", r["text"].decode()).group(1)) for r in data.open_split(out, "train")
    ]


def test_processes_split_by_rows_see_the_single_process_batches(corpus, sp_tok):
    """split_by="rows": the global batch is the same for any process count; each process holds its block of rows,
    and a state saved by one process count resumes on another."""
    out, _ = corpus
    cfg = DataConfig(path=str(out), anchor_mode="ac", seq_len=16, num_epochs=1, packing=True)
    one = list(data.make_iterator(cfg, sp_tok, 6, 0, 1))
    for count in (2, 3):
        parts = [list(data.make_iterator(cfg, sp_tok, 6, p, count)) for p in range(count)]
        assert [len(p) for p in parts] == [len(one)] * count
        for i, batch in enumerate(one):
            for k in ("tokens", "segment_ids"):
                np.testing.assert_array_equal(np.concatenate([p[i][k] for p in parts]), batch[k])
    it = data.make_iterator(cfg, sp_tok, 6, 1, 2)
    next(it), next(it)
    resumed = data.make_iterator(cfg, sp_tok, 6, 0, 1)
    resumed.set_state(it.get_state())
    np.testing.assert_array_equal(next(resumed)["tokens"], one[2]["tokens"])


def test_process_shards_split_by_documents_are_disjoint_and_cover_the_data(corpus, sp_tok):
    out, _ = corpus
    cfg = DataConfig(path=str(out), anchor_mode="ac", seq_len=16, num_epochs=1, split_by="documents")
    seen = []
    for p in range(2):
        ids = []
        for b in data.make_iterator(cfg, sp_tok, 6, p, 2):
            assert b["tokens"].shape == (3, 16)
            ids += _doc_ids(sp_tok, b["tokens"].ravel())
        assert len(ids) == len(set(ids))
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == _train_doc_ids(corpus)
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_to_global_builds_sharded_arrays(corpus, sp_tok):
    out, _ = corpus
    batch = next(data.make_iterator(DataConfig(path=str(out), seq_len=32), sp_tok, 2, 0, 1))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    arrays = data.to_global(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    for k, v in batch.items():
        assert arrays[k].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(arrays[k]), v)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_corpus_is_a_one_line_error(tmp_path, capsys, sp_tok):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"corpus path .*nope does not exist"):
        data.prepare([str(missing)], str(tmp_path / "out"))
    assert data.main(["prepare", "--source", str(missing), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    with pytest.raises(FileNotFoundError, match="no prepared corpus .* prepare --output"):
        data.make_iterator(DataConfig(path=str(tmp_path / "out")), sp_tok, 2, 0, 1)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no .txt or .jsonl files"):
        data.prepare([str(tmp_path / "empty_dir")], str(tmp_path / "out"))


def test_empty_documents_are_skipped_or_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(["", "  \n\t", "One sentence here.", "Another one."]):
        (src / f"{i}.txt").write_text(text)
    (src / "x.jsonl").write_text('{"text": ""}\n\n{"text": "Third doc."}\n')
    data.prepare([str(src)], str(tmp_path / "out"), val_fraction=0)
    stats = json.loads((tmp_path / "out" / data.PREPARE_RECORD).read_text())["stats"]
    assert stats["empty_skipped"] == 3 and stats["documents"] == 3 and stats["splits"] == {"train": 3}
    (src / "new.txt").write_text("Added later.")
    assert len(data.open_split(data.prepare([str(src)], str(tmp_path / "out"), val_fraction=0), "train")) == 3
    rebuilt = data.prepare([str(src)], str(tmp_path / "out"), val_fraction=0, overwrite=True)
    assert len(data.open_split(rebuilt, "train")) == 4
    only_empty = tmp_path / "only_empty"
    only_empty.mkdir()
    (only_empty / "a.txt").write_text(" ")
    (only_empty / "b.txt").write_text("")
    with pytest.raises(ValueError, match="all 2 documents .* are empty"):
        data.prepare([str(only_empty)], str(tmp_path / "out2"))


def test_non_utf8_and_bad_jsonl_name_the_file(tmp_path):
    src = tmp_path / "latin"
    src.mkdir()
    (src / "ok.txt").write_text("Fine text.")
    (src / "bad.txt").write_bytes("Caf\u00e9 au lait.".encode("latin-1"))
    with pytest.raises(ValueError, match=r"bad\.txt: not valid UTF-8 at byte offset 3; re-encode"):
        data.prepare([str(src)], str(tmp_path / "out"))
    jl = tmp_path / "j"
    jl.mkdir()
    (jl / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl: not valid UTF-8 at byte offset 28"):
        data.prepare([str(jl)], str(tmp_path / "out"))
    (jl / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r'a\.jsonl:2: no "text" string field'):
        data.prepare([str(jl)], str(tmp_path / "out"))
    (jl / "a.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:3: not valid JSON"):
        data.prepare([str(jl)], str(tmp_path / "out"))
    assert not (tmp_path / "out" / data.PREPARE_RECORD).exists()


def test_bad_iterator_arguments(corpus, sp_tok):
    out, _ = corpus
    plain = Tokenizer.from_sentencepiece(sp_tok_path())
    with pytest.raises(ValueError, match="needs the <AC> token"):
        data.make_iterator(DataConfig(path=str(out), anchor_mode="ac"), plain, 2, 0, 1)
    with pytest.raises(ValueError, match="multiple of process_count=2"):
        data.make_iterator(DataConfig(path=str(out)), sp_tok, 3, 0, 2)
    with pytest.raises(ValueError, match="split 'test' is not in"):
        data.make_iterator(DataConfig(path=str(out), split="test"), sp_tok, 2, 0, 1)
    with pytest.raises(ValueError, match="anchor_mode='acc'"):
        DataConfig(anchor_mode="acc")


def sp_tok_path() -> str:
    return str(Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1")
