"""What every result file carries and how it is written: the git commit, the hardware, and atomic writes of files
and folders, so that a run stopped mid-write leaves the previous output whole rather than a truncated one, and no
writer replaces a folder it did not make."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def commit() -> str:
    """Short git commit of the checkout holding this package, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def hardware() -> str:
    """One line naming the devices jax computes on, e.g. "gpu: NVIDIA H100 80GB HBM3 x1"."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"
    return f"{d.platform}: {d.device_kind} x{jax.device_count()}"


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def check_output_dir(directory: str | Path, own: Callable[[Path], bool], overwrite: bool = False) -> None:
    """Refuse, before any work, to replace what this writer did not make: an existing non-empty `directory` is
    replaced only when `own(directory)` recognises it as this writer's kind of output, or with `overwrite`; never
    the current folder or one of its parents."""
    path = Path(directory).absolute()
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise ValueError(f"{directory} is the current folder or one that holds it; write into a new folder")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())) or own(path):
        return
    if not path.is_dir():
        raise ValueError(f"{directory} is a file, not a folder; pass a new folder")
    if not overwrite:
        raise ValueError(
            f"{directory} is not empty and holds something other than this command's output; pass a new or empty "
            "folder, or --overwrite to replace it"
        )


def replace_dir(
    directory: str | Path, write: Callable[[str], None], own: Callable[[Path], bool], overwrite: bool = False
) -> None:
    """Write a folder atomically: `write(tmp)` fills a sibling temporary folder, which then takes the place of
    `directory`; an existing one goes only once the new one is whole (see `check_output_dir` for what may go)."""
    check_output_dir(directory, own, overwrite)
    directory = os.path.abspath(directory)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = f"{directory}.tmp-{tag}"
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(directory):
        old = f"{directory}.old-{tag}"
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old)
    else:
        os.rename(tmp, directory)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point array of a pytree held by this process is finite: nothing non-finite is ever
    written."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in leaves)


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a truncated or corrupt file is a one-line error that names it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); it is truncated or corrupt") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; it is corrupt") from None


def check_writable(directory: str | Path, what: str) -> None:
    """Before any expensive work: `directory` can be made and written into (a probe file is written and removed)."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{what} {directory} is not writable ({e.strerror}); choose another folder") from None
