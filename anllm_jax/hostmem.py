"""Host memory: the command-line tools run under tcmalloc when it is installed.

XLA's CPU backend allocates and frees its temporaries (a training step's logits alone are hundreds of MiB) on
every call. glibc's malloc hands blocks that large back to the kernel at once, so each step page-faults its
whole working set in again: on a 2-core machine a third of the CPU time of a SmolLM2-135M step went to the kernel.
tcmalloc keeps freed pages for reuse (measured: the same step ~1.3x faster, kernel time near zero; docs/benchmarks.md).
"""

from __future__ import annotations

import os
import sys

LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
OPT_OUT = "ANLLM_TCMALLOC"  # set to 0 to keep the system allocator


def find_tcmalloc() -> str | None:
    """Path of an installed tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4), or None."""
    for directory in SEARCH_DIRS:
        for name in LIBRARIES:
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
    return None


def preload_tcmalloc() -> None:
    """Restart this `python -m ...` command with tcmalloc preloaded, unless it is already loaded, not installed,
    or switched off with ANLLM_TCMALLOC=0. Runs when the package is imported by `-m`, before JAX starts, so the
    restart costs only the interpreter's start-up."""
    preload = os.environ.get("LD_PRELOAD", "")
    if os.environ.get(OPT_OUT) == "0" or "tcmalloc" in preload or not sys.platform.startswith("linux"):
        return
    path = find_tcmalloc()
    if path is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{path}:{preload}" if preload else path
    # tcmalloc reports every allocation over 1 GiB on stderr; a model's buffers are routinely that large.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
