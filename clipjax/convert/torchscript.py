"""Read the tensors of a TorchScript archive (OpenAI's CLIP `.pt` files) without executing it.

`torch.jit.load` would compile and run the archive's code. Here the archive's
`data.pkl` is read by a restricted unpickler that knows only tensor
reconstruction and a few containers; every module object becomes a plain
attribute dict, and tensors are rebuilt from the raw storages in the zip.
Any other global in the pickle is refused.
"""

from __future__ import annotations

import pickle
import zipfile

import numpy as np

from clipjax.convert.errors import ConversionError

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_, "BFloat16Storage": "bfloat16",
}


class _Module:
    """Stand-in for a scripted module: keeps its attribute dict."""

    def __new__(cls, *args):
        obj = super().__new__(cls)
        obj.attrs = {}
        return obj

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.attrs.update(state)
        elif isinstance(state, tuple) and state and isinstance(state[0], dict):
            self.attrs.update(state[0])


def _module_class(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (_Module,), {"qualname": name})


def _rebuild_tensor(storage, offset, size, stride, *rest):
    data, dtype = storage
    itemsize = data.itemsize
    if not size:
        return data[offset:offset + 1].reshape(()).copy()
    base = data[offset:]
    need = 1 + sum((s - 1) * st for s, st in zip(size, stride))
    if need > base.size:
        raise ConversionError("TorchScript archive: a tensor points past the end of its storage (truncated file?)")
    return np.lib.stride_tricks.as_strided(base, shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, zf: zipfile.ZipFile, root: str):
        super().__init__(f)
        self.zf, self.root = zf, root
        self.cache = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name in _DTYPES:
            return name
        if module == "torch.jit._pickle" and name in ("restore_type_tag",):
            return lambda obj, tag: obj
        if module.startswith("__torch__"):
            return _module_class(f"{module}.{name}")
        raise ConversionError(f"TorchScript archive: refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage":
            raise ConversionError(f"TorchScript archive: unknown persistent id {kind!r}")
        if key in self.cache:
            return self.cache[key]
        dtype = _DTYPES.get(storage_type if isinstance(storage_type, str) else getattr(storage_type, "__name__", ""))
        if dtype is None:
            raise ConversionError(f"TorchScript archive: unsupported storage type {storage_type!r}")
        try:
            raw = self.zf.read(f"{self.root}/data/{key}")
        except KeyError:
            raise ConversionError(f"TorchScript archive: storage data/{key} is missing (truncated file?)") from None
        if dtype == "bfloat16":
            import ml_dtypes

            arr = np.frombuffer(raw, np.uint16).view(ml_dtypes.bfloat16)
        else:
            arr = np.frombuffer(raw, dtype)
        if arr.size < numel:
            raise ConversionError(f"TorchScript archive: storage data/{key} has {arr.size} of {numel} elements")
        self.cache[key] = (arr, dtype)
        return self.cache[key]


def is_torchscript(path: str) -> bool:
    """True for a zip archive with a `constants.pkl` or `code/` folder (torch.jit.save output)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def load_torchscript_state_dict(path: str) -> dict[str, np.ndarray]:
    """`{dotted key: array}` of every tensor attribute in a TorchScript archive's module tree."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ConversionError(f"{path}: not a readable TorchScript zip archive ({e})") from None
    with zf:
        data = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if not data:
            raise ConversionError(f"{path}: TorchScript archive has no data.pkl")
        root = data[0][: -len("/data.pkl")]
        try:
            with zf.open(data[0]) as f:
                obj = _Unpickler(f, zf, root).load()
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
            raise ConversionError(f"{path}: corrupt TorchScript archive ({e})") from None
    out: dict[str, np.ndarray] = {}

    def walk(o, prefix):
        for k, v in o.attrs.items():
            if isinstance(v, _Module):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, np.ndarray):
                out[f"{prefix}{k}"] = v

    if not isinstance(obj, _Module):
        raise ConversionError(f"{path}: TorchScript archive does not hold a module")
    walk(obj, "")
    return out
