"""Per-example preprocessing as named grain transforms (picklable, so they
also run in grain's prefetch worker processes)."""
import dataclasses
import io

import grain
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class DecodeExample(grain.transforms.Map):
  """Source dict -> {"image": [H, W, 3] uint8, "label": int32} and, with
  `captions`, "captions": list of str.

  Decodes encoded image bytes, copies grey to RGB and drops other features.
  Sources without labels (downsampled_imagenet) get label 0.
  """
  captions: bool = False

  def map(self, element):
    image = element["image"]
    if isinstance(image, (bytes, np.bytes_)):
      with Image.open(io.BytesIO(image)) as pil:
        image = np.asarray(pil.convert("RGB"))
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)  # [H, W, 3]
    decoded = {"image": image, "label": np.int32(element.get("label", 0))}
    if "mask" in element:  # an evaluation example standing in for an unreadable one
      decoded["mask"] = element["mask"]
    if self.captions:
      decoded["captions"] = caption_list(element)
    return decoded


def caption_list(element) -> list[str]:
  """Captions as str, from a list (digits, captions folders) or from
  coco_captions' {"text": [n], "id": [n]}; str or bytes either way."""
  if "captions" not in element:
    raise ValueError(
        "Text needs a dataset with captions (digits, coco_captions, "
        f"captions:<dir>); this one's examples have only {sorted(element)}.")
  captions = element["captions"]
  if isinstance(captions, dict):
    captions = captions["text"]
  return [c.decode("utf-8") if isinstance(c, bytes) else str(c)
          for c in captions]


@dataclasses.dataclass(frozen=True)
class ResizeSquare(grain.transforms.Map):
  """Centre square crop of the shorter side, resized to `size` x `size`.

  Equivalent to shorter-side resize + centre crop. Shrinking uses PIL's BOX
  filter (area averaging, i.e. antialiased, as in downsampled ImageNet);
  enlarging uses bicubic. Images already `size` x `size` pass untouched so
  that stored 8-bit pixels are never resampled.
  """
  size: int

  def map(self, element):
    image = element["image"]  # [H, W, 3] uint8
    height, width = image.shape[:2]
    if height == width == self.size:
      return element
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    resample = (Image.Resampling.BOX if side > self.size
                else Image.Resampling.BICUBIC)
    resized = Image.fromarray(image).resize(
        (self.size, self.size), resample,
        box=(left, top, left + side, top + side))
    return {**element, "image": np.asarray(resized)}  # [size, size, 3]


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2 (rng from grain: deterministic)."""

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < 0.5:
      element = {**element, "image": element["image"][:, ::-1]}
    return element


class ToMinusOneOne(grain.transforms.Map):
  """uint8 k -> float32 k/127.5 - 1 in [-1, 1]; no dequantisation noise (the
  model adds it on device)."""

  def map(self, element):
    image = element["image"].astype(np.float32) / np.float32(127.5) - 1.0
    return {**element, "image": image}  # [H, W, 3] float32


class AddMask(grain.transforms.Map):
  """Marks a real evaluation example: mask 1 (0 where it stands in for an unreadable one)."""

  def map(self, element):
    return {**element, "mask": np.float32(element.get("mask", 1.0))}


@dataclasses.dataclass(frozen=True)
class PaddingExample(grain.transforms.Map):
  """Any index -> an all-zero example with mask 0, to fill the last batch;
  with `max_len`, also all-zero "text"/"text_mask" [max_len] and caption ""."""
  image_size: int
  max_len: int | None = None

  def map(self, element):
    del element
    padding = {"image": np.zeros((self.image_size,) * 2 + (3,), np.float32),
               "label": np.int32(0), "mask": np.float32(0.0)}
    if self.max_len is not None:
      padding.update(text=np.zeros(self.max_len, np.int32),
                     text_mask=np.zeros(self.max_len, np.int32), caption="")
    return padding
