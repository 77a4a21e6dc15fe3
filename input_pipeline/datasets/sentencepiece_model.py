"""Trains the small sentencepiece models that offline datasets ship with."""
import io

import sentencepiece as spm

# Name of the tokenizer file in a prepared dataset's versioned directory.
TOKENIZER_FILE = "tokenizer.model"
# Special ids: the pipeline pads text with 0 and ends it with EOS.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


def train_sentencepiece(sentences: list[str], vocab_size: int) -> bytes:
  """A BPE model of `vocab_size` pieces, as .model file bytes.

  BPE because on a few dozen distinct template sentences unigram stalls at
  mostly single letters. Deterministic: one thread, every sentence used (no
  sampling), no normalisation beyond whitespace, so the same sentences give
  the same bytes.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model,
      model_type="bpe", vocab_size=vocab_size,
      character_coverage=1.0,  # Every character, so no caption needs <unk>.
      normalization_rule_name="identity", num_threads=1,
      pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
      minloglevel=2)
  return model.getvalue()
