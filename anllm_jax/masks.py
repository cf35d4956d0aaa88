"""Attention masks as a small algebra over per-position attributes, and the named policies built from it.

A mask is a boolean rule over (query i, key j) pairs of one example, written with predicates over the positions'
`TokenInfo` and combined with `&`, `|` and `~`. The anchor-based self-attention (AnSAN, REFERENCE section 1) is one
composition:

    seg(t) = number of anchors strictly before t
    allowed(i, j) = j <= i and not pad(i) and not pad(j) and same packed document
                    and (seg(j) == seg(i) or (isA(j) and not isA(i)))

    ANSAN = causal & valid & same_doc & (same_segment | earlier_anchor)

A non-anchor sees its own sentence plus every earlier anchor; an anchor sees only its own sentence. The rules are
written over per-position attributes so that one function serves a forward over a row and a query block against
a compacted KV cache, where positions are not contiguous. Every attention path and every KV cache reads a `Policy`
(a named, hashable composition); `reachable` derives from the same mask which cache entries a later query can still
attend, so eviction is never written per policy.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenInfo:
    """Per-position attributes that decide visibility. All arrays are [B, T] (jax or numpy).

    order: causal order (index within the row, or absolute position for cache entries).
    seg: number of anchors strictly before the position in its row (its sentence).
    anchor: the token is an anchor.
    valid: a real token (not padding, not an empty cache slot).
    doc: packed-document id (rows holding one document use a constant).
    pos: position within its document's stream (0 for the document's first real token).
    sep: the token is a separator (SepLLM's punctuation and whitespace tokens).
    nsep: number of separators strictly before the position in its document.
    """

    order: Any
    seg: Any
    anchor: Any
    valid: Any
    doc: Any
    pos: Any
    sep: Any
    nsep: Any


def _xp(x: Any) -> Any:
    """numpy for host arrays (cache planning runs on the host), jax.numpy otherwise."""
    return np if isinstance(x, np.ndarray) else jnp


def _is_in(tokens_BT: Any, ids: Any) -> Any:
    xp = _xp(tokens_BT)
    ids = xp.asarray(ids, dtype=tokens_BT.dtype).reshape(-1)
    return xp.any(tokens_BT[..., None] == ids, axis=-1)


def is_anchor(tokens_BT: jax.Array, anchor_ids: jax.Array) -> jax.Array:
    """bool[B, T]: tokens whose id is in `anchor_ids` (an int array, possibly empty)."""
    return _is_in(jnp.asarray(tokens_BT), anchor_ids)


def _before(flags_BT: Any) -> Any:
    """int32[B, T]: how many flags are set strictly before each position."""
    a = flags_BT.astype(np.int32)
    return _xp(a).cumsum(a, axis=-1) - a


def token_info(
    tokens_BT: Any,
    anchor_ids: Any,
    pad_id: int | jax.Array | None = None,
    segment_ids_BT: Any = None,
    separator_ids: Any = (),
) -> TokenInfo:
    """Attributes of a row of tokens. `segment_ids_BT` are packed-document ids, 0 marking padding.

    Works on jax arrays (under jit) and on numpy arrays (host-side cache planning gives the same attributes).
    """
    xp = _xp(tokens_BT)
    B, T = tokens_BT.shape
    valid = xp.ones((B, T), bool)
    if pad_id is not None:
        valid &= tokens_BT != pad_id
    if segment_ids_BT is None:
        doc = xp.zeros((B, T), np.int32)
    else:
        doc = segment_ids_BT.astype(np.int32)
        valid &= doc != 0
    anchor = _is_in(tokens_BT, anchor_ids) & valid
    sep = _is_in(tokens_BT, separator_ids) & valid
    order = xp.broadcast_to(xp.arange(T, dtype=np.int32), (B, T))
    # Positions and separator counts restart at each document: subtract the running value at the document's start.
    starts = xp.concatenate([xp.ones((B, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    cummax = np.maximum.accumulate if xp is np else jax.lax.cummax
    from_start = lambda x: x - cummax(xp.where(starts, x, 0), axis=1)
    pos = from_start(_before(valid))
    nsep = from_start(_before(sep))
    return TokenInfo(order=order, seg=_before(anchor), anchor=anchor, valid=valid, doc=doc, pos=pos, sep=sep, nsep=nsep)


# ----------------------------------------------------------------------------------------------------------
# The algebra


class Mask:
    """A rule over (query, key) pairs: `mask(q_info, k_info)` is bool[B, Tq, Tk]. Combine with &, |, ~."""

    def __call__(self, q: TokenInfo, k: TokenInfo) -> Any:
        out = self.eval(q, k)
        return _xp(out).broadcast_to(out, (*q.order.shape, k.order.shape[-1]))

    def eval(self, q: TokenInfo, k: TokenInfo) -> Any:
        """The rule, broadcastable to [B, Tq, Tk]."""
        raise NotImplementedError

    def atoms(self, positive: bool = True) -> Iterator[tuple[Atom, bool]]:
        """Every predicate of the rule with its polarity (False under an odd number of ~)."""
        raise NotImplementedError

    def __and__(self, other: Mask) -> Mask:
        return All((self, other))

    def __or__(self, other: Mask) -> Mask:
        return Some((self, other))

    def __invert__(self) -> Mask:
        return Not(self)


_Q = lambda x: x[:, :, None]
_K = lambda x: x[:, None, :]

# name: (rule of query q, key k and the predicate's parameter n; how it behaves for later queries, see `reachable`)
_PREDICATES: dict[str, tuple[Callable[[TokenInfo, TokenInfo, int], Any], str]] = {
    "causal": (lambda q, k, n: _K(k.order) <= _Q(q.order), "constant"),
    "valid": (lambda q, k, n: _Q(q.valid) & _K(k.valid), "constant"),
    "same_doc": (lambda q, k, n: _Q(q.doc) == _K(k.doc), "constant"),
    "same_segment": (lambda q, k, n: _Q(q.seg) == _K(k.seg), "shrinking"),
    "key_anchor": (lambda q, k, n: _K(k.anchor), "key"),
    "query_anchor": (lambda q, k, n: _Q(q.anchor), "query"),
    "sinks": (lambda q, k, n: _K(k.pos) < n, "key"),
    "window": (lambda q, k, n: _Q(q.pos) - _K(k.pos) <= n, "shrinking"),
    "separator": (lambda q, k, n: _K(k.sep), "key"),
    "last_anchors": (lambda q, k, n: _K(k.anchor) & (_Q(q.seg) - _K(k.seg) <= n), "shrinking"),
    "last_separators": (lambda q, k, n: _K(k.sep) & (_Q(q.nsep) - _K(k.nsep) <= n), "shrinking"),
}


@dataclasses.dataclass(frozen=True)
class Atom(Mask):
    name: str
    n: int = 0

    def eval(self, q: TokenInfo, k: TokenInfo) -> Any:
        return _PREDICATES[self.name][0](q, k, self.n)

    def atoms(self, positive: bool = True) -> Iterator[tuple[Atom, bool]]:
        yield self, positive

    def __str__(self) -> str:
        takes_n = self.name in ("sinks", "window", "last_anchors", "last_separators")
        return f"{self.name}({self.n})" if takes_n else self.name


@dataclasses.dataclass(frozen=True)
class _Join(Mask):
    """Its parts folded with `op` (& for All, | for Some)."""

    parts: tuple[Mask, ...]
    op: ClassVar[Callable[[Any, Any], Any]]

    def eval(self, q: TokenInfo, k: TokenInfo) -> Any:
        return functools.reduce(self.op, (p.eval(q, k) for p in self.parts))

    def atoms(self, positive: bool = True) -> Iterator[tuple[Atom, bool]]:
        for p in self.parts:
            yield from p.atoms(positive)


class All(_Join):
    op = operator.and_

    def __str__(self) -> str:
        return " & ".join(f"({p})" if isinstance(p, Some) else str(p) for p in self.parts)


class Some(_Join):
    op = operator.or_

    def __str__(self) -> str:
        return " | ".join(str(p) for p in self.parts)


@dataclasses.dataclass(frozen=True)
class Not(Mask):
    part: Mask

    def eval(self, q: TokenInfo, k: TokenInfo) -> Any:
        return ~self.part.eval(q, k)

    def atoms(self, positive: bool = True) -> Iterator[tuple[Atom, bool]]:
        yield from self.part.atoms(not positive)

    def __str__(self) -> str:
        return f"~{self.part}" if isinstance(self.part, Atom) else f"~({self.part})"


causal, valid, same_doc = Atom("causal"), Atom("valid"), Atom("same_doc")
same_segment, key_anchor, query_anchor = Atom("same_segment"), Atom("key_anchor"), Atom("query_anchor")
separator = Atom("separator")
earlier_anchor = key_anchor & ~query_anchor  # with `causal`: an anchor before a non-anchor query


def sinks(n: int) -> Mask:
    """The key is one of its document's first n tokens (StreamingLLM's attention sinks)."""
    return Atom("sinks", n)


def window(w: int) -> Mask:
    """The key is the query or one of the w tokens before it."""
    return Atom("window", w)


def last_anchors(n: int) -> Mask:
    """The key is one of the last n anchors before the query (or the query itself, when it is an anchor)."""
    return Atom("last_anchors", n)


def last_separators(n: int) -> Mask:
    """The key is one of the last n separators before the query (or the query itself, when it is one)."""
    return Atom("last_separators", n)


BASE = causal & valid & same_doc
ANSAN = BASE & (same_segment | earlier_anchor)


def allowed(q: TokenInfo, k: TokenInfo) -> jax.Array:
    """bool[B, Tq, Tk]: True where query i may attend key j under AnSAN."""
    return ANSAN(q, k)


def anchor_mask(
    tokens: jax.Array,
    anchor_ids: jax.Array,
    pad_id: int | jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """bool[B, T, T], True where query i may attend key j under AnSAN.

    `anchor_ids` is data (an int array; empty means plain causal). `segment_ids` are packed-document ids,
    0 marking padding. Works under jit.
    """
    info = token_info(tokens, anchor_ids, pad_id, segment_ids)
    return allowed(info, info)


# ----------------------------------------------------------------------------------------------------------
# Which cache entries a later query can still attend


def next_queries(next_pos_B: Any, n_anchors_B: Any, n_seps_B: Any, anchors: bool) -> TokenInfo:
    """TokenInfo [B, 1 or 2] of the earliest query that can still come in each row's stream: at its next position,
    after every anchor and separator seen so far, an anchor or not (`anchors`: whether anchors exist at all)."""
    xp = _xp(next_pos_B)
    flags = (False, True) if anchors else (False,)
    col = lambda x: xp.repeat(xp.asarray(x, np.int32)[:, None], len(flags), axis=1)
    B = next_pos_B.shape[0]
    return TokenInfo(
        order=col(next_pos_B),
        seg=col(n_anchors_B),
        anchor=xp.broadcast_to(xp.asarray(flags), (B, len(flags))),
        valid=xp.ones((B, len(flags)), bool),
        doc=xp.zeros((B, len(flags)), np.int32),
        pos=col(next_pos_B),
        sep=xp.zeros((B, len(flags)), bool),
        nsep=col(n_seps_B),
    )


def check_reachable(mask: Mask) -> None:
    """Raise unless `reachable` is exact for `mask`: every predicate that can only turn False for later queries
    (same sentence, window, last anchors/separators) must appear without negation."""
    for atom, positive in mask.atoms():
        if _PREDICATES[atom.name][1] == "shrinking" and not positive:
            raise ValueError(
                f"mask {mask} negates {atom}, so a later query may see an entry that the next one cannot; "
                "a cache cannot evict by it (keep every entry with the full cache)"
            )


def reachable(mask: Mask, entries: TokenInfo, next_q: TokenInfo) -> Any:
    """bool[B, S]: cache entries that some later query may still attend under `mask`.

    Later queries lie at or after the next position, after at least the anchors and separators seen so far; each
    predicate is constant over them, reads only the key or a free query flag, or can only turn False as the stream
    goes on ("shrinking"). With the shrinking ones never negated (`check_reachable`), a later query that attends an
    entry implies that the earliest query with the same flags attends it too, so evaluating the mask for that one
    (`next_queries`, both anchor flags) decides exactly: an entry is dropped when no future query can attend it.
    """
    return mask(next_q, entries).any(axis=1) & entries.valid


# ----------------------------------------------------------------------------------------------------------
# Named policies: one mask each, and the matching KV cache


# name: {parameter: default}; None means "not limited" (ansan-bounded's window, sepllm's separators).
_PARAMETERS: dict[str, dict[str, int | None]] = {
    "full": {},
    "ansan": {},
    "ansan-bounded": {"anchors": 64, "sinks": 0, "window": None},
    "streaming": {"sinks": 4, "window": 1020},
    "sepllm": {"sinks": 4, "window": 256, "separators": None},
    "window": {"window": 1024},
}
POLICY_NAMES = tuple(_PARAMETERS)
_ALIASES = {"anchor": "ansan"}


def _own_sentence(p: Policy) -> Mask:
    return same_segment if p.window is None else same_segment & window(p.window)


def _kept_separators(p: Policy) -> Mask:
    return separator if p.separators is None else last_separators(p.separators)


def _with_sinks(p: Policy, m: Mask) -> Mask:
    return sinks(p.sinks) | m if p.sinks else m


# Each policy's rule, one line: BASE (causal, real tokens, same document) and what else a query may see.
_RULES: dict[str, Callable[[Policy], Mask]] = {
    "full": lambda p: BASE,
    "ansan": lambda p: ANSAN,
    "ansan-bounded": lambda p: BASE & _with_sinks(p, _own_sentence(p) | (earlier_anchor & last_anchors(p.anchors))),
    "streaming": lambda p: BASE & (sinks(p.sinks) | window(p.window)),
    "sepllm": lambda p: BASE & (sinks(p.sinks) | _kept_separators(p) | window(p.window)),
    "window": lambda p: BASE & window(p.window),
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """A named attention mask with its parameters: data that configs, caches and jit carry statically.

    sinks: the document's first tokens every query sees. window: the tokens before the query it sees (None: not
    limited). anchors: anchors kept (ansan-bounded). separators: separators kept (sepllm; None: all).
    separator_ids: the token ids that count as separators (sepllm).
    """

    name: str
    sinks: int | None = None
    window: int | None = None
    anchors: int | None = None
    separators: int | None = None
    separator_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        name = _ALIASES.get(self.name, self.name)
        if name not in _PARAMETERS:
            raise ValueError(f"policy {self.name!r} is not one of {', '.join(POLICY_NAMES)}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "separator_ids", tuple(int(i) for i in self.separator_ids))
        if self.separator_ids and name != "sepllm":
            raise ValueError(f"policy {name} takes {_takes(name)}, not separator ids")
        for field in ("sinks", "window", "anchors", "separators"):
            value = getattr(self, field)
            if field not in _PARAMETERS[name]:
                if value is not None:
                    raise ValueError(f"policy {name} takes {_takes(name)}, not {field}={value}")
            elif value is None:
                object.__setattr__(self, field, _PARAMETERS[name][field])
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"policy {name}: {field}={value!r} must be an integer >= 0")

    @property
    def mask(self) -> Mask:
        return _RULES[self.name](self)

    def __str__(self) -> str:
        """The spec `parse_policy` reads back, e.g. "streaming:sinks=4,window=1020"."""
        parts = [f"{f}={getattr(self, f)}" for f in _PARAMETERS[self.name] if getattr(self, f) is not None]
        if self.separator_ids:
            parts.append("separator_ids=" + "+".join(map(str, self.separator_ids)))
        return self.name + (":" + ",".join(parts) if parts else "")

    def _names(self) -> set[str]:
        return {a.name for a, _ in self.mask.atoms()}

    @property
    def reads_anchors(self) -> bool:
        return bool(self._names() & {"same_segment", "key_anchor", "query_anchor", "last_anchors"})

    @property
    def reads_separators(self) -> bool:
        return bool(self._names() & {"separator", "last_separators"})

    @property
    def evicts(self) -> bool:
        """Whether its cache ever drops an entry (every predicate but the constant ones can rule a key out)."""
        return any(_PREDICATES[a.name][1] != "constant" for a, _ in self.mask.atoms())

    @property
    def bound(self) -> int | None:
        """Most entries its cache holds between forwards (None: grows with the text)."""
        if self.name in ("full", "ansan"):
            return None
        if self.name == "ansan-bounded":
            return None if self.window is None else self.sinks + self.anchors + self.window
        if self.name == "sepllm":
            return None if self.separators is None else self.sinks + self.separators + self.window
        return (self.sinks or 0) + self.window

    @property
    def within_ansan(self) -> bool:
        """Every key it allows is in the query's sentence or an anchor: the sparse AnSAN attention computes it."""
        return self.name in ("full", "ansan") or (self.name == "ansan-bounded" and not self.sinks)


def policy_parameters(name: str) -> tuple[str, ...]:
    """The parameters policy `name` takes (besides sepllm's separator ids)."""
    return tuple(_PARAMETERS[_ALIASES.get(name, name)])


def _takes(name: str) -> str:
    return ", ".join(_PARAMETERS.get(_ALIASES.get(name, name), ())) or "no parameters"


FULL, ANSAN_POLICY = Policy("full"), Policy("ansan")


def parse_policy(spec: str | Policy) -> Policy:
    """A Policy from "NAME" or "NAME:KEY=VALUE,..." (e.g. "streaming:sinks=4,window=252",
    "sepllm:window=64,separators=32,separator_ids=13+30+198"); "anchor" names ansan."""
    if isinstance(spec, Policy):
        return spec
    name, _, rest = str(spec).strip().partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in (*_PARAMETERS.get(_ALIASES.get(name, name), {}), "separator_ids"):
            raise ValueError(f"policy spec {spec!r}: {item!r} is not KEY=VALUE with KEY one of {_takes(name)}")
        try:
            if key == "separator_ids":
                params[key] = tuple(int(v) for v in value.split("+") if v.strip())
            else:
                params[key] = None if value.strip().lower() == "none" else int(value)
        except ValueError:
            raise ValueError(f"policy spec {spec!r}: {key}={value!r} must be an integer") from None
    return Policy(name, **params)
