"""Anchors in text: which token ids are anchors and where `<AC>` goes, for training documents, generation prompts
and evaluation demonstrations alike (the one place `<AC>` is inserted).

AnLLM-AC puts `<AC>` after the last token of every sentence (sentences from `anllm_jax.sentences`); the whitespace
between two sentences goes with the second. AnLLM-EP changes no text: its anchors are existing tokens (".").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from anllm_jax.sentences import is_closed, sentence_spans


class TextTokenizer(Protocol):
    """The part of `anllm_jax.tokenizer.Tokenizer` that text encoding uses."""

    bos_id: int | None
    pad_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def anchor_ids(self, mode: str, ep_strings: tuple[str, ...] = (".",)) -> tuple[int, ...]: ...


def ac_id(tokenizer: TextTokenizer) -> int:
    """The `<AC>` id; a clear error for a tokenizer without it."""
    ids = tokenizer.anchor_ids("ac")
    if len(ids) != 1:
        raise ValueError(
            "anchor_mode='ac' needs a tokenizer with exactly one <AC> token; add it with checkpoints.set_anchor_mode"
        )
    return int(ids[0])


def _encode_continuation(tokenizer: TextTokenizer, chunk: str, prefix_ids: list[int]) -> list[int]:
    """Token ids of `chunk` as they come out when it follows a sentence end.

    Encoding the chunk after a "." and dropping the "." ids keeps the tokenizer's in-context treatment of the
    leading whitespace (sentencepiece would otherwise add its dummy-prefix space).
    """
    ids = tokenizer.encode("." + chunk)
    if ids[: len(prefix_ids)] == prefix_ids:
        return ids[len(prefix_ids) :]
    return tokenizer.encode(chunk)


def sentence_pieces(text: str) -> list[str]:
    """`text` cut after each sentence; the whitespace before a sentence stays with it, trailing whitespace goes."""
    pieces, start = [], 0
    for _, end in sentence_spans(text):
        pieces.append(text[start:end])
        start = end
    return pieces


def anchored(pieces: Sequence[str], tokenizer: TextTokenizer, anchor: int) -> list[int]:
    """Token ids of the pieces, each followed by `anchor`: the `<AC>` insertion of training documents (pieces are
    sentences) and of evaluation demonstrations (pieces are demonstrations, or their sentences)."""
    prefix_ids = tokenizer.encode(".")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        ids += _encode_continuation(tokenizer, piece, prefix_ids) if i else tokenizer.encode(piece)
        ids.append(anchor)
    return ids


def encode_document(text: str, tokenizer: TextTokenizer, anchor_mode: str, add_bos: bool = True) -> list[int]:
    """Token ids of one document: BOS (if the tokenizer has one and `add_bos`), then the text; in "ac" mode the
    `<AC>` id after the last token of every sentence."""
    ids = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    if anchor_mode != "ac":
        return ids + tokenizer.encode(text.strip())
    return ids + anchored(sentence_pieces(text.strip()), tokenizer, ac_id(tokenizer))


def encode_prompt(text: str, tokenizer: TextTokenizer, anchor_mode: str, add_bos: bool = False) -> list[int]:
    """Prompt ids laid out as in training: in "ac" mode `<AC>` after every finished sentence. A last sentence
    without closing punctuation stays open (no `<AC>`), so generation continues it."""
    ids = encode_document(text, tokenizer, anchor_mode, add_bos)
    if anchor_mode == "ac" and ids[-1:] == [ac_id(tokenizer)] and not is_closed(text):
        ids.pop()
    return ids


def encode_prefix(
    text: str, tokenizer: TextTokenizer, anchor_mode: str, max_len: int, add_bos: bool = True
) -> list[int]:
    """`encode_document(...)[:max_len]` without tokenizing all of a long document.

    Encodes a whitespace-cut prefix of ~8 characters per wanted token; the cut only changes the last word and
    adds a final `<AC>`, so when the prefix yields a margin of tokens beyond `max_len` the first `max_len` are
    exact. Otherwise the whole document is encoded.
    """
    budget = 8 * max_len
    if len(text) > budget:
        cut = text.rfind(" ", 0, budget)
        ids = encode_document(text[: cut if cut > 0 else budget], tokenizer, anchor_mode, add_bos)
        if len(ids) >= max_len + 16:
            return ids[:max_len]
    return encode_document(text, tokenizer, anchor_mode, add_bos)[:max_len]
