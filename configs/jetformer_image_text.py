"""Image-text JetFormer (docs/method.md, section 2): text-to-image and captioning in one model.

Each example is laid out text first ([BOS, caption, BOI, image]: generation) or
image first ([BOI, image, BOS, caption]: understanding) with probability 1/2;
the loss is on the second modality only, the text NLL weighted by 0.0025 so
that it is on the scale of the image bits. RGB noise curriculum from sigma 64
to 3. Model as in jetformer_imagenet256.py (350M or 1.3B), Adam lr 1e-3,
weight decay 1e-4, batch 4096. The captions are tokenized with a 32k English
sentencepiece model that you provide (nothing is downloaded):

  python main.py --config=configs/jetformer_image_text.py --workdir=/tmp/jf_text \
      --config.text.tokenizer=/path/to/spm_32k.model

Data: `coco_captions` (TFDS) by default; your own pairs with
`--config.dataset.name=captions:/path/to/dir` (DIR/train.jsonl and
DIR/validation.jsonl of {"image": path, "caption": text} lines).

Samples for your prompts (one per line; paper: CFG weight 9, scale temperature
0.96) and captions of validation images:

  python evaluate.py --config=configs/jetformer_image_text.py --workdir=/tmp/jf_text \
      --config.text.tokenizer=/path/to/spm_32k.model --tasks=sample,caption \
      --config.sample.prompts_file=prompts.txt

The ablations of jetformer_imagenet256.py apply here too.

Smoke test (a tiny model on the offline digits captions and their tokenizer):

  python main.py --config=configs/jetformer_image_text.py --workdir=/tmp/jft_smoke \
      --config.runlocal=True
"""

from configs import common


def get_config(variant="350M"):
  c = common.jetformer_base(dataset="coco_captions", image_size=256, variant=variant)
  c.text = dict(tokenizer="/path/to/spm_32k.model", max_len=64)
  c.model.update(vocab_size=0, num_vocab_repeats=1)   # vocab_size: from the tokenizer
  c.objective.update(text_prefix_prob=0.5, text_loss_weight=0.0025, noise_sigma_final=3.0)
  c.batch_size = 4096
  c.num_epochs = 50.0                  # the paper trains on WebLI; COCO is far smaller
  c.sample.update(cfg_weight=9.0, t_scale=0.96, prompts=(
      "a dog on a skateboard", "a red double-decker bus", "a bowl of fruit on a table",
      "a snowy mountain at sunset"))
  c.local.update(dataset=dict(name="digits", image_size=16, flip=False),
                 text=dict(tokenizer="dataset", max_len=16),
                 sample=dict(prompts=("the digit 3", "a handwritten seven"), per_prompt=2,
                             batch_size=8))
  return c
