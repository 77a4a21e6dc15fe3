"""Host side of sampling: prompts, batch-sharded compiled samplers, uint8 images, PNG grids.

Used by evaluate.py's tasks and by training's periodic sample grid. Every host
builds the same prompt list; each batch is placed on the mesh (batch axis over
all devices), and the results are gathered back to every host.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from jetformer import sampling, sharding
from jetformer.models import jet as jet_lib


def image_options(sample_config):
  s = sample_config
  return sampling.ImageOptions(cfg_weight=s.cfg_weight, t_scale=s.t_scale, t_probs=s.t_probs)


def num_classes(cfg):
  """The class ids a model takes: a Jet's classes (1 if unconditional), a JetFormer's
  base vocabulary."""
  return max(cfg.num_classes, 1) if isinstance(cfg, jet_lib.JetConfig) else cfg.vocab_size


def class_prompts(cfg, labels):
  """JetFormer class ids [P] -> (text [P, R], mask [P, R]) int32; Jet: (labels [P],)."""
  labels = np.asarray(labels, np.int32)
  classes = num_classes(cfg)
  if labels.size and not 0 <= labels.min() <= labels.max() < classes:
    raise ValueError(f"Class labels {labels.min()}..{labels.max()} outside the model's "
                     f"{classes} classes: set --config.sample.labels.")
  if isinstance(cfg, jet_lib.JetConfig):
    return (labels,)
  return tuple(np.asarray(a) for a in sampling.class_prompt(cfg, labels))


def text_prompts(lines, tokenizer, max_len):
  """Prompt strings -> (text [P, L], mask [P, L]) int32, as training tokenizes captions."""
  ids, masks = zip(*(tokenizer.encode_padded(line, max_len) for line in lines))
  return np.stack(ids), np.stack(masks)


def prompt_inputs(cfg, sample_config, tokenizer=None, max_len=0):
  """(names [P], model inputs): config.sample's prompts (text studies: pass their
  tokenizer) or its class labels."""
  s = sample_config
  if tokenizer is not None:
    lines = list(s.prompts) or read_prompts(s.prompts_file)
    return lines, text_prompts(lines, tokenizer, max_len)
  return [str(c) for c in s.labels], class_prompts(cfg, s.labels)


def sample_grid(fn, weights, inputs, *, per_prompt, batch_size, mesh, seed):
  """uint8 [P, per_prompt, H, W, 3] samples of the P prompts' `inputs` (numpy, [P, ...])."""
  inputs = [np.repeat(a, per_prompt, 0) for a in inputs]
  images = run_batched(fn, weights, inputs, batch_size=batch_size, mesh=mesh, seed=seed)
  return to_uint8(images).reshape(-1, per_prompt, *images.shape[1:])


def read_prompts(path):
  """One prompt per non-empty line of a text file."""
  if not path:
    raise ValueError("A text study samples from prompts: set --config.sample.prompts "
                     "(a tuple of strings) or --config.sample.prompts_file.")
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Prompts file {path} does not exist: write one prompt per line "
                            "and pass it as --config.sample.prompts_file=PATH.")
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def image_sampler(cfg, graphdef, shardings, mesh, opts, temperature=1.0):
  """Jitted (params, frozen, key, *prompt) -> images [B, H, W, C] in [-1, 1], batch-sharded.

  JetFormer prompts are (text, mask); a Jet's are (labels,) (ignored when the
  Jet is unconditional), sampled as the flow inverse of temperature * N(0, 1).
  """
  is_jet = isinstance(cfg, jet_lib.JetConfig)

  def fn(params, frozen, key, *prompt):
    model = nnx.merge(graphdef, params, frozen)
    if not is_jet:
      return sampling.sample_images(model, key, *prompt, opts)
    labels = prompt[0]
    context = model.embed_labels(labels) if cfg.num_classes else None
    z = temperature * jax.random.normal(key, (labels.shape[0],) + cfg.image_shape)
    return jnp.clip(model.inverse(z, context)[0], -1.0, 1.0)
  return compile_batched(fn, shardings, mesh, 1 if is_jet else 2)


def caption_sampler(graphdef, shardings, mesh, opts, eos_id):
  """Jitted (params, frozen, key, images [B, H, W, C]) -> tokens [B, max_len], batch-sharded."""
  def fn(params, frozen, key, images):
    return sampling.sample_text(nnx.merge(graphdef, params, frozen), key, images, opts, eos_id)
  return compile_batched(fn, shardings, mesh, 1)


def compile_batched(fn, shardings, mesh, num_inputs):
  """jit of fn(params, frozen, key, *inputs) with the inputs and output batch-sharded."""
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return sharding.on_mesh(jax.jit(
      fn, in_shardings=(shardings["params"], shardings["frozen"], repl)
      + (batch_sh,) * num_inputs, out_shardings=batch_sh), mesh)


def run_batched(fn, weights, inputs, *, batch_size, mesh, seed):
  """fn(*weights, key_i, *batch_i) over `inputs` (numpy, same length) in batches.

  Every host passes the same inputs; each device computes its rows of a batch.
  The last batch is padded by repeating its last row; the padding rows are
  dropped from the result. Returns fn's outputs as numpy [len, ...] on every host.
  """
  n, devices = len(inputs[0]), mesh.size
  if batch_size % devices:
    raise ValueError(f"Sampling batch size {batch_size} must be a multiple of the "
                     f"{devices} devices: set --config.sample.batch_size.")
  outs = []
  for i, start in enumerate(range(0, n, batch_size)):
    real = min(batch_size, n - start)
    chunk = [np.concatenate([a[start:start + real], np.repeat(a[start + real - 1:][:1],
                                                               batch_size - real, 0)])
             for a in inputs]                                   # each [batch_size, ...]
    out = fn(*weights, jax.random.fold_in(jax.random.key(seed), i),
             *[sharding.put_batch(c, mesh) for c in chunk])
    outs.append(jax.tree.map(lambda x: x[:real], sharding.to_host(out)))
  return jax.tree.map(lambda *x: np.concatenate(x), *outs)


def to_uint8(images):
  """[-1, 1] floats -> [0, 255] uint8, rounded as the data was quantized."""
  return np.clip(np.round((np.asarray(images) + 1) * 127.5), 0, 255).astype(np.uint8)


def grid(images, min_cell=64):
  """uint8 [R, C, H, W, 3] -> one [R*(h+2), C*(w+2), 3] picture (nearest-neighbour upscaled
  so that each cell is at least `min_cell` pixels wide; 2-pixel white gaps)."""
  r, c, h, w, _ = images.shape
  s = max(1, -(-min_cell // w))
  cells = images.repeat(s, 2).repeat(s, 3)                       # [R, C, sH, sW, 3]
  cells = np.pad(cells, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255)
  return cells.transpose(0, 2, 1, 3, 4).reshape(r * (s * h + 2), c * (s * w + 2), 3)


def write_png(path, picture):
  """uint8 [H, W, 3] to a PNG at `path` (local or gs://)."""
  buffer = io.BytesIO()
  Image.fromarray(picture).save(buffer, format="PNG")
  epath.Path(path).write_bytes(buffer.getvalue())
