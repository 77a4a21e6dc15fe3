"""Class-conditional JetFormer on the offline `digits` data (16x16), in minutes on a CPU.

4x4 patches (16 tokens of 48 values), a small Jet adaptor, a 3-layer Gemma
decoder over all 48 latent dims per token with a mixture of 16 Gaussians; the
digit is a 4-token prefix, dropped to NOLABEL for 10% of examples
(classifier-free guidance). Noise curriculum from sigma 32 to 0.

No factoring out (the paper's ablation) because the digits are grey: 32 of the
48 values of a patch are channel differences holding only dequantization noise
(std ~0.002). Factored out to N(0, 1), they would need the 4-coupling adaptor to
scale them up ~300x; it cannot (its factored dims ended at std 0.24 after 4,000
steps, carrying the digit), and N(0, 1) draws in their place turned samples into
noise (1/10 classified right). Modelled by the mixture, they get tiny scales.

  python main.py --config=configs/digits_jetformer.py --workdir=/tmp/jf_digits

Prints the validation image NLL (bits per subpixel) at the end, then samples 16
guided images of every digit, writes them as a grid (WORKDIR/digits_4000.png)
and prints the fraction a classifier fit on the real training digits assigns
to the requested digit. README has the numbers of a run.

FID, precision/recall and their real-vs-real floor (the FID Inception
converted once: docs/evaluation.md):

  python evaluate.py --config=configs/digits_jetformer.py --workdir=/tmp/jf_digits \
    --tasks=fid --config.fid.inception_path=inception_fid.npz
"""

from configs import common


def get_config():
  c = common.jetformer_base(dataset="digits", image_size=16)
  c.dataset.flip = False                 # a mirrored digit is another glyph
  c.model.update(patch_size=4, latent_dim=0, num_mixtures=16, vocab_size=10,
                 num_vocab_repeats=4)
  c.model.jet.update(depth=4, block_depth=1, emb_dim=64, num_heads=2,
                     dtype=common.CPU_DEMO_DTYPE, remat="dots")
  c.model.decoder.update(width=128, depth=3, mlp_dim=512, num_heads=4, head_dim=32,
                         dtype=common.CPU_DEMO_DTYPE, remat="dots")
  c.objective.update(noise_sigma0=32.0)
  c.batch_size = 64
  c.total_steps = 4000
  c.optim.update(lr=1e-3, mu_dtype="", weight_decay=1e-4)
  c.mesh = (("data", -1), ("fsdp", 1))
  c.log_every = 100
  c.eval_every = 1000
  c.ckpt_every = 1000
  c.eval_batch_size = 128
  c.sample.update(per_prompt=16, cfg_weight=3.0, t_scale=0.94, batch_size=160)
  c.final_tasks = ("digits",)
  # evaluate.py --tasks=fid: 300 samples (30 per digit) against the 1,497 training digits,
  # beside the 300 validation digits against the same (the floor at this sample size).
  c.fid.update(num_samples=300, reference_split="train", floor_split="validation",
               batch_size=100)
  c.local = dict(batch_size=16, total_steps=6, log_every=2, eval_every=6, ckpt_every=6,
                 sample=dict(per_prompt=8, batch_size=80), caption=dict(num_examples=64))
  return c
