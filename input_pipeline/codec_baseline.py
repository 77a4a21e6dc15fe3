"""Lossless codecs (PNG, WebP) as baselines for bits per dimension."""
import io

import grain
import numpy as np
from PIL import Image

from input_pipeline import transforms
from input_pipeline.sources import SkipUnreadable, open_source


# Pillow's save options for each codec's smallest lossless file.
CODECS = {"png": dict(format="PNG", optimize=True),
          "webp": dict(format="WEBP", lossless=True, quality=100, method=6)}


def codec_bits_per_dim(images_uint8: np.ndarray, codec: str) -> float:
  """Mean over images of the codec's file bits / (H*W*3); images [N, H, W, 3] uint8.

  Each image is its own file, so the headers count, as they would for any
  per-image codec.
  """
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
    raise ValueError("Expected [N, H, W, 3] uint8 images, got "
                     f"{images_uint8.shape} {images_uint8.dtype}.")
  bits = []
  for image in images_uint8:  # [H, W, 3]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, **CODECS[codec])
    bits.append(8 * len(buffer.getvalue()) / image.size)
  return float(np.mean(bits))


def png_bits_per_dim(images_uint8: np.ndarray) -> float:
  return codec_bits_per_dim(images_uint8, "png")


def raw_images(name: str, split: str, data_dir: str | None = None, *,
               image_size: int | None = None) -> np.ndarray:
  """All images of a split as [N, H, W, 3] uint8, not normalised.

  `image_size` resizes as the pipeline does; needed when sizes vary
  (imagenet2012, image folders).
  """
  source = SkipUnreadable(open_source(name, split, data_dir), name, mask_replaced=True)
  ds = grain.MapDataset.source(source).map(transforms.DecodeExample())
  if image_size is not None:
    ds = ds.map(transforms.ResizeSquare(image_size))
  return np.stack([e["image"] for e in ds if e.get("mask", 1)])  # the unreadable left out
