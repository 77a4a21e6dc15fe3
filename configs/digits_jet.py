"""Class-conditional Jet on `digits` (scikit-learn's 8x8 digits as 16x16 RGB), offline.

  python main.py --config=configs/digits_jet.py --workdir=/tmp/jet_digits

A few minutes on 2 CPU cores; a smoke test of class conditioning.
"""

from configs import common


def get_config():
  c = common.jet_base(dataset="digits", image_size=16)
  c.dataset.flip = False                 # a mirrored digit is another glyph
  c.model.update(ps=2, depth=8, block_depth=1, emb_dim=64, num_heads=4, num_classes=10,
                 kinds=("channels", "channels", "spatial"), dtype=common.CPU_DEMO_DTYPE)
  c.label_drop_prob = 0.1
  c.batch_size = 64
  c.total_steps = 1000
  c.optim.update(lr=1e-3, mu_dtype="")
  c.mesh = (("data", -1), ("fsdp", 1))
  c.log_every = 50
  c.eval_every = 500
  c.ckpt_every = 500
  c.eval_batch_size = 300
  c.compare_png = True
  c.local.update(total_steps=10, batch_size=16, log_every=5, eval_every=10, ckpt_every=10)
  return c
