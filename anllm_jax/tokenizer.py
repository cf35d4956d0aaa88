"""One tokenizer interface over sentencepiece `.model` files and byte-level BPE (HF `tokenizer.json` or GGUF).

A `Tokenizer` wraps either a sentencepiece model (kept as its serialized proto, so added tokens become
USER_DEFINED pieces that sentencepiece itself matches whole in text) or a `tokenizers.Tokenizer` (HF
`tokenizer.json`, or the GPT-2-style BPE rebuilt from a GGUF file's `tokenizer.ggml.*` metadata).
Anchor tokens resolve to ids here: "ep" strings must each be one vocabulary token; "ac" is the added `<AC>`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

SP_FILE = "tokenizer.model"
BPE_FILE = "tokenizer.json"
META_FILE = "anllm_tokenizer.json"
AC_TOKEN = "<AC>"

# llama.cpp `tokenizer.ggml.pre` names whose split differs from GPT-2's regex, as llama.cpp defines them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_TOKEN_CONTROL, _GGUF_TOKEN_USER_DEFINED = 3, 4


def _gguf_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre == "smollm":
        # SmolLM's own tokenizer.json: every digit on its own, then GPT-2's byte-level split.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


class Tokenizer:
    """Text <-> token ids, with special ids and anchor-token handling.

    Backed by a sentencepiece model proto (`kind == "sentencepiece"`) or a `tokenizers.Tokenizer` (`kind == "bpe"`).
    """

    def __init__(
        self,
        *,
        sp_proto: bytes | None = None,
        bpe: tokenizers.Tokenizer | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
    ):
        if (sp_proto is None) == (bpe is None):
            raise ValueError("Tokenizer needs exactly one of sp_proto (sentencepiece) or bpe (tokenizers)")
        self.kind = "sentencepiece" if sp_proto is not None else "bpe"
        self._bpe = bpe
        self._sp: spm.SentencePieceProcessor | None = None
        self._sp_proto = sp_proto
        if sp_proto is not None:
            self._sp = spm.SentencePieceProcessor(model_proto=sp_proto)
            bos_id = self._sp.bos_id() if bos_id is None else bos_id
            eos_id = self._sp.eos_id() if eos_id is None else eos_id
            pad_id = self._sp.pad_id() if pad_id is None else pad_id
        self.bos_id = bos_id if bos_id is not None and bos_id >= 0 else None
        self.eos_id = eos_id if eos_id is not None and eos_id >= 0 else None
        self.pad_id = pad_id if pad_id is not None and pad_id >= 0 else None
        # The Jinja chat template of an instruct model (GGUF `tokenizer.chat_template`, HF tokenizer_config.json).
        self.chat_template = chat_template

    # ----------------------------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_sentencepiece(cls, path: str, **special_ids: int | None) -> Tokenizer:
        with open(path, "rb") as f:
            proto = f.read()
        try:
            spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            raise ValueError(f"{path} is not a sentencepiece model ({e})") from None
        return cls(sp_proto=proto, **special_ids)

    @classmethod
    def from_tokenizer_json(cls, path: str, **special_ids: int | None) -> Tokenizer:
        return cls(bpe=tokenizers.Tokenizer.from_file(path), **special_ids)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file stores in its `tokenizer.ggml.*` metadata (values already decoded)."""
        model = meta.get("tokenizer.ggml.model")
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        ids = {
            "bos_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_id": meta.get("tokenizer.ggml.eos_token_id"),
            "pad_id": meta.get("tokenizer.ggml.padding_token_id"),
            "chat_template": meta.get("tokenizer.chat_template"),
        }
        if model == "gpt2":
            bpe = tokenizers.Tokenizer(
                models.BPE(
                    vocab={t: i for i, t in enumerate(tokens)},
                    merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]],
                    fuse_unk=False,
                )
            )
            bpe.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
            bpe.decoder = decoders.ByteLevel()
            bpe.add_special_tokens(
                [
                    AddedToken(t, special=True, normalized=False)
                    for t, k in zip(tokens, types, strict=True)
                    if k == _GGUF_TOKEN_CONTROL
                ]
            )
            bpe.add_tokens(
                [
                    AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types, strict=True)
                    if k == _GGUF_TOKEN_USER_DEFINED
                ]
            )
            return cls(bpe=bpe, **ids)
        if model == "llama":
            # A sentencepiece vocabulary: GGUF token types use sentencepiece's own numbering.
            proto = sp_pb2.ModelProto()
            scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
            for t, s, k in zip(tokens, scores, types, strict=True):
                proto.pieces.add(piece=t, score=s, type=k)
            proto.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
            proto.trainer_spec.vocab_size = len(tokens)
            proto.trainer_spec.byte_fallback = 6 in types
            proto.trainer_spec.unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
            proto.trainer_spec.bos_id = ids["bos_id"] if ids["bos_id"] is not None else -1
            proto.trainer_spec.eos_id = ids["eos_id"] if ids["eos_id"] is not None else -1
            proto.trainer_spec.pad_id = ids["pad_id"] if ids["pad_id"] is not None else -1
            proto.normalizer_spec.name = "identity"
            proto.normalizer_spec.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            proto.normalizer_spec.remove_extra_whitespaces = False
            proto.normalizer_spec.escape_whitespaces = True
            return cls(sp_proto=proto.SerializeToString(), **ids)
        raise ValueError(
            f"GGUF tokenizer model {model!r} is not supported (supported: gpt2 byte-level BPE, llama sentencepiece)"
        )

    @classmethod
    def load(cls, directory: str) -> Tokenizer:
        """Read a tokenizer saved by `save`, or the tokenizer files of an HF model directory."""
        meta: dict[str, Any] = {}
        if os.path.exists(os.path.join(directory, META_FILE)):
            with open(os.path.join(directory, META_FILE)) as f:
                meta = json.load(f)
        else:
            meta = _hf_special_ids(directory) | {"chat_template": _hf_chat_template(directory)}
        ids = {k: meta.get(k) for k in ("bos_id", "eos_id", "pad_id", "chat_template")}
        if os.path.exists(os.path.join(directory, BPE_FILE)):
            return cls.from_tokenizer_json(os.path.join(directory, BPE_FILE), **ids)
        if os.path.exists(os.path.join(directory, SP_FILE)):
            return cls.from_sentencepiece(os.path.join(directory, SP_FILE), **ids)
        raise FileNotFoundError(f"no {BPE_FILE} or {SP_FILE} in {directory}; save a tokenizer there first")

    def save(self, directory: str) -> None:
        """Write the tokenizer file (tokenizer.json or tokenizer.model) and the special ids into `directory`."""
        os.makedirs(directory, exist_ok=True)
        if self._bpe is not None:
            self._bpe.save(os.path.join(directory, BPE_FILE))
        else:
            with open(os.path.join(directory, SP_FILE), "wb") as f:
                f.write(self._sp_proto)
        with open(os.path.join(directory, META_FILE), "w") as f:
            meta = {"kind": self.kind, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
            json.dump(meta | ({"chat_template": self.chat_template} if self.chat_template else {}), f)

    # ----------------------------------------------------------------------------------------------------------------
    # Encoding

    @property
    def vocab_size(self) -> int:
        if self._bpe is not None:
            return self._bpe.get_vocab_size(with_added_tokens=True)
        return self._sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._bpe.encode(text, add_special_tokens=False).ids if self._bpe is not None else self._sp.encode(text)
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._bpe is not None:
            return self._bpe.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry spelled as the vocabulary stores it (e.g. "▁the", "Ġthe", "<AC>")."""
        if self._bpe is not None:
            i = self._bpe.token_to_id(token)
        else:
            i = self._sp.piece_to_id(token)
            # piece_to_id answers unk_id for any unknown string.
            i = None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i
        if i is None:
            raise ValueError(f"{token!r} is not in the vocabulary")
        return int(i)

    def has_token(self, token: str) -> bool:
        try:
            self.token_to_id(token)
        except ValueError:
            return False
        return True

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._bpe.id_to_token(i) if self._bpe is not None else self._sp.id_to_piece(i)

    def _single_token(self, text: str) -> int:
        """The one token id that spells `text` exactly; ValueError when `text` is not one token."""
        if self._bpe is not None:
            ids = self.encode(text)
            if len(ids) == 1:
                return ids[0]
            pieces = [self.id_to_token(i) for i in ids]
        else:
            # The piece itself, without the word-start marker a plain encode would prepend ("." not "▁.").
            try:
                return self.token_to_id(text.replace(" ", "\u2581"))
            except ValueError:
                pieces = self._sp.encode(text, out_type=str)
        raise ValueError(
            f"anchor string {text!r} is not a single token of this vocabulary (it tokenizes as {pieces}); "
            "use strings that are one token each"
        )

    def anchor_ids(self, mode: str, ep_strings: Sequence[str] = (".",)) -> tuple[int, ...]:
        """Anchor token ids for `mode`: () for "full", the ids of `ep_strings` for "ep", the `<AC>` id for "ac"."""
        if mode == "full":
            return ()
        if mode == "ep":
            if not ep_strings:
                raise ValueError("anchor mode 'ep' needs at least one anchor string, e.g. ep_strings=('.',)")
            return tuple(dict.fromkeys(self._single_token(s) for s in ep_strings))
        if mode == "ac":
            try:
                return (self.token_to_id(AC_TOKEN),)
            except ValueError:
                raise ValueError(
                    f"anchor mode 'ac' needs the {AC_TOKEN} token, which this tokenizer lacks; "
                    "add it with checkpoints.set_anchor_mode(model, tokenizer, 'ac')"
                ) from None
        raise ValueError(f"anchor mode {mode!r} is not one of full, ep, ac")

    def add_token(self, token: str) -> int:
        """Add `token` to the vocabulary (matched whole in text from now on) and return its id."""
        try:
            return self.token_to_id(token)
        except ValueError:
            pass
        if self._bpe is not None:
            self._bpe.add_tokens([AddedToken(token, special=False, normalized=False)])
        else:
            proto = sp_pb2.ModelProto()
            proto.ParseFromString(self._sp_proto)
            proto.pieces.add(piece=token, score=0.0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
            self._sp_proto = proto.SerializeToString()
            self._sp = spm.SentencePieceProcessor(model_proto=self._sp_proto)
        return self.token_to_id(token)

    def hf_tokenizer_files(self, directory: str) -> None:
        """Write the tokenizer files transformers' AutoTokenizer reads (plus this module's own)."""
        self.save(directory)
        special = {
            f"{name}_token": self.id_to_token(i)
            for name, i in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))
            if i is not None
        }
        if self.chat_template:
            special["chat_template"] = self.chat_template
        cls_name = "LlamaTokenizer" if self.kind == "sentencepiece" else "PreTrainedTokenizerFast"
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": cls_name, "add_bos_token": False, **special}, f, indent=2)


def _hf_special_ids(directory: str) -> dict[str, int | None]:
    """bos/eos/pad ids of an HF model directory, from its config.json (first eos when it lists several)."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        cfg = json.load(f)
    out = {}
    for key in ("bos", "eos", "pad"):
        v = cfg.get(f"{key}_token_id")
        out[f"{key}_id"] = v[0] if isinstance(v, list) and v else (v if isinstance(v, int) else None)
    return out


def _hf_chat_template(directory: str) -> str | None:
    """The chat template of an HF model directory: chat_template.jinja, or the "chat_template" entry of
    tokenizer_config.json (a string, or a list of named templates of which "default" is the one to use)."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
