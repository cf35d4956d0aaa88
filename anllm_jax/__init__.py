"""anllm-jax: anchor-based LLMs (AnLLM) in JAX."""
