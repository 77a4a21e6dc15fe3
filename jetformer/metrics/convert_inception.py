"""pytorch-fid's FID Inception weights (.pth) -> the .npz that `inception.load` reads.

  python -m jetformer.metrics.convert_inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

torch is not needed: a .pth is a pickle whose tensors point at raw storages,
either in a zip archive (torch >= 1.6) or appended after the pickle (the
legacy format). A restricted unpickler rebuilds the tensors as numpy arrays
and refuses every other global, so the file cannot run code.

Names map one to one (`inception.py` uses torchvision's module names):
  X.conv.weight [O, I, kh, kw]  -> X/kernel [kh, kw, I, O]
  X.bn.{weight, bias, running_mean, running_var} -> X/{scale, bias, mean, var}
  fc.weight [1008, 2048], fc.bias -> fc/kernel [2048, 1008], fc/bias
and every `num_batches_tracked` is dropped.
"""

import collections
import hashlib
import pickle
import zipfile

import numpy as np
from absl import app

from jetformer.metrics import inception

SHA256_PREFIX = "6726825d"  # torch hub's name suffix for pytorch-fid's file
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
           "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


class _Storage:
  """A torch storage: a flat array once its bytes are read."""

  def __init__(self, dtype, numel):
    self.dtype, self.numel, self.array = dtype, numel, None


class _Tensor:
  """A strided view of a storage, resolved once every storage is read."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def numpy(self):
    flat = self.storage.array
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                           [s * item for s in self.stride])
    return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  """Unpickles a state dict; storages come from `storages` (key -> _Storage), made on demand."""

  def __init__(self, file, storages):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module, name):
    if module == "torch" and name in _DTYPES:
      return _DTYPES[name]
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f"Refusing to load {module}.{name}: not a plain state dict.")

  def persistent_load(self, pid):
    # ('storage', dtype, key, location, numel[, view_metadata]); views are legacy-only.
    if pid[0] != "storage" or (len(pid) > 5 and pid[5] is not None):
      raise pickle.UnpicklingError(f"Unsupported persistent id {pid[:1]}.")
    dtype, key, numel = pid[1], str(pid[2]), pid[4]
    return self.storages.setdefault(key, _Storage(dtype, numel))


def _resolve(obj):
  if isinstance(obj, _Tensor):
    return obj.numpy()
  if isinstance(obj, dict):
    return {k: _resolve(v) for k, v in obj.items()}
  return obj


def _read_zip(path):
  with zipfile.ZipFile(path) as z:
    pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
    root = pkl[:-len("data.pkl")]
    storages = {}
    with z.open(pkl) as f:
      obj = _Unpickler(f, storages).load()
    names = set(z.namelist())
    if root + "byteorder" in names and z.read(root + "byteorder").decode() != "little":
      raise ValueError(f"{path}: big-endian checkpoints are not supported.")
    for key, s in storages.items():
      s.array = np.frombuffer(z.read(f"{root}data/{key}"), s.dtype, count=s.numel)
  return obj


def _read_legacy(path):
  with open(path, "rb") as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise ValueError(f"{path} is neither a zip nor a legacy torch checkpoint.")
    pickle.load(f)  # protocol version
    if not pickle.load(f).get("little_endian", True):
      raise ValueError(f"{path}: big-endian checkpoints are not supported.")
    storages = {}
    obj = _Unpickler(f, storages).load()
    for key in pickle.load(f):  # each storage: int64 element count, then its bytes
      s = storages[str(key)]
      numel = int(np.frombuffer(f.read(8), "<i8")[0])
      s.array = np.frombuffer(f.read(numel * np.dtype(s.dtype).itemsize), s.dtype)
  return obj


def read_torch_checkpoint(path):
  """{name: np.ndarray} of a state dict saved by torch.save, read without torch."""
  obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  return _resolve(obj)


def from_pytorch_fid(state_dict):
  """{'/'-joined InceptionV3 path: array} from pytorch-fid's FID Inception state dict."""
  params = {}
  for name, value in state_dict.items():
    *module, layer, leaf = name.split(".")
    if leaf == "num_batches_tracked":
      continue
    if (layer, leaf) == ("conv", "weight"):
      params["/".join(module + ["kernel"])] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif layer == "bn" and leaf in _BN:
      params["/".join(module + [_BN[leaf]])] = value
    elif (module, layer, leaf) == ([], "fc", "weight"):
      params["fc/kernel"] = value.T  # [2048, 1008]
    elif (module, layer, leaf) == ([], "fc", "bias"):
      params["fc/bias"] = value
    else:
      raise ValueError(f"Unexpected parameter {name!r}: not pytorch-fid's FID Inception.")
  return params


def sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def convert(src, dst):
  """Writes the .npz for `inception.load` from pytorch-fid's .pth; returns the model."""
  params = from_pytorch_fid(read_torch_checkpoint(src))
  model = inception.from_params(params, source=src)  # checks names and shapes
  inception.save(model, dst)
  return model


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("Usage: python -m jetformer.metrics.convert_inception SRC.pth DST.npz")
  src, dst = argv[1:]
  digest = sha256(src)
  if not digest.startswith(SHA256_PREFIX):
    print(f"Warning: sha256 of {src} is {digest[:8]}..., not {SHA256_PREFIX}...: "
          "this is not pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
  convert(src, dst)
  print(f"Wrote {dst} (sha256 of the source {digest[:8]}...).")


if __name__ == "__main__":
  app.run(main)
