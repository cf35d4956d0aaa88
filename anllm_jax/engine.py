"""Continuous batching over policy KV caches (anchor, full, streaming, ...): fixed slots, one jitted step for all.

The slot pattern of JAX serving engines: a request waits in a queue until a slot is free; its prompt is
prefilled into a one-row cache in chunks, one chunk per engine iteration, so the other slots keep decoding in
between; the finished row is inserted into its slot; from then on every iteration decodes all active slots with
one jitted forward over the [slots, capacity] cache (`generate.extend`, which also compacts evicting caches) and
one jitted sampler. A finished or cancelled request frees its slot at once.

Memory: the cache is allocated once, `slots + 1` rows of `capacity` entries (the extra row holds the prompt being
prefilled). A request is admitted only if its worst case fits a row: the prefill's room for a chunk, and the
entries kept after its prompt plus max_tokens (at most its bound for a bounded policy). The anchor policy keeps
few entries of a long prompt, so at one memory budget it serves longer prompts, or more slots, than the full cache.

Exactness: a slot's row goes through the prefill, extend and compaction of `generate`, with true positions, so a
greedy request yields the tokens of `generate.generate(model, [ids], policy=..., chunk_size=prefill_chunk)`, and
a seeded one the tokens that call samples with the same seed, temperature and top_p, whatever else is decoding.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import secrets
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anllm_jax import generate, kvcache, masks, sampling
from anllm_jax.kvcache import KVCache
from anllm_jax.model import Llama, policy_anchor_ids
from anllm_jax.tokenizer import Tokenizer

TOP_LOGPROBS = 5  # alternatives reported per token (the OpenAI completions API allows at most 5)
_CAPACITY_MULTIPLE = 16


class QueueFullError(Exception):
    """Every slot is busy and the queue holds max_queue requests already."""


class ContextTooLongError(ValueError):
    """The prompt with max_tokens needs more cache entries than a slot holds."""


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request produced since its previous event. token_ids exclude stop ids; text may lag the tokens
    while it could still turn into a stop string or ends inside a multi-byte character. The last event has a
    finish_reason ("stop", "length") and completion_tokens (every sampled token, stop ids included), or error."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One generation. `emit` is called from the engine thread with each Event."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated, stop ids excluded
    n_sampled: int = 0
    sent_tokens: int = 0
    sent_chars: int = 0


@dataclasses.dataclass
class _Prefill:
    request: Request
    slot: int
    done: int = 0  # prompt tokens already in the row
    row: KVCache | None = None
    last_logits: jax.Array | None = None  # [1, V], of the last prompt token so far


def capacity_for(model: Llama, slots: int, memory_bytes: int) -> int:
    """Entries per row when `slots + 1` rows share `memory_bytes`, rounded down to a multiple of 16 and at most
    the model's context (rounded up): more entries than positions it was trained on would never be used."""
    fit = memory_bytes // ((slots + 1) * kvcache.bytes_per_entry(model.cfg)) // _CAPACITY_MULTIPLE * _CAPACITY_MULTIPLE
    return min(fit, -(-model.cfg.max_seq_len // _CAPACITY_MULTIPLE) * _CAPACITY_MULTIPLE)


def cache_spec(model: Llama, policy: str | masks.Policy) -> tuple[tuple[int, ...], masks.Policy]:
    """The anchor ids and attention rule of a cache of `policy`, as `generate.prefill` derives them (the slots'
    rows come from prefill, so the batch cache must match them)."""
    rule = kvcache.cache_rule(model.cfg, policy)
    return policy_anchor_ids(model.cfg, rule), rule


def entries_needed(
    prompt_ids: Sequence[int],
    max_tokens: int,
    anchor_ids: tuple[int, ...],
    policy: str | masks.Policy,
    prefill_chunk: int,
    rule: masks.Policy,
) -> int:
    """Cache entries a request needs at its peak: room for a prefill chunk, and the entries kept after the prompt
    plus one per generated token but the last."""
    ids_T = np.asarray(prompt_ids, np.int32)
    chunk = min(prefill_chunk, generate.bucket(len(ids_T)))
    padded_1T = np.pad(ids_T, (0, -len(ids_T) % chunk))[None]
    prefill = generate.prefill_capacity(padded_1T, np.array([len(ids_T)]), anchor_ids, policy, chunk, rule)
    decode = kvcache.kept_after(ids_T, anchor_ids, policy, rule) + max_tokens
    if policy != "full" and rule.bound is not None:  # a bounded cache never holds more (plus the slot written)
        decode = min(decode, rule.bound + 1)
    return max(prefill, decode)


def _batch_axis(x: jax.Array) -> int:
    # Keys and values are [L, B, S, K, H]; every other array of the cache has the batch first.
    return 1 if x.ndim == 5 else 0


@functools.partial(jax.jit, donate_argnames=("cache",))
def _put_rows(cache: KVCache, part: KVCache, start: jax.Array) -> KVCache:
    """The batch cache with rows [start, start + part.batch) replaced by `part` (same capacity)."""
    put = lambda big, p: jax.lax.dynamic_update_slice_in_dim(big, p, start, axis=_batch_axis(big))
    return jax.tree.map(put, cache, part)


@jax.jit
def _sample(logits_BV: jax.Array, seed_B: jax.Array, step_B: jax.Array, temperature_B: jax.Array, top_p_B: jax.Array):
    """Per-row sampling: greedy where temperature is 0, else temperature and top-p as `generate` samples (the
    same key per step, fold_in(key(seed), step), so a seeded request repeats generate's draw). Returns the
    tokens [B], their log-probs under the unfiltered model [B], and the top alternatives (ids, log-probs) [B, K]."""
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    hot_B = temperature_B > 0

    def sampled() -> jax.Array:
        masked_BV = sampling.truncate(logits_BV / jnp.where(hot_B, temperature_B, 1.0)[:, None], 0, top_p_B)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed_B, step_B)
        draw = lambda key, x_V: jax.random.categorical(key, x_V[None], axis=-1)[0]
        return jnp.where(hot_B, jax.vmap(draw)(keys, masked_BV).astype(jnp.int32), greedy_B)

    tok_B = jax.lax.cond(jnp.any(hot_B), sampled, lambda: greedy_B)
    top_lp_BK, top_ids_BK = jax.lax.top_k(logp_BV, TOP_LOGPROBS)
    return tok_B, jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0], top_ids_BK, top_lp_BK


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Characters at the end of `text` not to send yet: a partial multi-byte character, or a tail that may still
    grow into a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


class Engine:
    """Slots, the queue in front of them, and the thread that prefills and decodes.

    The model's own anchor mode decides what counts as an anchor (set it with checkpoints.set_anchor_mode).
    stop_ids end a request and are left out of its text (the tokenizer's EOS, typically).
    """

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        *,
        policy: str | masks.Policy,
        slots: int,
        capacity: int,
        prefill_chunk: int = 256,
        max_queue: int = 64,
        stop_ids: Sequence[int] = (),
    ):
        if slots < 1 or prefill_chunk < 1 or max_queue < 0:
            raise ValueError(f"slots={slots} and prefill_chunk={prefill_chunk} must be >= 1, max_queue >= 0")
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.anchor_ids, self.rule = cache_spec(model, policy)
        self.slots, self.capacity, self.prefill_chunk, self.max_queue = slots, capacity, prefill_chunk, max_queue
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.cache = kvcache.init(model.cfg, slots, capacity, policy, self.anchor_ids, self.rule)
        self.bytes_per_entry = kvcache.bytes_per_entry(model.cfg)
        self._requests: list[Request | None] = [None] * slots
        self._decoding_B = np.zeros(slots, bool)
        self._last_tok_B = np.zeros(slots, np.int32)
        self._seed_B = np.zeros(slots, np.uint32)
        self._step_B = np.zeros(slots, np.int32)
        self._temperature_B = np.zeros(slots, np.float32)
        self._top_p_B = np.ones(slots, np.float32)
        self._entries_B = np.zeros(slots, np.int64)
        self._peak_entries = 0
        self._decode_totals = {"decode_steps": 0, "decode_tokens": 0, "decode_seconds": 0.0}
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefill: _Prefill | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="anllm-engine", daemon=True)

    # ------------------------------------------------------------------------------------------------------------
    # Called from other threads

    def room(self, prompt_ids: Sequence[int]) -> int:
        """The most tokens a request with this prompt may generate."""
        ids_T = np.asarray(prompt_ids, np.int32)
        return self.capacity - kvcache.kept_after(ids_T, self.anchor_ids, self.policy, self.rule)

    def submit(self, request: Request) -> None:
        """Queue a request. ValueError when it can never fit a slot, QueueFullError when the queue is full."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty; send at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens={request.max_tokens} must be at least 1")
        need = entries_needed(
            request.prompt_ids, request.max_tokens, self.anchor_ids, self.policy, self.prefill_chunk, self.rule
        )
        if need > self.capacity:
            raise ContextTooLongError(
                f"the prompt ({len(request.prompt_ids)} tokens) with max_tokens={request.max_tokens} needs {need} "
                f"cache entries, but a slot holds {self.capacity} ({self.policy} cache); shorten the prompt or "
                "lower max_tokens"
            )
        if request.seed is None:
            request.seed = secrets.randbelow(2**31)
        with self._wake:
            # Waiting requests first take the free slots (one prefill at a time); max_queue counts the rest.
            free = sum(r is None for r in self._requests)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFullError(f"all {self.slots} slots are busy and {self.max_queue} requests are queued")
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away); its slot is freed before the next step. No-op once finished."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def stats(self) -> dict[str, float]:
        """Slots, queue and cache occupancy now; peak entries and decode totals since the start."""
        busy_B = np.array([r is not None for r in self._requests])
        entries = int(np.sum(self._entries_B[self._decoding_B & busy_B]))
        return {
            "slots": self.slots,
            "capacity": self.capacity,
            "queue_depth": len(self._waiting),
            "active_slots": int(np.sum(busy_B)),
            "cache_entries": entries,
            "cache_bytes": entries * self.bytes_per_entry,
            "cache_entries_peak": self._peak_entries,
            "cache_allocated_bytes": (self.slots + 1) * self.capacity * self.bytes_per_entry,
            **self._decode_totals,
        }

    def start(self) -> None:
        self._warm_up()
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    # ------------------------------------------------------------------------------------------------------------
    # The engine thread

    def _free_slot(self) -> int | None:
        return next((b for b, r in enumerate(self._requests) if r is None), None)

    def _warm_up(self) -> None:
        """Compile the decode step, the sampler and the smallest prefill before the first request."""
        row, last_logits = generate.prefill(self.model, [[0]], policy=self.policy, capacity=self.capacity)
        self.cache = _put_rows(self.cache, row, jnp.int32(0))
        self._decode_step(warm_up=True)
        self._sample_rows(last_logits, np.zeros(1, np.uint32), np.zeros(1, np.int32), np.ones(1), np.ones(1))

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._has_work():
                    self._wake.wait()
                if self._stopping:
                    return
                self._drop_cancelled()
                self._admit()
            try:
                self._prefill_step()
                self._decode_step()
            except Exception as e:  # the server lives on; the requests in flight fail cleanly
                self._fail_all(f"{type(e).__name__}: {e}")

    def _has_work(self) -> bool:
        return bool(self._waiting) or self._prefill is not None or any(r is not None for r in self._requests)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
        for b, r in enumerate(self._requests):
            if r is not None and r.cancelled:
                self._release(b)

    def _admit(self) -> None:
        """Start prefilling the oldest waiting request when a slot is free (one prefill at a time: one spare row)."""
        slot = self._free_slot()
        if self._prefill is None and self._waiting and slot is not None:
            request = self._waiting.popleft()
            self._requests[slot] = request
            self._prefill = _Prefill(request, slot)

    def _release(self, slot: int) -> None:
        if self._prefill is not None and self._prefill.slot == slot:
            self._prefill = None
        self._requests[slot] = None
        self._decoding_B[slot] = False

    def _fail_all(self, message: str) -> None:
        for b, r in enumerate(self._requests):
            if r is not None:
                r.emit(Event("", [], [], [], error=message))
                self._release(b)
        # A failed call may have consumed the donated cache; start from an empty one.
        self.cache = kvcache.init(self.model.cfg, self.slots, self.capacity, self.policy, self.anchor_ids, self.rule)

    def _prefill_step(self) -> None:
        """One chunk of the prompt being prefilled; after its last chunk, insert the row and sample token 1."""
        p = self._prefill
        if p is None:
            return
        ids, C = p.request.prompt_ids, self.prefill_chunk
        if p.row is None:
            p.row, p.last_logits = generate.prefill(
                self.model, [ids[:C]], policy=self.policy, capacity=self.capacity, chunk_size=C
            )
            p.done = min(C, len(ids))
        else:
            piece = ids[p.done : p.done + C]
            tokens_1C = np.zeros((1, C), np.int32)
            tokens_1C[0, : len(piece)] = piece
            logits_1CV, p.row = generate.extend(self.model, p.row, tokens_1C, [len(piece)])
            p.last_logits = logits_1CV[:, len(piece) - 1]
            p.done += len(piece)
        # Wait for the chunk: dispatch is asynchronous, and the next decode step's timing should hold decode work only.
        jax.block_until_ready(p.last_logits)
        if p.done < len(ids):
            return
        self.cache = _put_rows(self.cache, p.row, jnp.int32(p.slot))
        self._prefill = None
        r, b = p.request, p.slot
        self._seed_B[b], self._step_B[b] = r.seed, 0
        self._temperature_B[b], self._top_p_B[b] = r.temperature, r.top_p
        self._entries_B[b] = kvcache.kept_after(np.asarray(ids), self.anchor_ids, self.policy, self.rule)
        self._decoding_B[b] = True
        out = self._sample_rows(p.last_logits, self._seed_B[b : b + 1], self._step_B[b : b + 1], r.temperature, r.top_p)
        self._accept(b, *(x[0] for x in out))

    def _decode_step(self, warm_up: bool = False) -> None:
        """Feed every decoding slot its latest token in one forward over all slots, then sample the next for each."""
        if not warm_up and not self._decoding_B.any():
            return
        t0 = time.perf_counter()
        n_new_B = self._decoding_B.astype(np.int32)
        logits_B1V, self.cache = generate.extend(self.model, self.cache, self._last_tok_B[:, None], n_new_B)
        out = self._sample_rows(logits_B1V[:, 0], self._seed_B, self._step_B, self._temperature_B, self._top_p_B)
        self._entries_B = np.asarray(jax.device_get(self.cache.length), np.int64)
        self._peak_entries = max(self._peak_entries, int(np.sum(self._entries_B[self._decoding_B])))
        if not warm_up:
            self._decode_totals["decode_steps"] += 1
            self._decode_totals["decode_tokens"] += int(np.sum(n_new_B))
            self._decode_totals["decode_seconds"] += time.perf_counter() - t0
        for b in np.nonzero(self._decoding_B)[0]:
            self._accept(int(b), *(x[b] for x in out))

    def _sample_rows(self, logits_BV, seed_B, step_B, temperature_B, top_p_B) -> tuple[np.ndarray, ...]:
        args = (np.asarray(seed_B, np.uint32), np.asarray(step_B, np.int32))
        args += (np.asarray(temperature_B, np.float32).reshape(-1), np.asarray(top_p_B, np.float32).reshape(-1))
        return jax.device_get(_sample(logits_BV, *args))

    def _accept(self, slot: int, tok: int, logprob: float, top_ids_K: np.ndarray, top_lp_K: np.ndarray) -> None:
        """Record one sampled token of the request in `slot`; send what is new; free the slot when it is done."""
        r = self._requests[slot]
        tok = int(tok)
        r.n_sampled += 1
        self._step_B[slot] += 1
        self._last_tok_B[slot] = tok
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        finish = "stop" if tok in self.stop_ids else "length" if r.n_sampled >= r.max_tokens else None
        new_lp, new_top = [], []
        if tok not in self.stop_ids:
            r.tokens.append(tok)
            new_lp.append(float(logprob))
            new_top.append([(int(i), float(lp)) for i, lp in zip(top_ids_K, top_lp_K, strict=True)])
        text = self.tokenizer.decode(r.tokens)
        cuts = [text.find(s, max(0, r.sent_chars - len(s))) for s in r.stop_strings]
        cuts = [c for c in cuts if c >= 0]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        end = len(text) if finish else len(text) - _held_back(text, r.stop_strings)
        new_text = text[r.sent_chars : max(end, r.sent_chars)]
        r.sent_chars = max(end, r.sent_chars)
        new_ids = r.tokens[r.sent_tokens :]
        r.sent_tokens = len(r.tokens)
        if finish:
            r.finished_at = time.perf_counter()
            self._release(slot)
        r.emit(Event(new_text, new_ids, new_lp, new_top, finish, r.n_sampled if finish else 0))
