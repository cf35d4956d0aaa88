"""anllm-jax: anchor-based LLMs (AnLLM) in JAX."""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m anllm_jax.<tool>`, while the tool's module is being located
    from anllm_jax.hostmem import preload_tcmalloc

    preload_tcmalloc()
