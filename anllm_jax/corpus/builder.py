"""tfds builder of the raw-document corpus: array_record files, read without TensorFlow.

Each record is {"text": UTF-8 text, "source": where it came from}. Splits: "train" and, when a validation
share is asked for, "validation" (whole documents, picked by `anllm_jax.data.prepare`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from anllm_jax.corpus.sources import REGISTRY, iter_documents


class AnllmCorpus(tfds.core.GeneratorBasedBuilder):
    """Raw English documents for continual pretraining (registered in tfds as "anllm_corpus")."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw documents with train/validation splits."}

    def __init__(
        self,
        *,
        sources: Sequence[str] = (REGISTRY,),
        validation_keys: frozenset[str] = frozenset(),
        max_docs: int | None = None,
        **kwargs,
    ):
        # Build-time inputs only; reading a prepared corpus needs none of them.
        self._sources = tuple(sources)
        self._validation_keys = validation_keys
        self._max_docs = max_docs
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Raw English documents (one record per document) for AnLLM continual pretraining.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "source": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # every source is local
        splits = {"train": self._generate_examples(validation=False)}
        if self._validation_keys:
            splits["validation"] = self._generate_examples(validation=True)
        return splits

    def _generate_examples(self, validation: bool) -> Iterator[tuple[str, dict[str, str]]]:
        for source in self._sources:
            for doc in iter_documents(source, self._max_docs):
                if doc.text.strip() and (doc.key in self._validation_keys) == validation:
                    yield doc.key, {"text": doc.text, "source": doc.source}
