"""Text for JetFormer: sentencepiece tokenizers and caption transforms.

Text rows are [L] int32: the caption's tokens, then EOS (always the last
valid token, truncating the caption if needed), then padding id 0, with an
[L] int32 mask of 1 on tokens and EOS. BOS is the model's business.
"""
import dataclasses
import functools
import os

from etils import epath
import grain
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from input_pipeline import datasets
from input_pipeline import sources
from input_pipeline.datasets.sentencepiece_model import TOKENIZER_FILE

# text.tokenizer value that means "the tokenizer shipped with the dataset".
FROM_DATASET = "dataset"
PAD_ID = 0


class Tokenizer:
  """A sentencepiece model: str <-> token ids. Padding is id 0, which must be
  the model's pad piece or unused as padding (pad_id -1)."""

  def __init__(self, model_proto: bytes, path: str):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if self._sp.eos_id() < 0:
      raise ValueError(f"Sentencepiece model {path} has no EOS piece.")
    if self._sp.pad_id() not in (-1, PAD_ID):
      raise ValueError(f"Sentencepiece model {path} has pad id "
                       f"{self._sp.pad_id()}; the pipeline pads with 0.")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    """The model's BOS piece, or -1 if it has none."""
    return self._sp.bos_id()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  def encode(self, text: str) -> list[int]:
    """Token ids, without BOS or EOS."""
    return self._sp.encode(text)

  def encode_padded(self, text: str, max_len: int):
    """(ids [max_len], mask [max_len]) int32: the pieces truncated to max_len - 1, EOS,
    then padding (see top); how captions enter the model, in training and sampling."""
    tokens = self.encode(text)[:max_len - 1] + [self.eos_id]
    ids = np.full(max_len, PAD_ID, np.int32)
    ids[:len(tokens)] = tokens
    return ids, (np.arange(max_len) < len(tokens)).astype(np.int32)

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS, padding ignored."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._sp.decode([i for i in ids if i != PAD_ID])


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a sentencepiece .model file (local or any epath-readable path)."""
  file = epath.Path(path)
  if not file.is_file():
    raise FileNotFoundError(
        f"Tokenizer file {path!r} does not exist. The paper-scale configs "
        "expect a 32k-piece English sentencepiece model that you provide: "
        f"put it at {path!r} (the path in the config key text.tokenizer) or "
        "point the config at yours with "
        "--config.text.tokenizer=/path/to/spm.model. Demo datasets that "
        f"ship a tokenizer ({', '.join(datasets.WITH_TOKENIZER)}) take "
        f"--config.text.tokenizer={FROM_DATASET}.")
  return Tokenizer(file.read_bytes(), path)


# One tokenizer per file per process: transforms hold only the path, so they
# pickle small and each grain worker loads the model on first use.
_cached_tokenizer = functools.lru_cache(maxsize=4)(load_tokenizer)


def dataset_tokenizer(name: str, data_dir: str | None = None) -> str:
  """Path of the tokenizer shipped with offline dataset `name`, which gets
  prepared first if needed."""
  if name not in datasets.WITH_TOKENIZER:
    raise ValueError(
        f"Dataset {name!r} ships no tokenizer (only "
        f"{', '.join(datasets.WITH_TOKENIZER)} do): give a sentencepiece "
        "model file, e.g. --config.text.tokenizer=/path/to/spm.model.")
  sources.prepare_offline(name, data_dir)
  path = epath.Path(tfds.builder(name, data_dir=data_dir).data_dir)
  path /= TOKENIZER_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"Prepared dataset {name!r} lacks its tokenizer {path}; delete "
        f"{path.parent} to prepare it again.")
  return os.fspath(path)


def resolve_tokenizer(tokenizer: str, name: str,
                      data_dir: str | None = None) -> str:
  """The text.tokenizer config value as a path ("dataset": the dataset's)."""
  if tokenizer == FROM_DATASET:
    return dataset_tokenizer(name, data_dir)
  return tokenizer


class PickCaption(grain.transforms.RandomMap):
  """Train: "captions" (list of str) -> one "caption", uniformly at random."""

  def random_map(self, element, rng: np.random.Generator):
    element = dict(element)
    captions = element.pop("captions")
    element["caption"] = captions[rng.integers(len(captions))]
    return element


class FirstCaption(grain.transforms.Map):
  """Eval: "captions" (list of str) -> the first one as "caption"."""

  def map(self, element):
    element = dict(element)
    element["caption"] = element.pop("captions")[0]
    return element


@dataclasses.dataclass(frozen=True)
class Tokenize(grain.transforms.Map):
  """"caption" -> "text", "text_mask" ([max_len] int32 each, see top).

  Train batches drop the caption string; eval ones keep it (keep_caption)
  for printing references next to sampled captions.
  """
  tokenizer_path: str
  max_len: int
  keep_caption: bool = False

  def __post_init__(self):
    if self.max_len < 1:
      raise ValueError(f"max_len={self.max_len}: text needs room for EOS.")

  def map(self, element):
    element = dict(element)
    caption = element["caption"] if self.keep_caption else element.pop(
        "caption")
    text, mask = _cached_tokenizer(self.tokenizer_path).encode_padded(caption, self.max_len)
    return {**element, "text": text, "text_mask": mask}
