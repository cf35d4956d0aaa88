"""The raw-document corpus: sources (registry packages, local folders) and its tfds builder."""

from anllm_jax.corpus.builder import AnllmCorpus
from anllm_jax.corpus.sources import REGISTRY, Document, iter_documents

__all__ = ["REGISTRY", "AnllmCorpus", "Document", "iter_documents"]
