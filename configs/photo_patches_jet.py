"""Jet on `photo_patches`: the offline demo (32x32 crops of the photos that ship with
scikit-learn and scikit-image; validation crops come from regions training never sees).

  python main.py --config=configs/photo_patches_jet.py --workdir=/tmp/jet_photo

Trains in about 11 minutes on 2 CPU cores and ends by printing the validation
bits/dim beside two lossless codecs' on the same patches: Jet 3.998, PNG 4.774,
lossless WebP 4.068 (README). Remat `dots_except_mlp_hidden`: on a CPU, whose
memory is slow, recomputing the MLP's wide hidden layer beats saving it
(bench/jet.py --config=J-demo --compare=remat=dots: 1.1x).
"""

from configs import common


def get_config():
  c = common.jet_base(dataset="photo_patches", image_size=32)
  # Many narrow couplings beat few wide ones at equal CPU time here: 16 couplings
  # of width 64 reached 4.54 val bpd at step 250 where 8 of width 128 had 5.27.
  c.model.update(ps=4, depth=16, block_depth=1, emb_dim=64, num_heads=2,
                 kinds=("channels", "channels", "spatial"), dtype=common.CPU_DEMO_DTYPE,
                 remat="dots_except_mlp_hidden")
  c.batch_size = 64
  c.total_steps = 1000
  c.optim.update(lr=1e-3, mu_dtype="", weight_decay=1e-5)
  c.mesh = (("data", -1), ("fsdp", 1))
  c.log_every = 50
  c.eval_every = 500
  c.ckpt_every = 500
  c.eval_batch_size = 256
  c.compare_png = True
  c.local.update(total_steps=20, batch_size=16, log_every=5, eval_every=10, ckpt_every=10)
  return c
