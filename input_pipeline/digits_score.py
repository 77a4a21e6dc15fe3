"""Demo metrics for the offline `digits` data that need no external weights.

A support-vector classifier fit on the real training digits judges generated
digits (is a sample of "7" classified as 7?), and `named_digit` reads the digit
a caption names ("a handwritten seven", "the digit 7"), for captioning accuracy.
"""
import re

import grain
import numpy as np
from sklearn import svm

from input_pipeline import transforms
from input_pipeline.datasets.digits import WORDS
from input_pipeline.sources import open_source


def labelled_images(split: str, data_dir: str | None = None):
  """(images [N, 16, 16, 3] uint8, labels [N] int32) of a `digits` split."""
  ds = grain.MapDataset.source(open_source("digits", split, data_dir))
  examples = list(ds.map(transforms.DecodeExample()))
  return (np.stack([e["image"] for e in examples]),
          np.asarray([e["label"] for e in examples], np.int32))


def features(images):
  """[N, H, W, 3] uint8 -> [N, H*W] grey levels in [0, 1]."""
  images = np.asarray(images, np.float32)
  return images.mean(-1).reshape(len(images), -1) / 255.0


class DigitClassifier:
  """An RBF support-vector machine on grey pixels (99% on the validation digits)."""

  def __init__(self, data_dir: str | None = None):
    images, labels = labelled_images("train", data_dir)
    self._svm = svm.SVC(C=10.0, gamma="scale").fit(features(images), labels)

  def predict(self, images) -> np.ndarray:
    """Digit ids [N] of images [N, 16, 16, 3] uint8."""
    return self._svm.predict(features(images)).astype(np.int32)


_NAMES = {w: i for i, w in enumerate(WORDS)} | {str(i): i for i in range(10)}


def named_digit(caption: str) -> int:
  """The one digit a caption names (by word or numeral), else -1 (none, or several)."""
  found = {_NAMES[w] for w in re.findall(r"[a-z]+|\d", caption.lower()) if w in _NAMES}
  return found.pop() if len(found) == 1 else -1
