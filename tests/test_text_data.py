"""Tests for text in the input pipeline: captions, tokenizers, text batches."""
import json
import logging
import pickle
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import input_pipeline as ip
from input_pipeline import sources
from input_pipeline import text
from input_pipeline.datasets import digits
from input_pipeline.datasets import sentencepiece_model

MAX_LEN = 16  # Longest digits caption: 12 tokens + EOS.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def spm_path(data_dir):
  return ip.dataset_tokenizer("digits", data_dir)


@pytest.fixture(scope="module")
def tokenizer(spm_path):
  return ip.load_tokenizer(spm_path)


def train(name, **kwargs):
  defaults = dict(split="train", image_size=16, global_batch_size=8, seed=0,
                  process_index=0, process_count=1,
                  text=dict(tokenizer="dataset", max_len=MAX_LEN))
  return ip.make_train_iterator(name=name, **{**defaults, **kwargs})


def evaluate(name, **kwargs):
  defaults = dict(split="validation", image_size=16, global_batch_size=8,
                  process_index=0, process_count=1)
  return list(ip.make_eval_iterator(name=name, **{**defaults, **kwargs}))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def digit_names(caption):
  """The digits a caption names, by word or numeral."""
  words = caption.split()
  return {d for d in range(10) if digits.WORDS[d] in words or str(d) in words}


# digits captions and tokenizer.


@pytest.mark.parametrize("split", ["train", "validation"])
def test_digits_captions_name_the_right_digit(data_dir, split):
  source = tfds.data_source("digits", split=split, data_dir=data_dir)
  used = set()
  for i in range(len(source)):
    captions = [c.decode() for c in source[i]["captions"]]
    assert len(set(captions)) == digits.CAPTIONS_PER_EXAMPLE
    for caption in captions:
      assert digit_names(caption) == {source[i]["label"]}, caption
      used.add(caption)
  # Every template, word and numeral forms, for every digit.
  assert used == {c for d in range(10) for c in digits.label_captions(d)}
  assert digits.label_captions(8)[3] == "an eight"


def test_tokenizer_ships_with_digits_and_round_trips(data_dir, spm_path,
                                                     tokenizer):
  builder = tfds.builder("digits", data_dir=data_dir)
  assert str(builder.version) == "1.1.0"
  assert spm_path == f"{builder.data_dir}/tokenizer.model"
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id,
          tokenizer.bos_id) == (96, 0, 1, 2)
  lengths = []
  for d in range(10):
    for caption in digits.label_captions(d):
      ids = tokenizer.encode(caption)
      assert tokenizer.decode(ids) == caption
      assert min(ids) > sentencepiece_model.UNK_ID  # No specials, no <unk>.
      lengths.append(len(ids))
  assert max(lengths) == 12
  # Deterministic: training again on the same captions gives the same file.
  labels = digits.digit_images()[1]
  captions = [c for i in digits.split_indices()["train"]
              for c in digits.example_captions(int(i), int(labels[i]))]
  with open(spm_path, "rb") as f:
    assert f.read() == sentencepiece_model.train_sentencepiece(
        captions, digits.TOKENIZER_VOCAB_SIZE)


def test_decode_stops_at_eos_and_ignores_padding(tokenizer):
  ids = tokenizer.encode("the digit 7")
  eos = tokenizer.eos_id
  assert tokenizer.decode([0] + ids[:1] + [0] + ids[1:] + [eos, *ids, 0]) == (
      "the digit 7")
  assert tokenizer.decode(np.array(ids + [0, 0], np.int32)) == "the digit 7"


def test_tokenize_pads_and_truncates(spm_path, tokenizer):
  ids = tokenizer.encode("a handwritten seven")
  eos = tokenizer.eos_id
  short = text.Tokenize(spm_path, len(ids) + 3).map(
      {"caption": "a handwritten seven", "label": 7})
  assert short.keys() == {"text", "text_mask", "label"}  # Caption dropped.
  assert short["text"].dtype == short["text_mask"].dtype == np.int32
  assert short["text"].tolist() == ids + [eos, 0, 0]
  assert short["text_mask"].tolist() == [1] * (len(ids) + 1) + [0, 0]
  for max_len in (1, 2, len(ids)):  # Truncated: EOS stays the last token.
    cut = text.Tokenize(spm_path, max_len, keep_caption=True).map(
        {"caption": "a handwritten seven"})
    assert cut["text"].tolist() == ids[:max_len - 1] + [eos]
    assert cut["text_mask"].sum() == max_len
    assert cut["caption"] == "a handwritten seven"
  with pytest.raises(ValueError, match="room for EOS"):
    text.Tokenize(spm_path, 0)


def test_transforms_pickle_without_the_model(spm_path):
  tokenize = text.Tokenize(spm_path, 8)
  tokenize.map({"caption": "a six"})  # Loads the model in this process.
  copy = pickle.loads(pickle.dumps(tokenize))
  assert len(pickle.dumps(tokenize)) < 500
  np.testing.assert_array_equal(copy.map({"caption": "a six"})["text"],
                                tokenize.map({"caption": "a six"})["text"])
  pickle.dumps(text.PickCaption())


def test_missing_tokenizer_says_how_to_configure(tmp_path, data_dir):
  missing = str(tmp_path / "spm.model")
  with pytest.raises(FileNotFoundError) as error:
    ip.load_tokenizer(missing)
  message = str(error.value)
  assert missing in message and "32k" in message
  assert "text.tokenizer" in message
  assert "--config.text.tokenizer=/path/to/spm.model" in message
  # The pipeline fails at construction, in this process, with that message.
  with pytest.raises(FileNotFoundError, match="--config.text.tokenizer"):
    train("digits", data_dir=data_dir,
          text=dict(tokenizer=missing, max_len=MAX_LEN))
  with pytest.raises(ValueError, match="ships no tokenizer"):
    ip.dataset_tokenizer("cifar10")


# Text batches.


def test_train_text_is_deterministic_and_resumes(data_dir, tokenizer):
  make = lambda: train("digits", data_dir=data_dir, seed=3, flip=True)
  uninterrupted = take(make(), 6)
  first = make()
  resumed = take(first, 2)
  state = json.loads(json.dumps(first.get_state()))
  second = make()
  second.set_state(state)
  resumed += take(second, 4)
  picked = set()
  for a, b in zip(uninterrupted, resumed):
    assert a.keys() == {"image", "label", "text", "text_mask"}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert a["text"].shape == a["text_mask"].shape == (8, MAX_LEN)
    assert a["text"].dtype == a["text_mask"].dtype == np.int32
    np.testing.assert_array_equal(a["text_mask"], a["text"] != 0)
    for row, label in zip(a["text"], a["label"]):
      picked.add(tokenizer.decode(row))
      assert tokenizer.decode(row) in digits.label_captions(label)
  assert len(picked) > 20  # Random captions, not always the first one.
  # Text leaves the image stream untouched.
  plain = take(train("digits", data_dir=data_dir, seed=3, flip=True,
                     text=None), 6)
  for a, b in zip(uninterrupted, plain):
    assert b.keys() == {"image", "label"}
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_eval_text_keeps_first_caption_and_pads(data_dir, spm_path,
                                                tokenizer):
  batches = evaluate("digits", data_dir=data_dir, global_batch_size=64,
                     text=dict(tokenizer=spm_path, max_len=MAX_LEN))
  assert len(batches) == 5  # ceil(300 / 64)
  source = tfds.data_source("digits", split="validation", data_dir=data_dir)
  captions = np.concatenate([b["caption"] for b in batches])
  assert captions[:300].tolist() == [
      source[i]["captions"][0].decode() for i in range(300)]
  assert (captions[300:] == "").all()
  last = batches[-1]
  assert last["text"].shape == last["text_mask"].shape == (64, MAX_LEN)
  real = last["mask"] == 1
  assert real.sum() == 300 - 256
  assert (last["text"][~real] == 0).all()
  assert (last["text_mask"][~real] == 0).all()
  for row, caption in zip(last["text"][real], last["caption"][real]):
    assert tokenizer.decode(row) == caption


def test_text_needs_captions(data_dir, tmp_path):
  (tmp_path / "a").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "a" / "0.png")
  iterator = train(f"folder:{tmp_path}", global_batch_size=1,
                   data_dir=data_dir,
                   text=dict(tokenizer=ip.dataset_tokenizer("digits", data_dir),
                             max_len=4))
  with pytest.raises(ValueError, match="needs a dataset with captions"):
    next(iterator)


def test_coco_captions_mock_through_the_pipeline(spm_path, tmp_path):
  config = dict(tokenizer=spm_path, max_len=MAX_LEN)
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    batch = next(train("coco_captions", split="train+restval", image_size=32,
                       global_batch_size=4, data_dir=str(tmp_path),
                       text=config))
    evals = evaluate("coco_captions", image_size=32, global_batch_size=4,
                     data_dir=str(tmp_path), text=config)
  assert batch["image"].shape == (4, 32, 32, 3)
  assert batch["text"].shape == batch["text_mask"].shape == (4, MAX_LEN)
  assert batch["text"].dtype == np.int32
  assert [b["mask"].tolist() for b in evals] == [[1] * 4, [1, 1, 0, 0]]
  assert evals[1]["caption"].tolist()[2:] == ["", ""]
  assert all(len(c) >= 10 for c in evals[0]["caption"])  # Mock strings.
  assert (evals[1]["text_mask"].sum(1)[:2] > 0).all()
  assert sources.tfds_split("coco_captions", "validation[:10%]") == (
      "val[:10%]")
  assert sources.tfds_split("coco_captions", "train+restval") == (
      "train+restval")


# Caption folders.


@pytest.fixture
def caption_folder(tmp_path):
  """`captions:` dir: train has a PNG, a grey JPEG and an absolute path."""
  root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
  (root / "img").mkdir(parents=True)
  elsewhere.mkdir()
  Image.new("RGB", (24, 16), (255, 0, 0)).save(root / "img" / "red.png")
  Image.new("L", (16, 16), 128).save(root / "img" / "grey.jpg")
  Image.new("RGB", (16, 16), (0, 0, 255)).save(elsewhere / "blue.png")
  lines = [{"image": "img/red.png", "caption": "a red box"},
           {"image": "img/grey.jpg", "caption": "a grey box"},
           {"image": str(elsewhere / "blue.png"), "caption": "a blue one"}]
  (root / "train.jsonl").write_text(
      "\n".join(json.dumps(line) for line in lines) + "\n\n")
  (root / "validation.jsonl").write_text(json.dumps(lines[0]) + "\n")
  return root


def test_caption_folder_batches(caption_folder, spm_path, tokenizer):
  name = f"captions:{caption_folder}"
  config = dict(tokenizer=spm_path, max_len=MAX_LEN)
  assert ip.num_examples(name, "train") == 3
  batches = evaluate(name, split="train", global_batch_size=2, text=config)
  assert [b["mask"].tolist() for b in batches] == [[1, 1], [1, 0]]
  first = batches[0]
  assert first["image"].shape == (2, 16, 16, 3)
  assert first["text"].shape == first["text_mask"].shape == (2, MAX_LEN)
  assert first["caption"].tolist() == ["a red box", "a grey box"]
  assert np.allclose(first["image"][0], [1, -1, -1], atol=0.02)  # Red.
  assert np.allclose(first["image"][1], 128 / 127.5 - 1, atol=0.02)
  assert batches[1]["caption"].tolist() == ["a blue one", ""]
  assert tokenizer.decode(first["text"][0]) == "a red box"
  batch = next(train(name, global_batch_size=3, text=config))
  assert batch["image"].shape == (3, 16, 16, 3)
  assert batch["text"].shape == (3, MAX_LEN)


def test_caption_folder_errors_name_the_problem(caption_folder, caplog):
  name = f"captions:{caption_folder}"
  with pytest.raises(FileNotFoundError, match="test.jsonl"):
    ip.num_examples(name, "test")
  with (caption_folder / "train.jsonl").open("a") as f:
    f.write('{"image": "img/red.png"}\n')
  with pytest.raises(ValueError, match=r"train.jsonl:5: .*\"caption\""):
    ip.num_examples(name, "train")
  (caption_folder / "train.jsonl").write_text(
      '{"image": "img/red.png", "caption": "ok"}\n'
      '{"image": "img/gone.png", "caption": "missing"}\n')
  source = sources.SkipUnreadable(sources.open_source(name, "train"), name)
  assert source[0]["captions"] == ["ok"]
  with caplog.at_level(logging.WARNING):
    assert source[1]["captions"] == ["ok"]  # skipped: the next readable example instead
  assert source.skipped == 1
  assert re.search(r"gone.png \(line 2 of .*train.jsonl\): FileNotFoundError", caplog.text)
