"""Tests for input_pipeline: offline datasets, grain batches, sharding, PNG."""
import io
import json
import logging
import re
import zlib

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import input_pipeline as ip
from input_pipeline import sources
from input_pipeline import transforms
from input_pipeline.datasets import photo_patches

FOLDER_SIZES = (17, 17, 16)  # Per class folder; 50 is no batch multiple.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One TFDS data_dir per module: digits/photo_patches get prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """`folder:` dataset of 8x8 images filled with a colour encoding their id."""
  root = tmp_path_factory.mktemp("images")
  index = 0
  for name, size in zip(("cat", "ant", "bee"), FOLDER_SIZES):
    (root / name).mkdir()
    for _ in range(size):
      colour = (index % 256, index // 256, 7)
      Image.new("RGB", (8, 8), colour).save(root / name / f"{index:03d}.png")
      index += 1
  (root / "notes.txt").write_text("not a class folder")
  return f"folder:{root}"


def ids(images):
  """Image ids of the `folder` fixture from normalised [B, 8, 8, 3] images."""
  k = np.round((images[:, 0, 0, :2] + 1) * 127.5).astype(int)  # [B, 2]
  return k[:, 0] + 256 * k[:, 1]


def train(name, **kwargs):
  defaults = dict(split="train", image_size=8, global_batch_size=10, seed=0,
                  process_index=0, process_count=1, flip=False)
  return ip.make_train_iterator(name=name, **{**defaults, **kwargs})


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# Offline TFDS datasets.


def test_digits_prepares_offline(data_dir):
  assert ip.num_examples("digits", "train", data_dir) == 1497
  assert ip.num_examples("digits", "validation", data_dir) == 300
  builder = tfds.builder("digits", data_dir=data_dir)
  assert str(builder.version) == "1.1.0"
  assert builder.info.features["label"].num_classes == 10
  source = tfds.data_source("digits", split="validation", data_dir=data_dir)
  images = np.stack([source[i]["image"] for i in range(len(source))])
  assert images.shape == (300, 16, 16, 3) and images.dtype == np.uint8
  # Grey copied to RGB; nearest upsampling: constant 2x2 blocks.
  assert (images == images[..., :1]).all()
  assert (images == images[:, ::2, ::2].repeat(2, 1).repeat(2, 2)).all()
  assert set(np.unique(images)) <= set(np.round(np.arange(17) * 255 / 16))
  assert images.max() == 255
  assert {int(source[i]["label"]) for i in range(len(source))} == set(range(10))


def test_photo_patches_validation_is_held_out(data_dir):
  per_photo = {"train": 1024, "validation": 64}
  heights = [photo_patches.load_photo(p).shape[0]
             for p in photo_patches.PHOTOS]
  for split, count in per_photo.items():
    source = tfds.data_source("photo_patches", split=split, data_dir=data_dir)
    assert len(source) == count * len(photo_patches.PHOTOS) == (
        ip.num_examples("photo_patches", split, data_dir))
    examples = [source[i] for i in range(len(source))]
    labels = np.array([e["label"] for e in examples])
    assert np.bincount(labels).tolist() == [count] * len(photo_patches.PHOTOS)
    for e in examples:
      assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
      cut = photo_patches.split_row(heights[e["label"]])
      if split == "train":
        assert e["y"] + 32 <= cut  # Entirely above the held-out rows.
      else:
        assert cut <= e["y"] <= heights[e["label"]] - 32
  # The stored corner is where the crop really comes from.
  photo = photo_patches.load_photo(photo_patches.PHOTOS[examples[0]["label"]])
  y, x = examples[0]["y"], examples[0]["x"]
  np.testing.assert_array_equal(examples[0]["image"],
                                photo[y:y + 32, x:x + 32])


# Train stream.


def test_train_batches_deterministic_and_exact_values(data_dir):
  kwargs = dict(split="train", image_size=32, seed=1, data_dir=data_dir,
                flip=True)
  first = take(train("photo_patches", **kwargs), 3)
  assert_same_batches(first, take(train("photo_patches", **kwargs), 3))
  other = take(train("photo_patches", **{**kwargs, "seed": 2}), 3)
  assert not np.array_equal(first[0]["image"], other[0]["image"])
  image, label = first[0]["image"], first[0]["label"]
  assert image.shape == (10, 32, 32, 3) and image.dtype == np.float32
  assert label.shape == (10,) and label.dtype == np.int32
  assert -1 <= image.min() and image.max() <= 1
  k = np.round((image + 1) * 127.5).astype(np.uint8)
  np.testing.assert_array_equal(image, k.astype(np.float32) / 127.5 - 1)


def test_flip_mirrors_about_half(data_dir):
  kwargs = dict(image_size=32, global_batch_size=64, data_dir=data_dir)
  plain = next(train("photo_patches", **kwargs))["image"]
  flipped = next(train("photo_patches", flip=True, **kwargs))["image"]
  same = [np.array_equal(a, b) for a, b in zip(plain, flipped)]
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain, flipped)]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 16 < sum(mirrored) < 48


def test_every_epoch_is_a_new_permutation(folder):
  # 50 examples, batches of 10: batches 0-4 are epoch 1, 5-9 epoch 2.
  stream = np.concatenate([ids(b["image"]) for b in take(train(folder), 10)])
  epoch1, epoch2 = stream[:50], stream[50:]
  assert sorted(epoch1) == sorted(epoch2) == list(range(50))
  assert not np.array_equal(epoch1, epoch2)
  assert not np.array_equal(epoch1, np.arange(50))


def test_resume_from_state_continues_the_stream(data_dir):
  make = lambda: train("photo_patches", image_size=32, seed=5, flip=True,
                       data_dir=data_dir)
  uninterrupted = take(make(), 5)
  first = make()
  resumed = take(first, 2)
  state = json.loads(json.dumps(first.get_state()))  # As checkpoints store it.
  second = make()
  second.set_state(state)
  resumed += take(second, 3)
  assert_same_batches(uninterrupted, resumed)


def test_resume_with_orbax_checkpoint_manager(folder, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  uninterrupted = take(train(folder, seed=3), 4)
  iterator = train(folder, seed=3)
  take(iterator, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(2, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    fresh = train(folder, seed=3)
    manager.restore(2, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert_same_batches(uninterrupted[2:], take(fresh, 2))


def test_prefetch_workers_give_the_same_stream(folder):
  uninterrupted = take(train(folder, seed=4), 4)
  first = train(folder, seed=4, worker_count=1)
  resumed = take(first, 2)
  state = first.get_state()
  first.close()
  second = train(folder, seed=4, worker_count=1)
  second.set_state(state)
  resumed += take(second, 2)
  second.close()
  assert_same_batches(uninterrupted, resumed)


def test_hosts_split_every_global_batch(folder):
  one_host = take(train(folder), 10)  # Two epochs.
  hosts = [take(train(folder, process_index=i, process_count=2), 10)
           for i in range(2)]
  for step, global_batch in enumerate(one_host):
    local = [hosts[i][step] for i in range(2)]
    assert local[0]["image"].shape == (5, 8, 8, 3)
    # Host i gets rows [5i, 5i+5): disjoint, together the batch in its order.
    for key in global_batch:
      np.testing.assert_array_equal(global_batch[key][:5], local[0][key])
      np.testing.assert_array_equal(global_batch[key][5:], local[1][key])
  epoch1 = [np.concatenate([ids(b["image"]) for b in hosts[i][:5]])
            for i in range(2)]
  assert not set(epoch1[0]) & set(epoch1[1])
  assert sorted(np.concatenate(epoch1)) == list(range(50))


def test_hosts_default_to_jax_and_batch_must_divide(folder):
  batch = next(train(folder, process_index=None, process_count=None))
  assert batch["image"].shape == (10, 8, 8, 3)  # One JAX process here.
  with pytest.raises(ValueError, match="does not divide"):
    train(folder, global_batch_size=10, process_count=3)


# Eval batches.


def test_eval_sees_every_example_once_with_padding_masked(folder):
  seen, padding = [], 0
  for host in range(2):
    batches = ip.make_eval_iterator(
        name=folder, split="train", image_size=8, global_batch_size=8,
        process_index=host, process_count=2)
    assert len(batches) == 7  # ceil(50 / 8) global batches.
    for batch in batches:
      assert batch["image"].shape == (4, 8, 8, 3)
      assert batch["mask"].dtype == np.float32
      real = batch["mask"] == 1
      assert (batch["image"][~real] == 0).all()
      seen += list(ids(batch["image"][real]))
      padding += int((~real).sum())
  assert sorted(seen) == list(range(50)) and padding == 56 - 50


# Unreadable examples.


def test_unreadable_images_are_skipped_counted_and_named(tmp_path, caplog):
  """A truncated PNG and a text file named .jpg among 12 images: no crash, no lost batch."""
  root = tmp_path / "dirty"
  (root / "cat").mkdir(parents=True)
  for i in range(12):
    Image.new("RGB", (8, 8), (i, 0, 7)).save(root / "cat" / f"{i:02d}.png")
  good = (root / "cat" / "03.png").read_bytes()
  (root / "cat" / "03.png").write_bytes(good[:50])  # header intact, pixels cut
  (root / "cat" / "07.jpg").write_text("not an image")
  name = f"folder:{root}"
  with caplog.at_level(logging.WARNING):
    batches = take(train(name, global_batch_size=7), 4)  # two epochs of 14 files
    evaluation = list(ip.make_eval_iterator(name=name, split="train", image_size=8,
                                            global_batch_size=7, process_index=0,
                                            process_count=1))
  assert all(b["image"].shape == (7, 8, 8, 3) for b in batches)
  assert np.isfinite(np.concatenate([b["image"] for b in batches])).all()
  assert re.search(r"dirty/cat/03.png: OSError: image file is truncated", caplog.text)
  assert re.search(r"dirty/cat/07.jpg: UnidentifiedImageError", caplog.text)
  assert caplog.text.count("Skipped an unreadable example") == 2 * 2  # once per source
  mask = np.concatenate([b["mask"] for b in evaluation])
  assert mask.tolist() == [1] * 3 + [0] + [1] * 3 + [0] + [1] * 5 + [0]  # 13 files + padding


class _Records:
  """A TFDS source (what tfds.data_source gives) whose records in `bad` do not decode."""

  def __init__(self, bad):
    self.bad = bad

  def __len__(self):
    return 3

  def __getitem__(self, index):
    if index in self.bad:
      raise ValueError("image data is truncated")
    return {"image": np.zeros((8, 8, 3), np.uint8), "label": index}


def test_an_undecodable_tfds_record_is_named(caplog):
  source = sources.SkipUnreadable(_Records({1}), "imagenet2012")
  with caplog.at_level(logging.WARNING):
    assert source[1]["label"] == 2 and source.skipped == 1
  assert "example 1 of imagenet2012: ValueError: image data is truncated" in caplog.text
  with pytest.raises(ValueError, match="100 examples in a row from example 1 of imagenet2012"):
    sources.SkipUnreadable(_Records({0, 1, 2}), "imagenet2012")[1]  # noqa: B018


# Image folders.


def test_folder_labels_follow_sorted_class_names(folder):
  batch = next(iter(ip.make_eval_iterator(
      name=folder, split="train", image_size=8, global_batch_size=50,
      process_index=0, process_count=1)))
  # Folders cat, ant, bee hold ids 0-16, 17-33, 34-49; sorted: ant, bee, cat.
  expected = np.repeat([2, 0, 1], FOLDER_SIZES)
  np.testing.assert_array_equal(batch["label"], expected[ids(batch["image"])])
  assert ip.num_examples(folder, "train") == 50
  with pytest.raises(FileNotFoundError, match="no 'validation' subfolder"):
    ip.num_examples(folder, "validation")


def test_folder_with_split_subfolders_resizes(tmp_path):
  for split, count in (("train", 3), ("validation", 2)):
    (tmp_path / split / "a").mkdir(parents=True)
    for i in range(count):
      Image.new("L", (30, 20), 40 * i).save(tmp_path / split / "a" / f"{i}.jpg")
  assert ip.num_examples(f"folder:{tmp_path}", "validation") == 2
  batch = next(train(f"folder:{tmp_path}", image_size=16, global_batch_size=3))
  assert batch["image"].shape == (3, 16, 16, 3)


def test_resize_is_centre_square_and_skips_right_size():
  image = np.zeros((40, 60, 3), np.uint8)
  image[:, 10:50] = 200  # The centre 40x40 square.
  out = transforms.ResizeSquare(32).map({"image": image})["image"]
  assert out.shape == (32, 32, 3) and (out == 200).all()
  same = {"image": np.zeros((32, 32, 3), np.uint8)}
  assert transforms.ResizeSquare(32).map(same) is same


# Real TFDS builders, mocked: same pipeline code, fake examples.


@pytest.mark.parametrize("name,size", [
    ("cifar10", 32),
    ("imagenet_resized/64x64", 64),
    ("downsampled_imagenet/64x64", 64),
    ("imagenet2012", 64),
    ("imagenet2012", 256),  # Class-conditional ImageNet 256.
])
def test_real_datasets_through_the_pipeline(name, size, tmp_path):
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    batch = next(ip.make_train_iterator(
        name=name, split="train", image_size=size, global_batch_size=4,
        seed=0, data_dir=str(tmp_path), process_index=0, process_count=1))
    evals = list(ip.make_eval_iterator(
        name=name, split="validation", image_size=size, global_batch_size=4,
        data_dir=str(tmp_path), process_index=0, process_count=1))
    source = sources.open_source(name, "train", str(tmp_path))
    shapes = {source[i]["image"].shape for i in range(len(source))}
  if name == "imagenet2012":
    assert (size, size, 3) not in shapes  # Fake images of random sizes.
  assert batch["image"].shape == (4, size, size, 3)
  assert batch["image"].dtype == np.float32
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  if name == "imagenet2012":
    assert ((0 <= batch["label"]) & (batch["label"] < 1000)).all()
  if name.startswith("downsampled_imagenet"):
    assert (batch["label"] == 0).all()  # It has no labels.
  assert [b["mask"].tolist() for b in evals] == [[1] * 4, [1, 1, 0, 0]]


def test_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(ip.DatasetNotFoundError) as error:
    ip.num_examples("cifar10", "validation", str(tmp_path))
  message = str(error.value)
  assert str(tmp_path / "cifar10") in message
  assert "tfds build cifar10" in message
  assert "--file_format=array_record" in message
  with pytest.raises(ip.DatasetNotFoundError, match="downloads/manual"):
    ip.num_examples("imagenet2012", "train", str(tmp_path))


def test_unknown_dataset_lists_known_ones():
  with pytest.raises(ValueError, match="Known datasets: .*cifar10.*folder:"):
    ip.num_examples("mnist", "train")


# Codec baselines.


def test_png_bits_per_dim_by_hand():
  pixel = (10, 200, 30)
  one = np.array([[pixel]], np.uint8)  # [1, 1, 3]
  # PNG: signature, IHDR chunk (13 data bytes), one IDAT chunk with the zlib
  # stream of "filter byte + row", IEND chunk; chunk overhead is 12 bytes.
  idat = len(zlib.compress(bytes((0,) + pixel), 9))
  file_bytes = 8 + (12 + 13) + (12 + idat) + 12
  assert ip.png_bits_per_dim(one[None]) == file_bytes * 8 / 3

  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8)
  images[1] = 0
  sizes = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    sizes.append(len(buffer.getvalue()))
  assert ip.png_bits_per_dim(images) == pytest.approx(
      np.mean(sizes) * 8 / (8 * 8 * 3))
  assert ip.png_bits_per_dim(images[:1]) > 8  # Noise does not compress.


def test_webp_bits_per_dim_is_lossless_and_counts_the_file():
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8)
  images[1] = 7
  sizes = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="WEBP", lossless=True, quality=100, method=6)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))), image)
    sizes.append(len(buffer.getvalue()))
  assert ip.codec_bits_per_dim(images, "webp") == pytest.approx(np.mean(sizes) * 8 / (8 * 8 * 3))


def test_raw_images_are_uint8(data_dir):
  images = ip.raw_images("digits", "validation", data_dir)
  assert images.shape == (300, 16, 16, 3) and images.dtype == np.uint8
  assert 0 < ip.png_bits_per_dim(images) < 8
