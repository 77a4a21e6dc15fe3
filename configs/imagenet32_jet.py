"""Jet on ImageNet 32x32 (unconditional).

Same flow and optimisation as `imagenet64_jet` (32 couplings, a 2-block, 512-wide,
8-head ViT in each, four channel couplings then one spatial coupling cycling over
all six patterns; Adam b2 0.95 with a bfloat16 first moment, lr 3e-4, 10% warm-up
then cosine, weight decay 1e-5, clipping at 1.0, batch 1024, 200 epochs), except
the patch size: 2 instead of 4, so that the 32x32 image is again 256 tokens
(of 12 values each) and every coupling's ViT sees the sequence length of the
64x64 study.

  python main.py --config=configs/imagenet32_jet.py --workdir=/tmp/jet_imagenet32

Expected result: no reference number is checked into this repository. The
patch size is our choice (the Jet paper's exact 32x32 setting could not be
verified here); the other settings are the paper's ImageNet recipe. For scale,
Glow (Kingma & Dhariwal, 2018) reports 4.09 bits/dim on ImageNet 32x32; compare
against the Jet paper's ImageNet 32x32 row (arXiv 2412.15129) before relying on
a number.

Data: `imagenet_resized/32x32` by default; flow papers compare on
`downsampled_imagenet/32x32` (the van den Oord et al. downsampling; no labels),
selected with `--config.dataset.name=downsampled_imagenet/32x32`. No flip
augmentation, as in the reference ImageNet input pipeline.

Smoke test (a tiny model, a few steps, 256 validation images; well under a minute
on a laptop CPU once the dataset is prepared):

  python main.py --config=configs/imagenet32_jet.py --workdir=/tmp/jet_smoke \
      --config.runlocal=True
"""

from configs import common


def get_config():
  c = common.jet_base(dataset="imagenet_resized/32x32", image_size=32)
  c.dataset.flip = False
  c.model.update(ps=2, depth=32, block_depth=2, emb_dim=512, num_heads=8,
                 kinds=("channels",) * 4 + ("spatial",), channel_projs=("random",),
                 spatial_projs=common.ALL_SPATIAL)
  # Batch 1024, 200 epochs and the optimizer are common.jet_base's (the paper's).
  c.local.update(dataset=dict(eval_split="validation[:256]"))
  return c
