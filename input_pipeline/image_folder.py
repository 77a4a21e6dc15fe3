"""Random-access source over an image folder: one subfolder per class.

The ImageNet-21k layout kept on disk: `root/<class>/<image file>`. Labels are
the index of the class folder in the sorted list of class folder names.
"""
import os

import numpy as np
from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
              ".tiff")


def split_root(root: str, split: str) -> str:
  """`root/<split>` when the folder is split on disk, else `root` for train."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"Image folder {root!r} does not exist.")
  split_dir = os.path.join(root, split)
  if os.path.isdir(split_dir):
    return split_dir
  if split == "train":
    return root
  raise FileNotFoundError(
      f"Image folder {root!r} has no {split!r} subfolder; without split "
      "subfolders the whole folder is the 'train' split only.")


class ImageFolderSource:
  """grain RandomAccessDataSource: {"image": [H, W, 3] uint8, "label": int}."""

  def __init__(self, root: str):
    self.root = root
    self.classes = sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.files = []  # Sorted (relative path, label) pairs.
    for label, name in enumerate(self.classes):
      for file in sorted(os.listdir(os.path.join(root, name))):
        if file.lower().endswith(EXTENSIONS):
          self.files.append((os.path.join(name, file), label))
    if not self.files:
      raise FileNotFoundError(
          f"No images ({', '.join(EXTENSIONS)}) found in class subfolders of "
          f"{root!r}.")

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
    path, label = self.files[index]
    with Image.open(os.path.join(self.root, path)) as image:
      rgb = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
    return {"image": rgb, "label": label}

  def describe(self, index: int) -> str:
    return os.path.join(self.root, self.files[index][0])

  def __repr__(self) -> str:
    return (f"ImageFolderSource({self.root!r}, {len(self.classes)} classes, "
            f"{len(self.files)} images)")
