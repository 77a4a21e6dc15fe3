"""The optimizer: optax Adam with warm-up + cosine decay, clipping, decoupled decay."""

import jax
import jax.numpy as jnp
import optax


def schedule(lr, total_steps, warmup_frac):
  """Linear warm-up for warmup_frac of training, then cosine decay to 0."""
  warmup = max(int(round(warmup_frac * total_steps)), 1)
  return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)


def decay_mask(params):
  """Weight decay on kernels only (matrices, not biases, norms or embeddings)."""
  def is_kernel(path, _):
    return getattr(path[-1], "key", getattr(path[-1], "name", None)) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make(*, lr, total_steps, warmup_frac=0.1, b1=0.9, b2=0.95, mu_dtype=None,
         weight_decay=0.0, grad_clip=1.0, frozen=()):
  """Adam (b2=0.95 by default, optional bfloat16 first moment) as in the Jet paper.

  Weight decay is decoupled from the learning rate: each step removes
  `weight_decay * schedule(t) / lr` of a kernel, so `weight_decay` is the
  per-step shrink at peak learning rate whatever `lr` is. Top-level parameter
  groups named in `frozen` (e.g. ("jet",)) are never updated, not even decayed.
  A gradient with a non-finite entry is not applied (optax.apply_if_finite).
  """
  sched = schedule(lr, total_steps, warmup_frac)
  mu_dtype = jnp.dtype(mu_dtype) if mu_dtype else None
  tx = optax.chain(
      optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity(),
      optax.scale_by_adam(b1=b1, b2=b2, mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay / lr, mask=decay_mask) if weight_decay
      else optax.identity(),
      optax.scale_by_learning_rate(sched),
  )
  if frozen:
    groups = lambda params: {k: "frozen" if k in frozen else "train" for k in params}
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, groups)
  # A step with a non-finite gradient changes nothing and is counted (`skipped`); the
  # training loop stops the run after too many in a row, so optax never has to.
  return optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)


def skip_counts(opt_state):
  """{"skipped_steps": total, "nonfinite_in_a_row": current run} of apply_if_finite's state."""
  return {"skipped_steps": opt_state.total_notfinite,
          "nonfinite_in_a_row": opt_state.notfinite_count}
