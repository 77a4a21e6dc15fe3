"""Random-access source over a folder of captioned images.

Layout: `root/<split>.jsonl`, one JSON object per line,
`{"image": "cats/1.jpg", "caption": "a cat on a mat"}`; relative image paths
resolve against `root`. Lines are parsed up front (so a malformed one fails
at once, naming its line); image files are read only when an example is.
"""
import json
import os

import numpy as np
from PIL import Image


def read_lines(jsonl: str) -> list[tuple[int, str, str]]:
  """(line number, image path as written, caption) per non-blank line."""
  if not os.path.isfile(jsonl):
    raise FileNotFoundError(
        f"No captions file {jsonl!r}: a `captions:` dataset needs "
        "<dir>/<split>.jsonl with lines "
        '{"image": "path.jpg", "caption": "text"}.')
  examples = []
  with open(jsonl, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        pair = record["image"], record["caption"]
        if not all(isinstance(x, str) for x in pair):
          raise TypeError("image and caption must be strings")
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{jsonl}:{number}: expected a JSON object with string fields "
            f'"image" and "caption", got {line.strip()[:200]!r} ({e}).'
        ) from e
      examples.append((number, *pair))
  if not examples:
    raise ValueError(f"Captions file {jsonl!r} has no examples.")
  return examples


class CaptionFolderSource:
  """grain RandomAccessDataSource: {"image": [H, W, 3] uint8,
  "captions": [one caption]} (no label)."""

  def __init__(self, root: str, split: str):
    self.root = root
    self.jsonl = os.path.join(root, f"{split}.jsonl")
    self.examples = read_lines(self.jsonl)

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index: int) -> dict[str, np.ndarray | list[str]]:
    _, image, caption = self.examples[index]
    path = os.path.join(self.root, image)  # An absolute `image` wins.
    with Image.open(path) as pil:  # decoded here, so that a bad file fails in the source
      rgb = np.asarray(pil.convert("RGB"))  # [H, W, 3] uint8
    return {"image": rgb, "captions": [caption]}

  def describe(self, index: int) -> str:
    number, image, _ = self.examples[index]
    return f"{os.path.join(self.root, image)} (line {number} of {self.jsonl})"

  def __repr__(self) -> str:
    return f"CaptionFolderSource({self.jsonl!r}, {len(self)} examples)"
