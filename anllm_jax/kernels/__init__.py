"""Accelerator kernels (Pallas) for attention paths of anllm_jax."""
