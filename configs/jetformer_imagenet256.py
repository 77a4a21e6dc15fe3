"""Class-conditional JetFormer on ImageNet 256x256 (docs/method.md, section 2), 350M or 1.3B.

Images are cut into 16x16 patches (256 tokens of 768 values); a 32-coupling Jet
adaptor (channel couplings, 512 wide, 8 heads, block depth 4 / 6) runs on that
token grid and is trained jointly with a Gemma decoder (multi-query attention,
dropout 0.1) that models the first 128 latent dims of every token with a
mixture of 1024 Gaussians; the other 640 dims are factored out to N(0, 1). The
class is a 16-token prefix (16 embedding tables), replaced by NOLABEL for 10% of
examples (classifier-free guidance). RGB noise curriculum from sigma 64 to 0.
Adam b2 0.95, lr 1e-3, decoupled weight decay 1e-4, batch 2048, 500 epochs;
parameters sharded FSDP-style over all devices.

  python main.py --config=configs/jetformer_imagenet256.py --workdir=/tmp/jf_in256
  python main.py --config=configs/jetformer_imagenet256.py:1.3B --workdir=/tmp/jf_in256_1b

Paper: FID 6.64 for the largest (2.75B) model; the training loss reported here
is the image NLL in bits per subpixel (`image_bpd`).

Samples and metrics of a checkpoint (paper sampling: CFG weight 3 and scale
temperature 0.94 for 350M, 2 and 0.93 for 1.3B, set below):

  python evaluate.py --config=configs/jetformer_imagenet256.py --workdir=/tmp/jf_in256 \
      --tasks=bpd,sample,reconstruct,fid --config.fid.inception_path=inception_fid.npz

Ablations of the paper, each one override on the command above:
  no noise curriculum:       --config.objective.noise_sigma0=0
  no factoring out:          --config.model.latent_dim=0          (model all 768 dims)
  frozen flow:               --config.objective.frozen_flow=True --config.init_from=JET_DIR
                             (JET_DIR: a Jet trained with the adaptor's shapes, e.g.
                             python main.py --config=configs/imagenet64_jet.py
                             --workdir=JET_DIR --config.dataset.name=imagenet2012
                             --config.dataset.image_size=256 --config.model.ps=16
                             --config.model.block_depth=4 --config.model.kinds='("channels",)'
                             ; 6 for the 1.3B)
  learned pre-projection:    --config.model.pre_proj=learned
  PCA pre-projection:        --config.model.pre_proj=pca --config.model.pca_path=pca.npz
                             (make pca.npz with `python -m input_pipeline.pca
                             --config=configs/jetformer_imagenet256.py --out=pca.npz`)
  single Gaussian:           --config.model.num_mixtures=1
  one class token:           --config.model.num_vocab_repeats=1

TPU fit (aot.py, libtpu 0.0.42.1), batch 2048, remat full. 350M: v5p:4x4x2 (32
chips, 74.6 of 95 GiB per chip; XLA estimates 1.16 s per step, 21% MFU; on 16
chips 94.9 GiB, no headroom), v4:4x4x8 (128 chips, 19.7 of 32), and no single
v5e slice (v5e:16x16 needs 17.4 of 16 GiB; two of them, --num_slices=2, 11.9).
1.3B: v5p:4x4x2 (82.2 GiB, 2.24 s, 27%), v4:4x4x8 (23.7 GiB), two v5e:16x16
(13.0 GiB). On v5p:4x4x4 (64 chips): 350M 40.7 GiB, 0.41 s (29%); 1.3B 44.6
GiB, 0.81 s (37%). With remat dots the 350M needs 95.3 GiB on 64 chips:

  python aot.py --config=configs/jetformer_imagenet256.py:1.3B --topology=v5p:4x4x2

Smoke test on any machine (a tiny model, 16x16 images, a few steps):

  python main.py --config=configs/jetformer_imagenet256.py --workdir=/tmp/jf_smoke \
      --config.runlocal=True
"""

from configs import common


SAMPLING = {"350M": dict(cfg_weight=3.0, t_scale=0.94), "1.3B": dict(cfg_weight=2.0, t_scale=0.93)}


def get_config(variant="350M"):
  c = common.jetformer_base(dataset="imagenet2012", image_size=256, variant=variant)
  c.sample.update(SAMPLING[variant], labels=(1, 9, 88, 207, 279, 360, 387, 417, 812, 980))
  c.local.update(dataset=dict(image_size=16, eval_split="validation[:32]"),
                 sample=dict(per_prompt=2, batch_size=8))
  return c
