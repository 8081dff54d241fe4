"""Read PyTorch checkpoints into numpy without importing torch.

`torch.save` has two formats: a zip archive (torch >= 1.6) and the older "legacy" stream — five pickles in a
row (magic number, protocol, system info, the object with storages as persistent ids, the storage keys) followed
by each storage's raw bytes. Both are read here with a restricted unpickler that builds numpy arrays and knows
only the handful of globals a state dict needs, so reading a checkpoint runs no code from it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
import zipfile
from typing import Any

import numpy as np

from jaxmr.tree import flatten, unflatten

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,  # raw bits; converted below
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch checkpoint this reader understands."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _TensorRef:
    """A tensor view into a storage that is read later (legacy files put the bytes after the pickle)."""

    def __init__(self, storage: tuple, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self, buffers: dict[str, np.ndarray]) -> np.ndarray:
        key, storage_type = self.storage
        flat = buffers[key]
        itemsize = flat.dtype.itemsize
        if not self.size:
            array = flat[self.offset : self.offset + 1].reshape(())
        else:
            array = np.lib.stride_tricks.as_strided(
                flat[self.offset :], shape=self.size, strides=[s * itemsize for s in self.stride]
            )
        array = np.array(array)  # own the memory, contiguous
        if storage_type.name == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        raise CheckpointFormatError(f"refusing to load {module}.{name} from a checkpoint (not a plain state dict)")

    def persistent_load(self, saved_id: Any) -> tuple:
        # ("storage", storage_type, key, location, numel[, view metadata])
        if not isinstance(saved_id, tuple) or saved_id[0] != "storage":
            raise CheckpointFormatError(f"unknown persistent id {saved_id!r}")
        _, storage_type, key, _location, numel = saved_id[:5]
        self.numels[str(key)] = (storage_type, numel)
        return (str(key), storage_type)


def _materialise(obj: Any, buffers: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.materialise(buffers)
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v, buffers)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v, buffers) for v in obj)
    return obj


def _load_legacy(f: io.BufferedIOBase) -> Any:
    if pickle.load(f) != LEGACY_MAGIC:
        raise CheckpointFormatError("not a PyTorch checkpoint (bad magic number)")
    protocol = pickle.load(f)
    if protocol != 1001:
        raise CheckpointFormatError(f"unsupported legacy protocol {protocol}")
    pickle.load(f)  # system info: endianness and type sizes (little-endian assumed, as torch writes)
    unpickler = _Unpickler(f)
    unpickler.numels = {}
    obj = unpickler.load()
    keys = pickle.load(f)
    buffers = {}
    for key in keys:
        storage_type, _ = unpickler.numels[key]
        (numel,) = struct.unpack("<q", f.read(8))
        data = f.read(numel * storage_type.dtype.itemsize)
        if len(data) != numel * storage_type.dtype.itemsize:
            raise CheckpointFormatError("truncated checkpoint")
        buffers[key] = np.frombuffer(data, storage_type.dtype)
    return _materialise(obj, buffers)


def _load_zip(path: str | os.PathLike) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointFormatError(f"{path}: a zip file without data.pkl is not a PyTorch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        unpickler = _Unpickler(io.BytesIO(archive.read(pkl)))
        unpickler.numels = {}
        obj = unpickler.load()
        buffers = {
            key: np.frombuffer(archive.read(f"{prefix}data/{key}"), storage_type.dtype)
            for key, (storage_type, _) in unpickler.numels.items()
        }
    return _materialise(obj, buffers)


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict (zip or legacy format) as {name: numpy array}, without torch."""
    try:
        if zipfile.is_zipfile(path):
            state = _load_zip(path)
        else:
            with open(path, "rb") as f:
                state = _load_legacy(f)
    except (pickle.UnpicklingError, EOFError, struct.error) as e:
        raise CheckpointFormatError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


class ConversionError(ValueError):
    """A checkpoint a converter does not understand."""


class TorchState:
    """Converts a torch-layout state dict into our nested params, checking that every tensor is used.

    `take` reads a tensor (marking it used), `put` places a value at a "a/b/0/c" path; `linear`, `norm` and
    `attention` do the layout changes (torch Linear weights are [out, in], ours [in, out]; attention kernels are
    split into heads). `params` is the nested dict, `check_all_used` fails on tensors no rule consumed."""

    def __init__(self, state: dict[str, np.ndarray]):
        self.state = {k: np.asarray(v, np.float32) for k, v in state.items()}
        self.used: set[str] = set()
        self.flat: dict[str, np.ndarray] = {}

    @property
    def params(self) -> dict:
        return unflatten(self.flat)

    def take(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise ConversionError(f"the checkpoint has no tensor {key!r}")
        self.used.add(key)
        return self.state[key]

    def put(self, path: str, value: np.ndarray) -> None:
        self.flat[path] = np.array(value, np.float32)  # a copy; keeps 0-d scalars 0-d (unlike ascontiguousarray)

    def linear(self, path: str, key: str, bias: bool = True) -> None:
        self.put(f"{path}/kernel", self.take(f"{key}.weight").T)
        if bias:
            self.put(f"{path}/bias", self.take(f"{key}.bias"))

    def norm(self, path: str, key: str) -> None:
        self.put(f"{path}/scale", self.take(f"{key}.weight"))
        self.put(f"{path}/bias", self.take(f"{key}.bias"))

    def attention(self, path: str, q: tuple, k: tuple, v: tuple, out: str, heads: int) -> None:
        """q, k, v: (weight [D, D], bias [D]) in torch layout; out: the output projection's key prefix."""
        width = q[0].shape[1]
        head_dim = width // heads
        for name, (w, b) in (("query", q), ("key", k), ("value", v)):
            self.put(f"{path}/{name}/kernel", w.T.reshape(width, heads, head_dim))
            self.put(f"{path}/{name}/bias", b.reshape(heads, head_dim))
        self.put(f"{path}/out/kernel", self.take(f"{out}.weight").T.reshape(heads, head_dim, -1))
        self.put(f"{path}/out/bias", self.take(f"{out}.bias"))

    def check_all_used(self, ignore: str = r"$^") -> None:
        unused = sorted(k for k in self.state if k not in self.used and not re.fullmatch(ignore, k))
        if unused:
            raise ConversionError(f"{len(unused)} checkpoint tensors have no place in the model: {unused[:5]}")


def merge_strict(params: dict, loaded: dict, where: str = "") -> dict:
    """`params` with every leaf replaced by the one at the same path in `loaded`.

    Both trees must have exactly the same paths and shapes: a weight missing from the checkpoint, one the model
    has no place for, or a shape mismatch is a ValueError naming the paths (no silent partial loads).
    """
    have, new = flatten(params), flatten(loaded)
    show = lambda paths: ", ".join(sorted(paths)[:5])
    if missing := have.keys() - new.keys():
        raise ValueError(f"{where}: the checkpoint has no value for {len(missing)} parameters: {show(missing)}")
    if extra := new.keys() - have.keys():
        raise ValueError(f"{where}: the model has no place for {len(extra)} checkpoint tensors: {show(extra)}")
    for path, value in new.items():
        if tuple(np.shape(value)) != tuple(np.shape(have[path])):
            raise ValueError(
                f"{where}: {path} has shape {np.shape(value)} in the checkpoint, {np.shape(have[path])} in the model"
            )
    return unflatten({path: np.asarray(value, getattr(have[path], "dtype", np.float32)) for path, value in new.items()})
