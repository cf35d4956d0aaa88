"""Command-line inputs shared by the generate and eval CLIs and the benchmarks: prompt files, and attention
policies from flags.

    --cache streaming --sinks 4 --window 252          (generate)
    --mode full,sepllm-cache --window 64               (eval)

A flag applies to the policies that take that parameter (docs/policies.md); SepLLM's separators are given as
strings, each one token of the model's vocabulary, and become the policy's separator ids.
"""

from __future__ import annotations

import argparse
import codecs
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anllm_jax import masks

# SepLLM's separators: punctuation, space, tab and newline.
SEPLLM_SEPARATORS = (".", ",", "?", "!", ";", ":", " ", "\t", "\n")
_FLAGS = {"sinks": "sinks", "window": "window", "anchors": "anchors_kept", "separators": "separators_kept"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy parameters (docs/policies.md)")
    g.add_argument("--sinks", type=int, help="first tokens of the text every query sees (streaming, sepllm)")
    g.add_argument(
        "--window",
        type=int,
        help="tokens before the query it sees (streaming, sepllm, window; ansan-bounded: of its sentence)",
    )
    g.add_argument("--anchors-kept", type=int, help="ansan-bounded: last anchors a query sees (default 64)")
    g.add_argument("--separators-kept", type=int, help="sepllm: last separators a query sees (default: all)")
    g.add_argument(
        "--separators",
        nargs="+",
        help="sepllm: separator strings, one token each, escapes such as \\n allowed (default: . , ? ! ; : space tab "
        "newline, those that are one token)",
    )


def separator_ids(tokenizer: Any, strings: Sequence[str] | None) -> tuple[int, ...]:
    """Token ids of separator strings; without strings, those of SepLLM's separators that are one token."""
    ids = []
    for s in SEPLLM_SEPARATORS if strings is None else strings:
        text = codecs.decode(s, "unicode_escape") if strings is not None and "\\" in s else s
        try:
            ids += tokenizer.anchor_ids("ep", (text,))
        except ValueError:
            if strings is not None:
                raise ValueError(
                    f"separator {text!r} is not one token of this vocabulary; pass single tokens"
                ) from None
    if not ids:
        raise ValueError("no separator is one token of this vocabulary; pass --separators with single tokens")
    return tuple(dict.fromkeys(ids))


def from_args(name: str | masks.Policy, args: argparse.Namespace, tokenizer: Any) -> masks.Policy:
    """Policy `name` (a name or spec, see `masks.parse_policy`) with the parameters the flags give (those it
    takes); sepllm without separator ids gets those of --separators (default: SepLLM's)."""
    base = masks.parse_policy(name)
    params = {f: getattr(base, f) for f in masks.policy_parameters(base.name)}
    for f, flag in _FLAGS.items():
        if f in params and getattr(args, flag, None) is not None:
            params[f] = getattr(args, flag)
    ids, strings = base.separator_ids, getattr(args, "separators", None)
    if base.name == "sepllm" and (not ids or strings is not None):
        ids = separator_ids(tokenizer, strings)
    return masks.Policy(base.name, **params, separator_ids=ids)


def check_used(names: Sequence[str], args: argparse.Namespace) -> None:
    """One-line error for a parameter flag that none of the chosen policies takes."""
    takes = {f for n in names if n in (*masks.POLICY_NAMES, "anchor") for f in masks.policy_parameters(n)}
    if getattr(args, "separators", None) is not None and "sepllm" not in names:
        raise ValueError("--separators applies to policy sepllm only; drop it or choose sepllm")
    for f, flag in _FLAGS.items():
        if getattr(args, flag, None) is not None and f not in takes:
            raise ValueError(
                f"--{flag.replace('_', '-')} applies to none of the chosen policies ({', '.join(names)}); drop it or "
                "choose a policy that takes it (docs/policies.md)"
            )


def cache_policy(choice: str | None, cfg: Any, args: argparse.Namespace, tokenizer: Any) -> str | masks.Policy:
    """The cache a CLI's `--cache` choice names, with its flags: by default the model's own policy (`anchor` for
    ep/ac models, `full` otherwise); `full`, `none` and `anchor` stay names."""
    choice = choice or cfg.policy or ("anchor" if cfg.anchor_mode != "full" else "full")
    check_used([masks.parse_policy(choice).name if choice != "none" else choice], args)
    return choice if choice in ("full", "none", "anchor") else from_args(choice, args, tokenizer)


def read_prompts(path: str) -> list[dict]:
    """Prompts of a file: JSON lines with a "prompt" key (other keys are kept and echoed back), or else one
    prompt per non-empty line of plain text."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise ValueError(
            f"prompt file {path} does not exist; pass a text file (one prompt per line) or JSONL"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if not path.endswith((".jsonl", ".json")):
        return [{"prompt": line} for line in lines]
    records = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i} is not JSON ({e.msg}); write one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'{path} line {i} has no string "prompt" key; write {{"prompt": "...", ...}} per line')
        records.append(record)
    return records
