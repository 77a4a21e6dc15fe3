"""Evaluating a checkpoint: restore the weights onto this run's mesh, run named tasks.

A task takes a `Context` (config, restored checkpoint, input module, workdir,
metric writer) and returns {metric: number}; pictures, samples and captions
go to files in the workdir (and the writer, for TensorBoard). The entry point
(evaluate.py) passes in the input module and the writer, so that this package
never imports TensorFlow.

On several hosts every task runs the same command on each: the models and the
Inception network run over all devices of all hosts, each device on its rows
of a batch. Every host passes the same prompts and images to a sampler and gets
all results back; the FID reference set is read in shares, a share per host.
Only process 0 writes files.

  bpd          validation bits/dim (Jet) or bits/subpixel and text NLL (JetFormer)
  sample       a PNG grid and an .npz of samples for the config's classes or prompts
  caption      captions for validation images beside their references (text studies)
  reconstruct  original | factored-out dims resampled | RGB noise at sigma0 (JetFormer);
               original | latent z | Jet^-1(z) (Jet)
  digits       the offline digits demos' scores from a classifier (no external weights)
  fid          FID, Inception Score, precision/recall (converted Inception weights),
               beside the same of real images (config.fid.floor_split)
"""

import dataclasses
import hashlib
import io
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from jetformer import checkpoint, generation, losses, objectives, sampling, sharding, steps
from jetformer import train
from jetformer.metrics import fid as fid_lib
from jetformer.metrics import inception

@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint on this run's mesh; nnx.merge(graphdef, params, frozen) is the model."""
  step: int
  cfg: Any                       # the model's config (JetConfig or JetFormerConfig)
  state: dict                    # params, frozen[, ema]: no optimizer state
  graphdef: Any
  shardings: dict                # same tree as `state`
  mesh: jax.sharding.Mesh


def restore(config, workdir, step=None, data=None):
  """The model weights at `step` (default: the latest) in `workdir`, sharded as `config` says.

  The mesh and the sharding rules come from `config`, not from the training
  run, so a checkpoint written on any mesh restores onto the devices present;
  the optimizer state is not read. `data` (the input module) resolves a text
  study's tokenizer.
  """
  mesh = sharding.make_mesh(config.mesh)
  cfg = train.model_config(config, data)
  graphdef, params, frozen = steps.abstract_model(cfg)
  ema = config.ema_decay > 0
  shardings = steps.weight_shardings(params, frozen, config.sharding_rules, mesh, ema=ema)
  abstract = {"params": params.to_pure_dict(), "frozen": frozen.to_pure_dict()}
  if ema:
    abstract["ema"] = abstract["params"]
  mgr = checkpoint.reader(workdir)
  step, state = checkpoint.restore(mgr, sharding.abstract(abstract, shardings), step=step,
                                   partial=True)
  if state is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
  return Restored(step, cfg, state, graphdef, shardings, mesh)


@dataclasses.dataclass
class Context:
  config: Any                    # the study config (after `finalize`)
  restored: Restored
  data: Any                      # the input module
  workdir: str
  writer: Any = None             # a clu metric writer, or None

  def path(self, name, suffix):
    return epath.Path(self.workdir) / f"{name}_{self.restored.step}.{suffix}"

  @property
  def weights(self):
    """(params, frozen): the EMA of the params when the study keeps one."""
    state = self.restored.state
    return state.get("ema", state["params"]), state["frozen"]


def bpd(ctx):
  """val_* of the params, val_ema_* of their EMA (as training reports them)."""
  r = ctx.restored
  eval_fn = train.compile_eval_step(ctx.config, r.graphdef, r.shardings, r.mesh)
  return train.evaluate_state(eval_fn, r.state, train.make_eval_data(ctx.config, ctx.data),
                              r.mesh, ctx.config.seed)


def is_text(config):
  return train.is_jetformer(config) and bool(config.text.tokenizer)


def tokenizer(ctx):
  return ctx.data.load_tokenizer(train.tokenizer_path(ctx.config, ctx.data))


def draw_grid(ctx, inputs, per_prompt):
  """uint8 [P, per_prompt, H, W, 3] for P prompts' model inputs (config.sample settings)."""
  r, s = ctx.restored, ctx.config.sample
  fn = generation.image_sampler(r.cfg, r.graphdef, r.shardings, r.mesh,
                                generation.image_options(s), s.temperature)
  return generation.sample_grid(fn, ctx.weights, inputs, per_prompt=per_prompt,
                                batch_size=s.batch_size, mesh=r.mesh, seed=s.seed)


def save_grid(ctx, name, images):
  """A PNG grid (a row per prompt) in the workdir and to TensorBoard; returns its path."""
  picture = generation.grid(images)
  path = ctx.path(name, "png")
  if jax.process_index() == 0:
    generation.write_png(path, picture)
  if ctx.writer is not None:
    ctx.writer.write_images(ctx.restored.step, {name: picture[None]})
  return path


def sample(ctx):
  """A grid of config.sample.per_prompt samples per class or prompt, and their .npz."""
  tok = tokenizer(ctx) if is_text(ctx.config) else None
  names, inputs = generation.prompt_inputs(ctx.restored.cfg, ctx.config.sample, tok,
                                           ctx.config.text.max_len if tok else 0)
  start = time.perf_counter()
  images = draw_grid(ctx, inputs, ctx.config.sample.per_prompt)
  path = save_grid(ctx, "samples", images)
  if jax.process_index() == 0:
    with ctx.path("samples", "npz").open("wb") as f:
      np.savez(f, images=images, prompts=np.asarray(names))
  print(f"Samples: {path} (rows: {', '.join(names)})", flush=True)
  return {"sample_seconds": time.perf_counter() - start}  # compilation included


def validation_batches(ctx, text=True):
  """The whole eval split on every host, in order: numpy batches of image [B, H, W, 3] in
  [-1, 1], label [B], mask [B] and, for text studies, caption [B] str. For the few
  examples that prompt a model: every host passes the same inputs (run_batched)."""
  return train.make_eval_data(ctx.config, ctx.data, text=text, process_index=0,
                              process_count=1)()


def validation_examples(ctx, count, text=True, keys=("image", "label", "caption")):
  """The first `count` validation examples' `keys` (see validation_batches), as numpy."""
  out, n = {}, 0
  for batch in validation_batches(ctx, text=text):
    real = batch["mask"] > 0
    for k in keys:
      if k in batch:
        out.setdefault(k, []).append(np.asarray(batch[k])[real])
    n += int(real.sum())
    if n >= count:
      break
  return {k: np.concatenate(v)[:count] for k, v in out.items()}


def generate_captions(ctx, images):
  """Greedy (or config.caption's temperature / top-k) captions of images, as strings."""
  r, c, tok = ctx.restored, ctx.config.caption, tokenizer(ctx)
  opts = sampling.TextOptions(max_len=c.max_len or ctx.config.text.max_len,
                              temperature=c.temperature, top_k=c.top_k)
  fn = generation.caption_sampler(r.graphdef, r.shardings, r.mesh, opts, tok.eos_id)
  tokens = generation.run_batched(fn, ctx.weights, [images], batch_size=c.batch_size,
                                  mesh=r.mesh, seed=c.seed)
  return [tok.decode(t) for t in tokens.tolist()]


def caption(ctx):
  """captions_STEP.jsonl: a caption per validation image beside its reference caption."""
  if not is_text(ctx.config):
    raise ValueError("The caption task needs a text study (config.text.tokenizer set).")
  ex = validation_examples(ctx, ctx.config.caption.num_examples)
  captions = generate_captions(ctx, ex["image"])
  lines = [json.dumps({"caption": c, "reference": str(ref)})
           for c, ref in zip(captions, ex["caption"])]
  if jax.process_index() == 0:
    ctx.path("captions", "jsonl").write_text("\n".join(lines) + "\n")
  if ctx.writer is not None:
    ctx.writer.write_texts(ctx.restored.step, {"captions": "\n\n".join(lines[:16])})
  print(f"Captions: {ctx.path('captions', 'jsonl')}; first: {lines[0]}", flush=True)
  return {"captions": len(lines)}


def reconstruct(ctx):
  """JetFormer: the paper's picture of what the factored-out dims hold: per validation
  image, the original, the flow inverse with those dims redrawn from N(0, 1), and the
  image under the noise curriculum's first RGB noise level. Jet: the original, its
  latent z = Jet(x) (shown as z / 3) and Jet^-1(z), which must be the original."""
  config, r = ctx.config, ctx.restored
  ex = validation_examples(ctx, config.sample.per_prompt, text=False, keys=("image", "label"))
  labels = ex.get("label", np.zeros(len(ex["image"]), np.int32))  # unconditional data
  fn = jetformer_reconstruction(r, config) if train.is_jetformer(config) else jet_round_trip(r)
  fn = generation.compile_batched(fn, r.shardings, r.mesh, 2)
  out = generation.run_batched(fn, ctx.weights, [ex["image"], labels],
                               batch_size=config.sample.batch_size, mesh=r.mesh,
                               seed=config.sample.seed)
  out = generation.to_uint8(out).swapaxes(0, 1)                    # [3, n, H, W, 3]
  save_grid(ctx, "reconstructions", out)
  if train.is_jetformer(config):
    mse = np.mean((out[1].astype(np.float64) - out[0]) ** 2)
    return {"reconstruct_psnr_redrawn": float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))}
  # Pixel levels by which Jet^-1(Jet(x)) misses x: 0 unless the flow is not invertible.
  return {"reconstruct_max_error": float(np.abs(out[2].astype(np.int32) - out[0]).max())}


def jetformer_reconstruction(r, config):
  sigma0 = config.objective.noise_sigma0

  def fn(params, frozen, key, x, label):  # x [B, H, W, C] -> [B, 3, H, W, C]
    del label
    model = nnx.merge(r.graphdef, params, frozen)
    k_deq, k_fac, k_rgb = jax.random.split(key, 3)
    soft, factored, _ = model.encode(losses.dequantize(k_deq, x))
    redrawn = model.decode(soft, jax.random.normal(k_fac, factored.shape))
    return jnp.stack([x, jnp.clip(redrawn, -1, 1), objectives.rgb_noise(k_rgb, x, sigma0)], 1)
  return fn


def jet_round_trip(r):
  def fn(params, frozen, key, x, label):  # x [B, H, W, C] -> [B, 3, H, W, C]
    del key
    jet = nnx.merge(r.graphdef, params, frozen)
    context = objectives.jet_context(jet, label)
    z, _ = jet(x, context)
    back, _ = jet.inverse(z, context)
    return jnp.stack([x, jnp.clip(z / 3, -1, 1), back], 1)
  return fn


def digits(ctx):
  """The digits demos' scores: guided class samples (or "the digit N" samples) classified
  as the requested digit, and validation captions naming the right digit."""
  from_data = ctx.data.digits_score
  classifier = from_data.DigitClassifier(ctx.config.dataset.data_dir)
  s, results = ctx.config.sample, {}
  if is_text(ctx.config):
    names = [f"the digit {i}" for i in range(10)]
    inputs = generation.text_prompts(names, tokenizer(ctx), ctx.config.text.max_len)
  else:
    inputs = generation.class_prompts(ctx.restored.cfg, range(10))
  images = draw_grid(ctx, inputs, s.per_prompt)                     # [10, S, H, W, 3]
  save_grid(ctx, "digits", images)
  predicted = classifier.predict(images.reshape(-1, *images.shape[2:])).reshape(10, -1)
  results["digits_sample_accuracy"] = float(np.mean(predicted == np.arange(10)[:, None]))
  if is_text(ctx.config):
    ex = validation_examples(ctx, ctx.config.caption.num_examples)
    named = [from_data.named_digit(c) for c in generate_captions(ctx, ex["image"])]
    results["digits_caption_accuracy"] = float(np.mean(np.asarray(named) == ex["label"]))
  print(f"Digits: {results} (grid: {ctx.path('digits', 'png')})", flush=True)
  return results


def _real_images(ctx, split, keys):
  """Global batches of `keys` of {'image': [B, H, W, 3] pixels 0..255, 'mask' [B],
  'digest' [B, 2]} of `split`.

  Each host reads its rows of every eval batch; 'digest' is a hash of each
  example's pixels, taken on the host that read it.
  """
  mesh = ctx.restored.mesh
  eval_data = train.make_eval_data(ctx.config, ctx.data, split=split, text=False)
  for local in eval_data():
    pixels = np.round((local["image"] + 1) * 127.5).astype(np.uint8)  # exact: k / 127.5 - 1
    batch = {"image": pixels, "mask": local["mask"]}
    if "digest" in keys:
      batch["digest"] = np.stack([
          np.frombuffer(hashlib.blake2b(x.tobytes(), digest_size=8).digest(), np.uint32)
          for x in pixels])
    yield sharding.global_batch({k: batch[k] for k in keys}, mesh)


def images_digest(ctx, split):
  """Hex digest of `split`'s images in order (the same for any number of hosts)."""
  h = hashlib.sha256()
  for batch in _real_images(ctx, split, ("digest", "mask")):
    digest, mask = sharding.to_host((batch["digest"], batch["mask"]))
    h.update(digest[mask > 0].tobytes())
  return h.hexdigest()


def real_features(ctx, model, split, limit=None):
  """Inception (pool [N, 2048], logits [N, 1008] or None) of `split`'s first `limit` images.

  Every device computes the features of its slice of each batch, so a pod
  shares the set among all chips; reading stops once `limit` images are in.
  """
  masks = []

  def images():
    count = 0
    for batch in _real_images(ctx, split, ("image", "mask")):
      masks.append(sharding.to_host(batch["mask"]))
      yield batch["image"]
      count += int((masks[-1] > 0).sum())
      if limit is not None and count >= limit:
        return
  pool, logits = fid_lib.inception_features(model, images(), mesh=ctx.restored.mesh)
  keep = np.flatnonzero(np.concatenate(masks) > 0)[:limit]
  return pool[keep], None if logits is None else logits[keep]


def fid_reference(ctx, model):
  """Inception statistics (and features) of the reference split, cached in an .npz.

  The file's name holds a digest of the reference images and of the network
  (weights and input path): other data or another network give another file.
  A file named by config.fid.reference_path is checked against the network if
  it records one (files this task writes do; pytorch-fid's do not).
  """
  f, ds = ctx.config.fid, ctx.config.dataset
  split = f.reference_split or ds.eval_split
  network = inception.fingerprint(model)
  if f.reference_path:
    path = epath.Path(f.reference_path)
  else:
    path = epath.Path(ctx.workdir) / "fid_reference_{}_{}_{}_{}.npz".format(
        ds.name, "".join(c if c.isalnum() else "_" for c in split),
        images_digest(ctx, split)[:12], network[:12])
  if path.exists():
    with path.open("rb") as fp:
      reference = fid_lib.load_reference(fp)
    if reference.network not in (None, network):
      raise ValueError(f"{path} holds the statistics of another FID network than "
                       f"{f.inception_path}; remove config.fid.reference_path to compute them.")
    return reference
  pool, _ = real_features(ctx, model, split)
  buffer = io.BytesIO()
  reference = fid_lib.save_reference(buffer, pool, network=network)
  if jax.process_index() == 0:
    path.write_bytes(buffer.getvalue())
  print(f"FID reference: {len(pool)} images of {ds.name}:{split}, cached in {path}", flush=True)
  return reference


def fid_prompts(ctx, count):
  """Model inputs for `count` samples: classes in turn, or the reference captions."""
  cfg = ctx.restored.cfg
  if is_text(ctx.config):
    captions = validation_examples(ctx, count, keys=("caption",))["caption"]
    captions = np.resize(captions, count)                           # repeat if the split is short
    return generation.text_prompts([str(c) for c in captions], tokenizer(ctx),
                                   ctx.config.text.max_len)
  return generation.class_prompts(cfg, np.arange(count) % generation.num_classes(cfg))


def fid(ctx):
  """FID, Inception Score and precision/recall of config.fid.num_samples samples (the
  config's sampling settings) against the reference split; with config.fid.floor_split,
  the same of as many real images of that split: what a model drawing fresh images
  from the data distribution would get at this sample size."""
  f = ctx.config.fid
  if f.floor_split and f.floor_split == (f.reference_split or ctx.config.dataset.eval_split):
    raise ValueError(f"config.fid.floor_split={f.floor_split!r} is the reference split: "
                     "name held-out images (e.g. 'validation').")
  s, r = ctx.config.sample, ctx.restored
  model = inception.load(f.inception_path)
  reference = fid_reference(ctx, model)
  inputs = fid_prompts(ctx, f.num_samples)
  fn = generation.image_sampler(r.cfg, r.graphdef, r.shardings, r.mesh,
                                generation.image_options(s), s.temperature)
  chunk = 16 * s.batch_size                                        # samples held at a time

  def samples():
    for i, start in enumerate(range(0, f.num_samples, chunk)):
      images = generation.to_uint8(generation.run_batched(
          fn, ctx.weights, [a[start:start + chunk] for a in inputs], batch_size=s.batch_size,
          mesh=r.mesh, seed=s.seed + i))                                # [chunk, H, W, 3]
      yield from (images[j:j + f.batch_size] for j in range(0, len(images), f.batch_size))
  pool, logits = fid_lib.inception_features(model, samples(), mesh=r.mesh)
  results = fid_lib.image_metrics(pool, logits, reference, k=f.k)
  if f.floor_split:
    real_pool, real_logits = real_features(ctx, model, f.floor_split, limit=f.num_samples)
    floor = fid_lib.image_metrics(real_pool, real_logits, reference, k=f.k)
    results.update({f"floor_{k}": v for k, v in floor.items()},
                   floor_num_images=len(real_pool))
  print(f"FID: {results}", flush=True)
  return results


TASKS = {"bpd": bpd, "sample": sample, "caption": caption, "reconstruct": reconstruct,
         "digits": digits, "fid": fid}


def check_tasks(tasks):
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise ValueError(f"Unknown evaluation tasks {unknown}; known: {sorted(TASKS)}.")


def run_tasks(ctx, tasks):
  check_tasks(tasks)
  results = {"step": ctx.restored.step}
  for name in tasks:
    results.update(TASKS[name](ctx))
  return results


def evaluate_checkpoint(config, workdir, *, data, step=None, tasks=("bpd",), writer=None):
  """{"step": checkpoint step, metric: value, ...} of the checkpoint's model.

  Args:
    config: the study config the checkpoint was trained with (after `finalize`).
    data: the input module (`input_pipeline`).
    step: the checkpoint to read; the latest by default.
    tasks: names from TASKS, run in this order.
    writer: a clu metric writer for the scalars, pictures and captions, or None.
  """
  check_tasks(tasks)
  ctx = Context(config, restore(config, workdir, step, data), data, workdir, writer)
  results = run_tasks(ctx, tasks)
  if writer is not None:
    writer.write_scalars(results["step"], {k: v for k, v in results.items() if k != "step"})
  return results
