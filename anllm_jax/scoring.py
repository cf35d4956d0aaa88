"""Log-likelihood scoring of answer options, shared by the eval CLI and the lm-evaluation-harness plugin.

- `score_masked`: one forward per row under an attention mask, options of a document batched together, documents
  batched up to a token budget, the output head run only at the scored positions.
- `score_cached`: a shared prefix (the demonstrations, else each document's shared context) prefilled once into a
  KV cache of a policy (full, anchor or another `masks.Policy`), every row scored against it.

Both return, per document, each option's float64 log-likelihood and whether every option token was the argmax.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from anllm_jax import generate, kvcache, masks, tasks
from anllm_jax.model import Llama


def _bucket(n: int) -> int:
    """Padded length: the next of 16, 24, 32, 48, 64, 96, ... (at most 1.5x padding, few compilations)."""
    b = 16
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b // 3 * 4
    return b


@functools.partial(jax.jit, static_argnums=(0, 7))
def _masked_loglik_jit(
    graphdef, state, tokens_BT, segment_ids_BT, at_BK, targets_BK, weights_BK, mask: str | masks.Policy
) -> tuple[jax.Array, jax.Array]:
    """Sum over k of weights[b, k] * log p(targets[b, k] | tokens[b, :at[b, k]+1]) under the attention mask
    `mask`, and whether every weighted target was the argmax; the output head runs only at the positions `at_BK`."""
    model = nnx.merge(graphdef, state)
    logits_BKV = model(tokens_BT, segment_ids_BT=segment_ids_BT, mask=mask, logits_at_BK=at_BK)
    logp_BK = jnp.take_along_axis(jax.nn.log_softmax(logits_BKV, axis=-1), targets_BK[..., None], axis=-1)[..., 0]
    greedy_B = jnp.all((jnp.argmax(logits_BKV, axis=-1) == targets_BK) | (weights_BK == 0), axis=1)
    return jnp.sum(logp_BK * weights_BK, axis=1), greedy_B


def _check_finite(enc: tasks.EncodedTask, d: int, lls: np.ndarray, how: str) -> None:
    """A NaN or Inf log-likelihood would turn into an accuracy that means nothing: stop at the first one."""
    if not np.isfinite(lls).all():
        o = int(np.flatnonzero(~np.isfinite(lls))[0])
        raise FloatingPointError(
            f"{enc.name} document {d} option {o}: the log-likelihood under {how} is {lls[o]}; the model's weights "
            "or its --dtype overflow: use an earlier checkpoint or --dtype float32"
        )


def _doc_order(enc: tasks.EncodedTask) -> list[int]:
    """Documents longest first, so batches hold similar lengths."""
    longest = [max(len(c) + len(o) for c, o in opts) for opts in enc.options]
    return sorted(range(len(enc.options)), key=lambda d: -longest[d])


def score_masked(
    model: Llama, enc: tasks.EncodedTask, mask: str | masks.Policy, token_budget: int = 512, progress: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-document float64 log-likelihoods of each option and whether each option was the greedy continuation:
    one forward per row under the attention mask `mask`, all options of a document in one batch, documents batched
    up to `token_budget` padded tokens."""
    graphdef, state = nnx.split(model)
    out: list[np.ndarray | None] = [None] * len(enc.options)
    greedy: list[np.ndarray | None] = [None] * len(enc.options)
    order = _doc_order(enc)
    n_opt = max(len(o) for o in enc.options)
    bar = tqdm(total=len(order), desc=f"{enc.name} {str(mask).partition(':')[0]}", disable=not progress, leave=False)
    i = 0
    while i < len(order):
        T = _bucket(max(len(enc.row(order[i], o)) for o in range(len(enc.options[order[i]]))))
        n_docs = 1
        while n_docs * 2 * n_opt * T <= token_budget and i + n_docs * 2 <= len(order):
            n_docs *= 2
        batch = order[i : i + n_docs]
        rows = [(d, o) for d in batch for o in range(len(enc.options[d]))]
        B = n_docs * n_opt
        K = _bucket(max(len(enc.options[d][o][1]) for d, o in rows))
        tokens = np.zeros((B, T), np.int32)
        segments = np.zeros((B, T), np.int32)
        at = np.zeros((B, K), np.int32)
        targets = np.zeros((B, K), np.int32)
        weights = np.zeros((B, K), np.float32)
        for r, (d, o) in enumerate(rows):
            row = enc.row(d, o)
            n_cont = len(enc.options[d][o][1])
            tokens[r, : len(row)] = row
            segments[r, : len(row)] = 1
            # The logits at position t predict token t + 1: the continuation's tokens are predicted from the
            # n_cont positions before the row's last.
            at[r, :n_cont] = np.arange(len(row) - 1 - n_cont, len(row) - 1)
            targets[r, :n_cont] = row[len(row) - n_cont :]
            weights[r, :n_cont] = 1.0
        sums, all_greedy = jax.device_get(
            _masked_loglik_jit(graphdef, state, tokens, segments, at, targets, weights, mask)
        )
        for r, (d, o) in enumerate(rows):
            if out[d] is None:
                out[d], greedy[d] = np.zeros(len(enc.options[d])), np.zeros(len(enc.options[d]), bool)
            out[d][o], greedy[d][o] = sums[r], all_greedy[r]
        for d in batch:
            _check_finite(enc, d, out[d], f"the {str(mask).partition(':')[0]} mask")
        i += n_docs
        bar.update(n_docs)
    bar.close()
    return out, greedy


def _common_prefix(contexts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix that all `contexts` share."""
    n = min(len(c) for c in contexts)
    for k in range(n):
        if any(c[k] != contexts[0][k] for c in contexts):
            return k
    return n


def _shared_context(options: list[tuple[list[int], list[int]]]) -> int:
    """Length of the longest token prefix that all options' contexts share (never reaching a continuation)."""
    return _common_prefix([ctx for ctx, _ in options])


def with_shared_prefix(name: str, options: list[list[tuple[list[int], list[int]]]]) -> tasks.EncodedTask:
    """Documents of (context, continuation) ids as an EncodedTask whose prefix is the context all documents share
    (demonstrations repeated before every question) when caching it once runs fewer tokens through the model than
    caching each document's own shared context (`score_cached`); else with no prefix."""
    pairs = [pair for opts in options for pair in opts]
    P = _common_prefix([ctx for ctx, _ in pairs])
    rows = sum(len(ctx) + len(cont) for ctx, cont in pairs)
    per_document = rows - sum((len(opts) - 1) * _shared_context(opts) for opts in options)
    if P == 0 or P + rows - len(pairs) * P >= per_document:
        return tasks.EncodedTask(name, [], [], options)
    return tasks.EncodedTask(name, [], pairs[0][0][:P], [[(ctx[P:], cont) for ctx, cont in opts] for opts in options])


def score_cached(
    model: Llama,
    enc: tasks.EncodedTask,
    policy: str | masks.Policy = "anchor",
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """Per-document log-likelihoods against the KV cache of a shared prefix, whether each option was the greedy
    continuation, and statistics of that cache.

    policy "anchor": the anchor cache under the model's AnSAN mask (equal to the "ansan" masked forward);
    "full": every entry under the causal mask (equal to the "full" forward); a `masks.Policy`: its cache (equal
    to the forward under its mask).
    With demonstrations, they are prefilled once and every question + option row is scored against the
    cache. Zero-shot, each document's shared context is prefilled and its options scored against it (a
    document whose options share no token is scored by the masked forward, which is the same function).
    """
    mask = "full" if policy == "full" else "model"
    out: list[np.ndarray | None] = [None] * len(enc.options)
    greedy: list[np.ndarray | None] = [None] * len(enc.options)
    order = _doc_order(enc)
    stats = {"prefix_tokens": len(enc.prefix), "prefix_entries_kept": 0, "prefills": 0}
    bar = tqdm(
        total=len(order), desc=f"{enc.name} {str(policy).partition(':')[0]}-cache", disable=not progress, leave=False
    )

    def collect(docs: list[int], rows: list[list[int]], scored: tuple[list[np.ndarray], list[np.ndarray]]) -> None:
        k = 0
        for d in docs:
            out[d], greedy[d] = np.zeros(len(enc.options[d])), np.zeros(len(enc.options[d]), bool)
            for o, (_, cont) in enumerate(enc.options[d]):
                start = len(rows[k]) - len(cont)
                out[d][o] = float(np.sum(scored[0][k][start:], dtype=np.float64))
                greedy[d][o] = bool(np.all(scored[1][k][start:]))
                k += 1
            _check_finite(enc, d, out[d], f"the {str(policy).partition(':')[0]} cache")

    if enc.prefix:
        cache, last_logits = generate.prefill(model, [enc.prefix], policy=policy, mask=mask)
        stats["prefix_entries_kept"] = int(jax.device_get(cache.length)[0])
        stats["prefills"] = 1
        n_opt = max(len(o) for o in enc.options)
        step = max(1, batch_size // n_opt)
        for i in range(0, len(order), step):
            docs = order[i : i + step]
            rows = [ctx + cont for d in docs for ctx, cont in enc.options[d]]
            collect(docs, rows, generate.score_continuations(model, cache, last_logits, rows, batch_size=batch_size))
            bar.update(len(docs))
    else:
        for d in order:
            rows = [ctx + cont for ctx, cont in enc.options[d]]
            shared = _shared_context(enc.options[d])
            if shared == 0:
                single = tasks.EncodedTask(enc.name, enc.docs[d : d + 1], [], [enc.options[d]])
                rule = mask if policy in ("full", "anchor") else masks.parse_policy(policy)
                lls, flags = score_masked(model, single, rule, progress=False)
                out[d], greedy[d] = lls[0], flags[0]
            else:
                cache, last_logits = generate.prefill(model, [rows[0][:shared]], policy=policy, mask=mask)
                stats["prefix_entries_kept"] += int(jax.device_get(cache.length)[0])
                stats["prefix_tokens"] += shared
                stats["prefills"] += 1
                rest = [r[shared:] for r in rows]
                collect([d], rest, generate.score_continuations(model, cache, last_logits, rest, batch_size=len(rows)))
            bar.update(1)
    bar.close()
    return out, greedy, stats


def kv_counts(
    enc: tasks.EncodedTask, anchor_ids: tuple[int, ...], policy: str | masks.Policy = "anchor"
) -> tuple[int, int]:
    """(full cache entries, entries `policy`'s cache keeps at the end of each row) summed over every scored row
    (the anchor policy keeps everything when there are no anchor ids)."""
    full = kept = 0
    plain = policy == "anchor" and not anchor_ids
    for d, opts in enumerate(enc.options):
        for o in range(len(opts)):
            row = np.asarray(enc.row(d, o))
            full += len(row)
            kept += len(row) if plain else kvcache.kept_after(row, anchor_ids, policy)
    return full, kept
