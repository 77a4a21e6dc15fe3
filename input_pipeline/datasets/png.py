"""Lossless PNG encoding with Pillow (TFDS would encode numpy images via TF)."""
import io

import numpy as np
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
  """[H, W, 3] uint8 -> PNG file bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()
