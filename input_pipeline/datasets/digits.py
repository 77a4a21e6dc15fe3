"""`digits`: scikit-learn's 1,797 handwritten 8x8 digits as 16x16 RGB images.

Source: `sklearn.datasets.load_digits` (ships with scikit-learn, no download).
Pixels 0..16 are scaled to 0..255 (rounded), each pixel is repeated into a 2x2
block (nearest-neighbour upsampling: no invented in-between values, so the
8-bit data stays exactly what was measured) and grey is copied to R, G and B.
"""
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.datasets.png import encode_png
from input_pipeline.datasets.random_access import RandomAccessBuilder

NUM_TRAIN = 1497
NUM_VALIDATION = 300
_SPLIT_SEED = 0


def digit_images() -> tuple[np.ndarray, np.ndarray]:
  """All digits as ([1797, 16, 16, 3] uint8, [1797] int64 labels)."""
  from sklearn import datasets  # Slow import: only needed to prepare.
  digits = datasets.load_digits()
  grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
  grey = grey.repeat(2, axis=1).repeat(2, axis=2)  # [N, 16, 16]
  rgb = np.repeat(grey[..., None], 3, axis=-1)  # [N, 16, 16, 3]
  return rgb, digits.target


def split_indices() -> dict[str, np.ndarray]:
  """Fixed-seed permutation of the 1,797 examples into train/validation."""
  order = np.random.default_rng(_SPLIT_SEED).permutation(
      NUM_TRAIN + NUM_VALIDATION)
  return {"train": order[:NUM_TRAIN], "validation": order[NUM_TRAIN:]}


class Digits(RandomAccessBuilder):
  """scikit-learn digits, 16x16 RGB, 1,497 train / 300 validation."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(16, 16, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    images, labels = digit_images()
    return {
        split: self._generate_examples(images, labels, indices)
        for split, indices in split_indices().items()
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": encode_png(images[i]), "label": int(labels[i])}
