"""The frozen PCA pre-projection of the JetFormer ablation: patch statistics of a training split.

  python -m input_pipeline.pca --config=configs/jetformer_imagenet256.py --out=pca.npz \
      [--num_examples=50000] [--config.key=value ...]

Writes `mean` [D] and `components` [D, D] (columns: principal directions of the
patches, by decreasing variance) and `variances` [D], for
`--config.model.pre_proj=pca --config.model.pca_path=pca.npz`. Patches are the
study's (`model.patch_size`, `dataset.image_size`) in [-1, 1], as the model sees them.
"""

import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from input_pipeline import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the .npz.")
_NUM = flags.DEFINE_integer("num_examples", 50_000, "Training images to read (at most).")
flags.mark_flags_as_required(["config", "out"])


def patches(images, p):  # [B, H, W, C] -> [B * N, p*p*C], the order of jet.patchify
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, p * p * c)


def patch_pca(batches, patch_size, num_examples):
  """(mean [D], components [D, D], variances [D]) over the first num_examples images."""
  total, outer, count, seen = 0.0, 0.0, 0, 0
  for batch in batches:
    images = batch["image"][batch["mask"] > 0][:num_examples - seen].astype(np.float64)
    x = patches(images, patch_size)                                # [M, D]
    total, outer, count = total + x.sum(0), outer + x.T @ x, count + len(x)
    seen += len(images)
    if seen >= num_examples:
      break
  mean = total / count
  variances, vectors = np.linalg.eigh(outer / count - np.outer(mean, mean))
  order = np.argsort(variances)[::-1]
  return mean, vectors[:, order], variances[order]


def main(argv):
  del argv
  config, ds = _CONFIG.value, _CONFIG.value.dataset
  batches = pipeline.make_eval_iterator(
      name=ds.name, split=ds.train_split, image_size=ds.image_size, global_batch_size=256,
      data_dir=ds.data_dir, process_index=0, process_count=1)
  mean, components, variances = patch_pca(batches, config.model.patch_size, _NUM.value)
  np.savez(_OUT.value, mean=mean.astype(np.float32), components=components.astype(np.float32),
           variances=variances.astype(np.float32))
  print(f"Wrote {_OUT.value}: {len(mean)} dims; the first 16 variances "
        f"{np.round(variances[:16], 4).tolist()}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
