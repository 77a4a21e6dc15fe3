"""Image-text JetFormer on the offline `digits` captions ("a handwritten seven", ...).

The same small model as digits_jetformer.py, trained on both orders (caption
first: text-to-image; image first: captioning) with the loss on the second
modality; the captions use the sentencepiece model that preparing `digits`
trains and stores with the dataset.

  python main.py --config=configs/digits_jetformer_text.py --workdir=/tmp/jf_digits_text

Prints the validation image NLL (bits per subpixel, given the caption) and the
caption NLL (nats per token, given the image), then samples 16 images for each
of "the digit 0" ... "the digit 9" (grid: WORKDIR/digits_4000.png) and
captions all 300 validation digits; a classifier fit on the real training
digits scores the samples, and the captions score by naming the right digit.
"""

from configs import digits_jetformer


def get_config():
  c = digits_jetformer.get_config()
  c.text = dict(tokenizer="dataset", max_len=16)
  c.model.update(vocab_size=0, num_vocab_repeats=1)   # vocab_size: from the tokenizer
  c.objective.update(text_prefix_prob=0.5, text_loss_weight=0.5, noise_sigma_final=0.0)
  c.sample.prompts = tuple(f"the digit {i}" for i in range(10))
  c.caption.update(num_examples=300)
  return c
