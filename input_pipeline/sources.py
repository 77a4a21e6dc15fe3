"""Dataset names -> random-access sources: TFDS array_record, folders."""
import contextlib
import io
import logging

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import datasets
from input_pipeline.caption_folder import CaptionFolderSource
from input_pipeline.image_folder import ImageFolderSource, split_root

FOLDER_PREFIX = "folder:"
CAPTIONS_PREFIX = "captions:"

# User-facing split name -> TFDS split name, per dataset. TFDS slicing and
# sums such as "validation[:10%]" or "train+restval" keep working: only the
# name before any "[" of each "+" part is mapped.
SPLITS = {
    "digits": {"train": "train", "validation": "validation"},
    "photo_patches": {"train": "train", "validation": "validation"},
    # CIFAR-10 has no validation split: its test set is the usual stand-in.
    "cifar10": {"train": "train", "validation": "test", "test": "test"},
    "imagenet_resized/32x32": {"train": "train", "validation": "validation"},
    "imagenet_resized/64x64": {"train": "train", "validation": "validation"},
    "downsampled_imagenet/32x32": {"train": "train",
                                   "validation": "validation"},
    "downsampled_imagenet/64x64": {"train": "train",
                                   "validation": "validation"},
    # The ImageNet test split has no labels, so it is not offered.
    "imagenet2012": {"train": "train", "validation": "validation"},
    # Karpathy & Li splits; the usual "Karpathy train" is "train+restval".
    "coco_captions": {"train": "train", "restval": "restval",
                      "validation": "val", "test": "test"},
}
KNOWN = tuple(SPLITS) + (FOLDER_PREFIX + "/abs/path",
                         CAPTIONS_PREFIX + "/abs/path")


class DatasetNotFoundError(FileNotFoundError):
  """A known dataset that is not prepared in the data_dir."""


def check_name(name: str) -> None:
  if not (name.startswith((FOLDER_PREFIX, CAPTIONS_PREFIX)) or name in SPLITS):
    raise ValueError(
        f"Unknown dataset {name!r}. Known datasets: {', '.join(KNOWN)}.")


def tfds_split(name: str, split: str) -> str:
  """Maps a user-facing split ("validation[:50%]") to the TFDS one."""
  parts = []
  for part in split.split("+"):
    base, bracket, rest = part.partition("[")
    if base not in SPLITS[name]:
      raise ValueError(f"Dataset {name!r} has no split {base!r}; splits: "
                       f"{', '.join(SPLITS[name])}.")
    parts.append(SPLITS[name][base] + bracket + rest)
  return "+".join(parts)


def open_source(name: str, split: str, data_dir: str | None = None):
  """Random-access source of dicts with "image" (array or bytes) and some of
  "label" and "captions"."""
  check_name(name)
  if name.startswith(FOLDER_PREFIX):
    return ImageFolderSource(split_root(name[len(FOLDER_PREFIX):], split))
  if name.startswith(CAPTIONS_PREFIX):
    return CaptionFolderSource(name[len(CAPTIONS_PREFIX):], split)
  if name in datasets.OFFLINE:
    prepare_offline(name, data_dir)
  split = tfds_split(name, split)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except (NotImplementedError, ValueError, KeyError, FileNotFoundError) as e:
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
      raise  # Prepared but unreadable, e.g. a missing split: TFDS says why.
    missing = how_to_prepare(name, builder.data_dir,
                             str(builder.data_dir_root))
    raise DatasetNotFoundError(missing) from e


class SkipUnreadable:
  """A source whose unreadable examples are skipped: logged with where they are, counted,
  and replaced by the next readable example.

  A corrupt or missing image file, or a record that does not decode, would
  otherwise stop a run mid-epoch. Replacing (rather than dropping) keeps every
  batch full and every example at its place in the stream, so hosts and
  checkpoints stay in step. With `mask_replaced` (evaluation) the replacement
  carries mask 0 and counts for nothing.
  """

  MAX_IN_A_ROW = 100

  def __init__(self, source, name: str, mask_replaced: bool = False):
    self._source, self._name, self._mask = source, name, mask_replaced
    self._bad = set()  # indices found unreadable in this process, each logged once

  @property
  def skipped(self) -> int:
    return len(self._bad)

  def __len__(self) -> int:
    return len(self._source)

  def where(self, index: int) -> str:
    describe = getattr(self._source, "describe", None)
    return describe(index) if describe else f"example {index} of {self._name}"

  def __getitem__(self, index: int):
    for k in range(self.MAX_IN_A_ROW):
      i = (index + k) % len(self._source)
      try:
        example = self._source[i]
      except Exception as e:  # noqa: BLE001 (whatever one bad record raises)
        last = e
        if i not in self._bad:
          self._bad.add(i)
          logging.warning("Skipped an unreadable example (%d so far): %s: %s: %s",
                          self.skipped, self.where(i), type(e).__name__, e)
        continue
      if k and self._mask:
        example = {**example, "mask": np.float32(0.0)}
      return example
    raise ValueError(f"{self.MAX_IN_A_ROW} examples in a row from {self.where(index)} are "
                     f"unreadable, the last with {type(last).__name__}: {last}; check the "
                     "dataset's files and that this machine can read them.") from last


def prepare_offline(name: str, data_dir: str | None) -> None:
  """Writes a pip-shipped dataset as array_record unless already there."""
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return
  logging.info("Preparing %s in %s (first use; nothing is downloaded).", name, builder.data_dir)
  # TFDS prints "Downloading ... Unknown size" and progress bars for a job of seconds.
  tfds.disable_progress_bar()
  printed = io.StringIO()
  try:
    with contextlib.redirect_stdout(printed):
      # No GCS probing: the data is local and the machine may be offline.
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception:
    logging.error("Preparing %s failed; TFDS printed:\n%s", name, printed.getvalue())
    raise


def how_to_prepare(name: str, looked_in: str, root: str) -> str:
  """Error text: what is missing, where we looked, how to build it."""
  build = (f"tfds build {name} --data_dir={root} "
           "--file_format=array_record")
  text = (f"Dataset {name!r} is not prepared: no array_record dataset at "
          f"{looked_in}. Prepare it with:\n  {build}")
  if name == "imagenet2012":
    text += (f"\nimagenet2012 needs a manual download first: put "
             f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
             f"https://image-net.org/download-images, registration needed) "
             f"into {root}/downloads/manual/.")
  elif name.startswith(("imagenet_resized", "downsampled_imagenet")):
    text += ("\nIts files are downloaded from image-net.org, which may "
             "require an ImageNet account.")
  return text
