"""`photo_patches`: random 32x32 RGB crops of colour photographs.

The photographs ship with scikit-learn and scikit-image (no download). Every
photo is cut at 4/5 of its height: train crops lie entirely in the top part,
validation crops entirely in the bottom fifth, so validation measures how well
a model generalises to unseen image content rather than memorised pixels.
"""
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.datasets.png import encode_png
from input_pipeline.datasets.random_access import RandomAccessBuilder

PHOTOS = ("china", "flower", "astronaut", "chelsea", "coffee", "rocket",
          "motorcycle")
PATCH = 32
TRAIN_PER_PHOTO = 1024
VALIDATION_PER_PHOTO = 64
_SEED = 0


def load_photo(name: str) -> np.ndarray:
  """One of PHOTOS as [H, W, 3] uint8, from files inside the pip packages."""
  from skimage import data  # Slow imports: only needed to prepare.
  from sklearn import datasets
  if name in ("china", "flower"):
    return datasets.load_sample_image(f"{name}.jpg")
  if name == "motorcycle":
    return data.stereo_motorcycle()[0]  # Left view only: the right is a twin.
  return getattr(data, name)()


def split_row(height: int) -> int:
  """First row of the held-out validation region of a photo."""
  return height * 4 // 5  # Train: the top four fifths.


def crop_corners(height: int, width: int, split: str, count: int,
                 rng: np.random.Generator) -> np.ndarray:
  """[count, 2] distinct top-left (y, x) of crops inside `split`'s rows."""
  top, bottom = ((0, split_row(height)) if split == "train"
                 else (split_row(height), height))
  num_y, num_x = bottom - top - PATCH + 1, width - PATCH + 1
  # Without replacement: no crop is stored twice.
  flat = rng.choice(num_y * num_x, size=count, replace=False)
  return np.stack([top + flat // num_x, flat % num_x], axis=1)


class PhotoPatches(RandomAccessBuilder):
  """32x32 crops of 7 photos: 1,024 train and 64 validation crops per photo."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(PATCH, PATCH, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=PHOTOS),
            # Top-left corner of the crop in its photo, to audit the split.
            "y": tfds.features.Scalar(np.int32),
            "x": tfds.features.Scalar(np.int32),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The photos ship with scikit-learn and scikit-image.
    return {
        "train": self._generate_examples("train", TRAIN_PER_PHOTO),
        "validation": self._generate_examples("validation",
                                              VALIDATION_PER_PHOTO),
    }

  def _generate_examples(self, split, per_photo):
    for label, name in enumerate(PHOTOS):
      photo = load_photo(name)  # [H, W, 3]
      # Seeded per (photo, split): adding a photo keeps the others' crops.
      rng = np.random.default_rng([_SEED, label, int(split == "train")])
      corners = crop_corners(*photo.shape[:2], split, per_photo, rng)
      for i, (y, x) in enumerate(corners):
        crop = photo[y:y + PATCH, x:x + PATCH]
        yield f"{name}_{i}", {"image": encode_png(crop), "label": label,
                              "y": int(y), "x": int(x)}
