"""big_vision Jet weights reproduce the reference outputs (tests/testdata)."""

import json

import jax.numpy as jnp
import numpy as np

from conftest import TESTDATA
from jetformer import losses
from jetformer.convert import big_vision


def test_reference_jet_a():
  ref = np.load(TESTDATA / "jet_ref_a.npz")
  meta = json.loads((TESTDATA / "jet_ref_a.json").read_text())
  params = {k: ref[k] for k in ref.files if k.startswith("params/")}
  config = dict(meta["model_kwargs"], input_shape=meta["input_shape"][1:])
  jet = big_vision.jet_from_big_vision(params, config)
  z, logdet = jet(jnp.asarray(ref["x"]))
  np.testing.assert_allclose(z, ref["z"], atol=1e-4)
  np.testing.assert_allclose(logdet, ref["logdet"], atol=1e-4)
  np.testing.assert_allclose(losses.bits_per_dim(z, logdet)["bpd"], ref["bpd"], atol=1e-4)
  x_rec, logdet_inv = jet.inverse(z)
  np.testing.assert_allclose(x_rec, ref["x_rec"], atol=1e-4)
  np.testing.assert_allclose(logdet_inv, ref["logdet_inv"], atol=1e-4)
