"""Offline TFDS datasets; importing this registers them with TFDS by name."""
from input_pipeline.datasets import digits  # noqa: F401  (registers it)
from input_pipeline.datasets import photo_patches  # noqa: F401

# Datasets whose source data ships with pip packages: prepared on first use.
OFFLINE = ("digits", "photo_patches")
# Offline datasets whose prepared directory holds a sentencepiece tokenizer.
WITH_TOKENIZER = ("digits",)
