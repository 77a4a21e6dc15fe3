"""grain pipelines: an endless shuffled train stream and one-pass eval batches.

Both give each host its own slice of every global batch: host i gets rows
[i*b, (i+1)*b) of each global batch of the (shuffled) stream, b the per-host
batch. So the global jax.Array assembled from the hosts' local batches is the
same batch, in the same order, for any number of hosts.

With `text={"tokenizer": path or "dataset", "max_len": L}` batches also hold
"text" and "text_mask", [B, L] int32 (see input_pipeline.text).
"""
from absl import flags
import grain
import numpy as np

from input_pipeline import text as text_lib
from input_pipeline import transforms
from input_pipeline.sources import SkipUnreadable, open_source


def host_and_batch(global_batch_size: int, process_index: int | None,
                   process_count: int | None) -> tuple[int, int, int]:
  """(process_index, process_count, per-host batch size), defaults from JAX."""
  if process_index is None or process_count is None:
    import jax  # Deferred: callers passing explicit hosts need no JAX.
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} does not divide "
                     f"by process_count={process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside "
                     f"[0, {process_count}).")
  return process_index, process_count, global_batch_size // process_count


def tokenize(text: dict, name: str, data_dir: str | None,
             keep_caption: bool) -> text_lib.Tokenize:
  """The Tokenize transform for a `text` argument; checks the tokenizer loads
  here, so a missing file fails now with its message, not in a worker."""
  path = text_lib.resolve_tokenizer(text["tokenizer"], name, data_dir)
  text_lib.load_tokenizer(path)
  return text_lib.Tokenize(path, int(text["max_len"]), keep_caption)


def make_train_iterator(*, name: str, split: str, image_size: int,
                        global_batch_size: int, seed: int,
                        data_dir: str | None = None, flip: bool = True,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        worker_count: int = 0,
                        text: dict | None = None) -> grain.DatasetIterator:
  """Endless train batches for this host; checkpoint with get/set_state().

  Batches: {"image": [B, H, W, 3] float32 in [-1, 1], "label": [B] int32}
  with B = global_batch_size / process_count; with `text`, also "text" and
  "text_mask" [B, L] int32 of one caption per example, picked at random.
  """
  index, count, batch = host_and_batch(global_batch_size, process_index,
                                       process_count)
  # Independent seeds; mixing also keeps seed s+1 from replaying the order
  # of seed s's next epoch (grain's shuffle uses seed + epoch). The first two
  # are those of generate_state(2): adding text left the image stream as is.
  shuffle_seed, flip_seed, caption_seed = np.random.SeedSequence(
      seed).generate_state(3)
  ds = grain.MapDataset.source(SkipUnreadable(open_source(name, split, data_dir), name))
  ds = ds.shuffle(seed=int(shuffle_seed)).repeat()  # New order every epoch.
  ds = ds.map(transforms.DecodeExample(captions=text is not None))
  ds = ds.map(transforms.ResizeSquare(image_size))
  # Random maps come before the host slice, so they depend on the global
  # stream position only: the global batches are the same for any number of
  # hosts.
  if flip:
    ds = ds.random_map(transforms.RandomFlip(), seed=int(flip_seed))
  ds = ds.map(transforms.ToMinusOneOne())
  if text is not None:
    ds = ds.random_map(text_lib.PickCaption(), seed=int(caption_seed))
    ds = ds.map(tokenize(text, name, data_dir, keep_caption=False))
  # Per-host batches of consecutive examples; host i takes every count-th one.
  ds = ds.batch(batch, drop_remainder=True)[index::count]
  iter_ds = ds.to_iter_dataset()
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker start-up reads its absl flags; outside absl.app.run
      # (notebooks, pytest) nobody parsed them, so take their defaults.
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_ds)


def make_eval_iterator(*, name: str, split: str, image_size: int,
                       global_batch_size: int, data_dir: str | None = None,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       text: dict | None = None) -> grain.MapDataset:
  """One pass over `split` in order; iterate it again for another pass.

  Batches: {"image": [B, H, W, 3] float32, "label": [B] int32,
  "mask": [B] float32}; with `text`, also "text" and "text_mask" [B, L]
  int32 and "caption" [B] str, all of each example's first caption. The last
  global batch is padded with mask-0 examples (zero text and text_mask, empty
  caption) so all batches have one shape; every example is seen once across
  hosts. `len()` is the number of batches.
  """
  index, count, batch = host_and_batch(global_batch_size, process_index,
                                       process_count)
  source = SkipUnreadable(open_source(name, split, data_dir), name, mask_replaced=True)
  ds = grain.MapDataset.source(source)
  ds = ds.map(transforms.DecodeExample(captions=text is not None))
  ds = ds.map(transforms.ResizeSquare(image_size))
  ds = ds.map(transforms.ToMinusOneOne())
  if text is not None:
    ds = ds.map(text_lib.FirstCaption())
    ds = ds.map(tokenize(text, name, data_dir, keep_caption=True))
  ds = ds.map(transforms.AddMask())
  num_padding = -len(source) % global_batch_size
  if num_padding:
    max_len = None if text is None else int(text["max_len"])
    padding = grain.MapDataset.range(num_padding).map(
        transforms.PaddingExample(image_size, max_len))
    ds = grain.MapDataset.concatenate([ds, padding])
  return ds.batch(batch, drop_remainder=True)[index::count]


def num_examples(name: str, split: str, data_dir: str | None = None) -> int:
  """Number of examples in a split (before any padding or sharding)."""
  return len(open_source(name, split, data_dir))
