"""`digits`: scikit-learn's 1,797 handwritten 8x8 digits as 16x16 RGB images.

Source: `sklearn.datasets.load_digits` (ships with scikit-learn, no download).
Pixels 0..16 are scaled to 0..255 (rounded), each pixel is repeated into a 2x2
block (nearest-neighbour upsampling: no invented in-between values, so the
8-bit data stays exactly what was measured) and grey is copied to R, G and B.

Since 1.1.0 each example also has English captions of its label made from
templates ("a handwritten seven", "the digit 7", ...), and the prepared
dataset directory holds `tokenizer.model`, a small sentencepiece model trained
on all train captions, for image-text demos.
"""
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.datasets import sentencepiece_model
from input_pipeline.datasets.png import encode_png
from input_pipeline.datasets.random_access import RandomAccessBuilder

NUM_TRAIN = 1497
NUM_VALIDATION = 300
_SPLIT_SEED = 0

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
         "eight", "nine")
# {word}: "seven", {a_word}: "a seven" / "an eight", {numeral}: "7".
TEMPLATES = (
    "a handwritten {word}",
    "the digit {numeral}",
    "a drawing of the number {word}",
    "{a_word}",
    "number {numeral} written by hand",
    "a small grey picture of the digit {word}",
    "a {numeral} drawn with a pen",
)
CAPTIONS_PER_EXAMPLE = 3
TOKENIZER_VOCAB_SIZE = 96  # Longest template caption: 12 tokens.


def digit_images() -> tuple[np.ndarray, np.ndarray]:
  """All digits as ([1797, 16, 16, 3] uint8, [1797] int64 labels)."""
  from sklearn import datasets  # Slow import: only needed to prepare.
  digits = datasets.load_digits()
  grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
  grey = grey.repeat(2, axis=1).repeat(2, axis=2)  # [N, 16, 16]
  rgb = np.repeat(grey[..., None], 3, axis=-1)  # [N, 16, 16, 3]
  return rgb, digits.target


def label_captions(label: int) -> list[str]:
  """Every template filled in for one digit, in template order."""
  word = WORDS[label]
  a_word = ("an " if word[0] in "aeiou" else "a ") + word
  return [t.format(word=word, a_word=a_word, numeral=label)
          for t in TEMPLATES]


def example_captions(index: int, label: int) -> list[str]:
  """CAPTIONS_PER_EXAMPLE different templates, a fixed choice per example."""
  chosen = np.random.default_rng([_SPLIT_SEED, index]).choice(
      len(TEMPLATES), CAPTIONS_PER_EXAMPLE, replace=False)
  captions = label_captions(label)
  return [captions[t] for t in chosen]


def split_indices() -> dict[str, np.ndarray]:
  """Fixed-seed permutation of the 1,797 examples into train/validation."""
  order = np.random.default_rng(_SPLIT_SEED).permutation(
      NUM_TRAIN + NUM_VALIDATION)
  return {"train": order[:NUM_TRAIN], "validation": order[NUM_TRAIN:]}


class Digits(RandomAccessBuilder):
  """scikit-learn digits, 16x16 RGB, 1,497 train / 300 validation."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Template captions per example; ships tokenizer.model.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(16, 16, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    images, labels = digit_images()
    splits = split_indices()
    self._write_tokenizer(labels, splits["train"])
    return {
        split: self._generate_examples(images, labels, indices)
        for split, indices in splits.items()
    }

  def _write_tokenizer(self, labels, train_indices):
    # data_path is TFDS's temporary directory here, renamed to the versioned
    # one once preparation succeeds: the tokenizer is part of the dataset.
    captions = [c for i in train_indices
                for c in example_captions(int(i), int(labels[i]))]
    model = sentencepiece_model.train_sentencepiece(
        captions, TOKENIZER_VOCAB_SIZE)
    (self.data_path / sentencepiece_model.TOKENIZER_FILE).write_bytes(model)

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      label = int(labels[i])
      yield int(i), {"image": encode_png(images[i]), "label": label,
                     "captions": example_captions(int(i), label)}
