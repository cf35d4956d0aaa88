"""What every result file carries and how it is written: the git commit, the hardware, and atomic writes of files
and folders, so that a run stopped mid-write leaves the previous output whole rather than a truncated one, and no
writer replaces a folder it did not make."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
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
    """Strict JSON (a NaN or Inf is a ValueError, never a bare `NaN` other readers reject), written atomically."""
    write_text(path, json.dumps(obj, indent=indent, allow_nan=False))


# ---------------------------------------------------------------------------------------------------------------------
# Ownership: every writer records what it wrote in a manifest and replaces only that.

MANIFEST = ".anllm-output.json"


def _entry(path: Path) -> list[Any]:
    """[size, sha256, mtime_ns] of a file: the size and mtime spare re-hashing an untouched file; the hash
    recognises one that was copied (new mtime, same bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    st = path.stat()
    return [st.st_size, digest.hexdigest(), st.st_mtime_ns]


def _unchanged(path: Path, versions: list[list[Any]]) -> bool:
    """Whether `path` holds one of the recorded versions [size, sha256, mtime_ns or None] of a file."""
    st = path.stat()
    sized = [v for v in versions if v[0] == st.st_size]
    if any(v[2] == st.st_mtime_ns for v in sized):
        return True
    return bool(sized) and _entry(path)[1] in {v[1] for v in sized}


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest a writer left in `directory`, or None (none, or not one of ours)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files", {}), dict) else None


def _foreign(directory: Path, writer: str) -> tuple[list[str], str]:
    """(what in `directory` the writer did not write or that was changed since, why): every file its manifest
    does not list as written, unchanged, by `writer`, and every folder holding none of its files."""
    manifest = read_manifest(directory)
    if manifest is None:
        why = f"no {MANIFEST}: an output of an older anllm_jax version, or files of someone else"
        manifest = {"files": {}}
    elif manifest.get("writer") != writer:
        why = f"{MANIFEST} says {manifest.get('writer')!r} wrote them, not {writer!r}"
        manifest = {"files": {}}
    else:
        why = "not written by it, or changed since"
    files = manifest.get("files", {})
    parents = {str(Path(name).parent) for name in files} | {"."}
    parents |= {str(p) for name in parents for p in Path(name).parents}
    foreign = []
    for root, dirs, names in os.walk(directory):
        rel = Path(root).relative_to(directory)
        foreign += [str(rel / d) for d in dirs if str(rel / d) not in parents]
        dirs[:] = [d for d in dirs if str(rel / d) in parents]
        for name in names:
            key = str(rel / name)
            if key != MANIFEST and not (key in files and _unchanged(Path(root) / name, files[key])):
                foreign.append(key)
    return sorted(foreign), why


def check_output_dir(
    directory: str | Path,
    writer: str,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    fix: str = "pass a new or empty folder, or --overwrite to replace it",
) -> None:
    """Refuse, before any work, to write where this writer could lose what it did not make: `directory` may hold
    only what `writer` recorded in its manifest (anything else needs `overwrite`; `fix` says how), and it is never
    the current folder, an input, or a folder holding one of those (not even with `overwrite`)."""
    path = Path(directory).absolute()
    for other, what in ((Path.cwd(), "the current folder"), *((Path(p), f"the input {p}") for p in inputs)):
        if other.resolve().is_relative_to(path.resolve()):
            raise ValueError(f"{directory} is {what} or a folder that holds it; write into a new folder")
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{directory} is a file, not a folder; pass a new folder")
    foreign, why = _foreign(path, writer)
    if foreign and not overwrite:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ValueError(f"{directory} holds {foreign[0]}{more} that {writer} did not write ({why}); {fix}")


def _write_manifest(directory: Path, writer: str, files: dict[str, list[list[Any]]], **extra: Any) -> None:
    write_json(directory / MANIFEST, {"writer": writer, "commit": commit(), **extra, "files": files})


def replace_dir(
    directory: str | Path,
    write: Callable[[str], None],
    writer: str,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    **extra: Any,
) -> None:
    """Write a folder atomically: `write(tmp)` fills a sibling temporary folder, whose manifest then records every
    file (and `extra`), and which takes the place of `directory`; an existing one goes only once the new one is
    whole (see `check_output_dir` for what may go)."""
    check_output_dir(directory, writer, overwrite, inputs)
    directory = os.path.abspath(directory)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = f"{directory}.tmp-{tag}"
    os.makedirs(tmp)
    try:
        write(tmp)
        files = {
            str(p.relative_to(tmp)): [_entry(p)]
            for p in sorted(Path(tmp).rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        _write_manifest(Path(tmp), writer, files, **extra)
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


def write_files(
    directory: str | Path, fills: dict[str, Callable[[Path], None]], writer: str, overwrite: bool = False
) -> None:
    """Write files into a folder others may share (eval's reports): `fills[name](tmp)` writes each to a temporary
    file, and each then replaces `name` in one rename. The manifest lists both the old and the new version of
    every file while they are swapped, so a crash at any point leaves each file whole and still this writer's."""
    out = Path(directory)
    check_output_dir(out, writer, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out) or {}
    files = manifest.get("files", {}) if manifest.get("writer") == writer else {}
    tmps = {name: out / f".tmp-{os.getpid()}-{name}" for name in fills}
    try:
        for name, fill in fills.items():
            fill(tmps[name])
        new = {name: _entry(tmp)[:2] + [None] for name, tmp in tmps.items()}
        _write_manifest(out, writer, {**files, **{n: files.get(n, [])[:1] + [v] for n, v in new.items()}})
        for name, tmp in tmps.items():
            os.replace(tmp, out / name)
        _write_manifest(out, writer, {**files, **{n: [new[n][:2] + [(out / n).stat().st_mtime_ns]] for n in new}})
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def claim_dir(directory: str | Path, writer: str, fix: str) -> None:
    """A folder one writer keeps adding to (a training run): a new or empty one gets that writer's manifest
    (without a file list: what it holds changes with every step); a non-empty one must already carry it."""
    path = Path(directory)
    if path.is_dir() and any(path.iterdir()):
        manifest = read_manifest(path)
        if manifest is None or manifest.get("writer") != writer:
            found = f"{MANIFEST} names {manifest.get('writer')!r}" if manifest else f"no {MANIFEST}"
            raise ValueError(f"{directory} is not empty and {writer} did not make it ({found}); {fix}")
        return
    path.mkdir(parents=True, exist_ok=True)
    _write_manifest(path, writer, {})


# ---------------------------------------------------------------------------------------------------------------------
# One job per folder: a lock file naming its holder, refreshed while it lives.

LOCK = ".lock"
LOCK_REFRESH_S = 30.0
LOCK_STALE_S = 300.0  # a lock of another host not refreshed for this long was left by a job that is gone


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), which tells it from a later process with its pid;
    None when no such process runs. "" where /proc is missing and only its existence can be checked."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""


def lock_owner(pid: int) -> dict[str, Any]:
    """What a lock records about process `pid` of this host."""
    return {"host": platform.node(), "pid": pid, "boot": _boot_id(), "started": _started(pid), "since": time.time()}


def _gone(owner: dict[str, Any], age_s: float) -> bool:
    """Whether the job that wrote a lock has ended: on this host its process is gone (or is another process with
    its pid, or the host rebooted); on another host it stopped refreshing the lock."""
    if owner.get("host") != platform.node():
        return age_s > LOCK_STALE_S
    started = _started(int(owner.get("pid", -1)))
    return owner.get("boot") != _boot_id() or started is None or started != owner.get("started") and started != ""


class DirLock:
    """Held while a job works in `directory`: a second job is refused at start, and a lock left by a job that
    ended without releasing it (killed, crashed host) is taken over."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK
        self._stop = threading.Event()
        self._owner = lock_owner(os.getpid())
        self.took_over: dict[str, Any] | None = None  # the owner of a lock left behind, when one was taken over
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse(directory)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._owner, f)
            threading.Thread(target=self._refresh, daemon=True, name="anllm-lock").start()
            return
        raise ValueError(f"{self.path} keeps coming back; another job is starting in {directory}")

    def _take_over_or_refuse(self, directory: str | Path) -> None:
        try:
            age = time.time() - self.path.stat().st_mtime
            owner = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return
        except ValueError:
            owner = {}  # being written right now, or cut short by a crash
        if not _gone(owner, age):
            raise ValueError(
                f"{directory} is in use by process {owner.get('pid', '?')} on {owner.get('host', '?')} (its lock "
                f"{self.path} was refreshed {age:.0f} s ago); wait for that job to end or stop it, or pick another "
                f"run_name (a lock of another host counts as left behind after {LOCK_STALE_S:.0f} s)"
            )
        self.path.unlink(missing_ok=True)
        self.took_over = owner

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == self._owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def all_finite(tree: Any) -> bool:
    """Whether every floating-point array of a pytree held by this process is finite: nothing non-finite is ever
    written."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in leaves)


def error_reason(e: BaseException) -> str:
    """The first line of an error's cause, short: orbax's messages hold a whole TensorStore spec."""
    cause = e.__cause__ or e
    return str(cause).splitlines()[0][:300] if str(cause) else type(cause).__name__


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
    """Before any expensive work: `directory` can be made and written into (a probe file is written and removed,
    and so are the folders made for it: a check leaves nothing behind)."""
    path = Path(directory).absolute()
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        for p in made:
            p.rmdir()
    except OSError as e:
        raise ValueError(f"{what} {directory} is not writable ({e.strerror}); choose another folder") from None
