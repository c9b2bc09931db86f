"""Reading and writing PyTorch-style state dicts as numpy arrays, and checking them against a model.

A state dict here is `dict[str, np.ndarray]` keyed exactly like the PyTorch module (`blocks.0.attn.qkv.weight`),
arrays in PyTorch layout (Linear weights (out, in), Conv weights (out, in, kh, kw)).

`read_state_dict` tells the format by the file's content, never by its name (OpenPhenom's `save_pretrained`
writes a `torch.save` file named `model.safetensors`):

- safetensors (an 8-byte header length, then a JSON header): read with the `safetensors` package into numpy.
- a PyTorch zip archive (`torch.save`, torch >= 1.6: `<name>/data.pkl` + one record per storage) or a legacy
  PyTorch file (`_use_new_zipfile_serialization=False`: a sequence of pickles, then the raw storages): read
  WITHOUT torch and without executing pickled code. The unpickler resolves only the globals a state dict needs
  (`torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` / `_rebuild_parameter[_with_state]`,
  `torch._tensor._rebuild_from_type_v2` around those, the `torch.*Storage` classes, `torch.nn.Parameter`,
  `collections.OrderedDict`), each mapped to a numpy stand-in written here; any other global (`os.system`,
  `builtins.eval`, ...) refuses the whole file with one `WeightsError` line before anything is called.
  Storages become numpy buffers; tensor views are checked against their storage's bounds.
- a numpy `.npz` archive (what the golden files use).

bfloat16 tensors (numpy has none) are widened to float32, exactly. A checkpoint that wraps its state dict
(`{"state_dict": ...}`, `{"model": ...}`) is unwrapped; non-tensor entries (epoch counters) are skipped.

`check_state_dict` compares a state dict with the keys and shapes a model expects and raises ONE `WeightsError`
line naming the missing, unexpected and wrongly shaped keys (long lists truncated with a count).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import json
import os
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

from vitally_jax.errors import WeightsError
from vitally_jax.fileio import TAG, atomic_path, check_output

StateDict = dict[str, np.ndarray]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# containers that training frameworks wrap a state dict in (Lightning: "state_dict"; many repos: "model")
_CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict")
_SHOWN = 6  # keys named in one error line before the list is truncated
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors package's own limit on the JSON header


def format_keys(keys: Iterable[str], limit: int = _SHOWN) -> str:
    """`a, b, c` or `a, b, c ... (+12 more)`: a key list short enough for one error line."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    if len(keys) > limit:
        shown += f" ... (+{len(keys) - limit} more)"
    return shown


def _one_line(e: BaseException, limit: int = 200) -> str:
    return " ".join(str(e).split())[:limit]


def _read_safetensors(path: pathlib.Path) -> StateDict:
    from safetensors import SafetensorError, safe_open

    out: StateDict = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
                    out[key] = None  # numpy cannot hold these: read through the JAX backend below
                else:
                    out[key] = f.get_tensor(key)
        wide = [k for k, v in out.items() if v is None]
        if wide:
            with safe_open(str(path), framework="flax") as f:
                for key in wide:
                    out[key] = np.asarray(f.get_tensor(key).astype("float32"))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
    return out


# ------------------------------------------------------------------------------------------------------------------
# PyTorch files without torch: a restricted unpickler
# ------------------------------------------------------------------------------------------------------------------

# torch storage class name -> numpy dtype of its elements (bfloat16 is read as its uint16 bit pattern)
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy torch.save file
_LEGACY_PROTOCOL = 1001


class _Refused(Exception):
    """A pickle asked for something a state dict never needs; the message says what."""


class _StorageType:
    """Stand-in for a `torch.*Storage` class: names the element dtype; neither callable nor constructible."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])
        self.bfloat16 = name == "BFloat16Storage"


class _Storage:
    """One storage's elements as a flat numpy array (filled from the archive record or the legacy data block)."""

    def __init__(self, kind: _StorageType, numel: int):
        self.kind, self.numel = kind, numel
        self.data: np.ndarray | None = None


class _TensorType:
    """Stand-in for `torch.Tensor` / `torch.nn.Parameter` (only as the type argument of `_rebuild_from_type_v2`)."""


def _as_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Refused(f"tensor {what} is {type(v).__name__}, expected an int")
    return v


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """numpy version of `torch._utils._rebuild_tensor[_v2]`: a strided view of the storage, copied out."""
    if not isinstance(storage, _Storage):
        raise _Refused(f"tensor storage is {type(storage).__name__}, expected a storage record")
    offset = _as_int(storage_offset, "offset")
    if not isinstance(size, tuple | list) or not isinstance(stride, tuple | list) or len(size) != len(stride):
        raise _Refused("tensor size/stride are not two tuples of the same length")
    shape = tuple(_as_int(s, "size") for s in size)
    steps = tuple(_as_int(s, "stride") for s in stride)
    if offset < 0 or any(s < 0 for s in shape) or any(s < 0 for s in steps):
        raise _Refused(f"tensor with a negative offset, size or stride ({offset}, {shape}, {steps})")
    return _TensorRef(storage, offset, shape, steps)


class _TensorRef:
    """A tensor whose storage bytes may not be read yet (legacy files store the data after the pickle)."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def to_numpy(self) -> np.ndarray:
        st = self.storage
        n = int(np.prod(self.shape, dtype=np.int64))
        last = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride, strict=True)) if n else 0
        if st.data is None or (n and last >= st.data.size):
            size = "missing" if st.data is None else f"{st.data.size} elements"
            raise _Refused(f"a tensor {self.shape} at offset {self.offset} reaches past its storage ({size})")
        base = st.data[self.offset :]
        item = base.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(base, self.shape, tuple(s * item for s in self.stride), writeable=False)
        arr = np.array(arr, copy=True)
        if st.kind.bfloat16:  # bfloat16 = the high half of a float32: widening is exact
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise _Refused(f"parameter data is {type(data).__name__}, expected a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_parameter) or new_type is not _TensorType or not isinstance(args, tuple):
        raise _Refused("_rebuild_from_type_v2 around something other than a plain tensor rebuild")
    return func(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS` (to the numpy stand-ins above); storages come from `storages`."""

    def __init__(self, file, storages: dict[str, _Storage] | None = None):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str):
        # pickle protocol <= 2 writes Python 2 names (__builtin__, commands); show and match the Python 3 ones
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(
                f"the pickle names the global {module}.{name}, which a state dict never needs; refused "
                "without running anything (only tensor-rebuild globals are allowed)"
            ) from None

    def persistent_load(self, pid):
        if self.storages is None:
            raise _Refused("a storage reference where none is expected")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _Refused(f"unknown persistent id {str(pid)[:60]!r}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(kind, _StorageType) or not isinstance(key, str):
            raise _Refused(f"malformed storage reference {str(pid)[:60]!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise _Refused("storage views (torch < 0.4 files) are not supported")
        numel = _as_int(numel, "storage size")
        st = self.storages.get(key)
        if st is None:
            st = self.storages[key] = _Storage(kind, numel)
        elif st.kind.dtype != kind.dtype:
            raise _Refused(f"storage {key} is used with two dtypes ({st.kind.name}, {kind.name})")
        return st


def _unpickle(data, storages: dict[str, _Storage] | None):
    f = data if hasattr(data, "read") else io.BytesIO(data)
    return _RestrictedUnpickler(f, storages).load()


def _load_torch_zip(zf: zipfile.ZipFile) -> object:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise _Refused(f"a zip archive without exactly one <name>/data.pkl ({len(pkl)} found)")
    root = pkl[0][: -len("data.pkl")]
    order = "<"
    if root + "byteorder" in names:
        order = {b"little": "<", b"big": ">"}.get(zf.read(root + "byteorder").strip(), "?")
        if order == "?":
            raise _Refused("unknown byteorder record")
    storages: dict[str, _Storage] = {}
    obj = _unpickle(zf.read(pkl[0]), storages)
    for key, st in storages.items():
        name = f"{root}data/{key}"
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise _Refused(f"storage record {name} is missing") from None
        nbytes = st.numel * st.kind.dtype.itemsize
        if info.file_size != nbytes:
            raise _Refused(f"storage record {name} holds {info.file_size} bytes, expected {nbytes}")
        st.data = np.frombuffer(zf.read(name), st.kind.dtype.newbyteorder(order)).astype(st.kind.dtype)
    return obj


def _load_torch_legacy(f) -> object:
    if _unpickle(f, None) != _LEGACY_MAGIC:
        raise _Refused("a pickle, but not a PyTorch file (no torch.save magic number)")
    if _unpickle(f, None) != _LEGACY_PROTOCOL:
        raise _Refused("unknown legacy PyTorch protocol version")
    info = _unpickle(f, None)
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise _Refused("big-endian legacy PyTorch files are not supported")
    storages: dict[str, _Storage] = {}
    obj = _unpickle(f, storages)
    keys = _unpickle(f, None)
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise _Refused("the storage list after the pickle does not match the tensors")
    for key in keys:
        st = storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise _Refused(f"storage {key}: file ends early")
        (numel,) = struct.unpack("<q", head)
        if numel != st.numel:
            raise _Refused(f"storage {key}: {numel} elements, expected {st.numel}")
        nbytes = numel * st.kind.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise _Refused(f"storage {key}: file ends early ({len(raw)} of {nbytes} bytes)")
        st.data = np.frombuffer(raw, st.kind.dtype.newbyteorder("<")).astype(st.kind.dtype)
    return obj


def _materialise(obj, prefix: str = "") -> StateDict:
    out: StateDict = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, _TensorRef):
            out[name] = value.to_numpy()
        elif isinstance(value, Mapping):
            out.update(_materialise(value, prefix=f"{name}."))
        # other entries (epoch counters, hyper-parameters) are not weights
    return out


def _read_torch(path: pathlib.Path, kind: str) -> StateDict:
    """kind: 'zip' (torch.save, torch >= 1.6) or 'legacy' (a pickle stream followed by the raw storages)."""
    what = "PyTorch zip archive" if kind == "zip" else "legacy PyTorch file"
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                obj = _load_torch_zip(zf)
        else:
            with open(path, "rb") as f:
                obj = _load_torch_legacy(f)
        while isinstance(obj, Mapping):
            inner = [k for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)]
            if not inner or any(isinstance(v, _TensorRef) for v in obj.values()):
                break
            obj = obj[inner[0]]
        if not isinstance(obj, Mapping):
            raise WeightsError(
                f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
            )
        return _materialise(obj)
    except _Refused as e:
        raise WeightsError(f"{path}: {what}: {e}") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, ValueError, AttributeError) as e:
        # a damaged pickle; TypeError/AttributeError: an allowed global used in a way a state dict never does
        raise WeightsError(f"{path}: not a readable {what} ({type(e).__name__}: {_one_line(e, 160)})") from None
    except (KeyError, IndexError, RecursionError, MemoryError, struct.error, OSError) as e:
        raise WeightsError(f"{path}: not a readable {what} ({type(e).__name__}: {_one_line(e, 160)})") from None


def _read_npz(path: pathlib.Path) -> StateDict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: not a readable .npz archive ({_one_line(e)})") from None


def weight_file_format(path: str | os.PathLike) -> str | None:
    """The format of a weight file judged by its content: 'safetensors', 'torch-zip', 'torch-legacy', 'npz', or
    None when the first bytes match none of them. The file name plays no part."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive: torch.save or np.savez
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(n.endswith("data.pkl") and n.count("/") == 1 for n in names):
            return "torch-zip"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return None
    if len(head) >= 10 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= _MAX_SAFETENSORS_HEADER:
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode: legacy torch.save
        return "torch-legacy"
    return None


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a weight file into `{key: np.ndarray}` (PyTorch layout, keys as saved).

    The format is told by the content (safetensors, PyTorch zip or legacy file, numpy .npz), not the name;
    PyTorch files are read without torch and without running pickled code. A leading `module.`
    (DistributedDataParallel) on every key is removed.
    Raises `WeightsError` for a missing or unreadable file, an unknown format, or a pickle that names any global
    other than the tensor-rebuild ones.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    try:
        fmt = weight_file_format(path)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the weight file ({_one_line(e)})") from None
    suffix = path.suffix.lower()
    if fmt == "safetensors" or (fmt is None and suffix in SAFETENSORS_SUFFIXES):
        state = _read_safetensors(path)  # an unrecognised .safetensors file: the package says what is wrong
    elif fmt in ("torch-zip", "torch-legacy"):
        state = _read_torch(path, "zip" if fmt == "torch-zip" else "legacy")
    elif fmt == "npz":
        state = _read_npz(path)
    elif suffix in TORCH_SUFFIXES:
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint (neither a torch.save zip archive nor a legacy torch pickle)"
        )
    else:
        raise WeightsError(
            f"{path}: unknown weight file type {suffix!r}: the content is not safetensors, a PyTorch zip archive, "
            "a legacy PyTorch file or a numpy .npz archive"
        )
    if not state:
        raise WeightsError(f"{path}: the file holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


SAFETENSORS_KIND = "safetensors weights"


def write_safetensors(
    path: str | os.PathLike,
    state: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    inputs=(),
) -> pathlib.Path:
    """Write `state` as a safetensors file atomically (temporary name, then rename); returns the path.

    `metadata` values must be strings (safetensors stores a str -> str header); dicts are JSON-encoded.
    An existing file is replaced only with `overwrite=True`, and only if this package wrote it (header tag).
    """
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    check_output(path, SAFETENSORS_KIND, overwrite=overwrite, inputs=inputs)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta[TAG] = SAFETENSORS_KIND
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta or None)
    return path


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The str -> str metadata header of a safetensors file (empty dict if none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def select_prefix(state: Mapping[str, np.ndarray], prefix: str) -> StateDict:
    """The entries whose key starts with `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(state: Mapping[str, np.ndarray], prefix: str) -> StateDict:
    """Every key with `prefix` put in front."""
    return {f"{prefix}{k}": v for k, v in state.items()}


def check_state_dict(
    state: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    allow_extra: Iterable[str] = (),
) -> None:
    """Raise one `WeightsError` line if `state` does not have exactly the `expected` keys and shapes.

    state: {key: array}; expected: {key: shape}; source: the file or layout named in the message;
    allow_extra: keys that may be present without being expected (ignored buffers such as `mask_token`).
    """
    allowed = set(allow_extra)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected and k not in allowed]
    wrong = [
        f"{k} {tuple(np.shape(state[k]))} != {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(np.shape(state[k])) != tuple(expected[k])
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {format_keys(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected key(s): {format_keys(extra)}")
    if wrong:
        parts.append(f"{len(wrong)} wrongly shaped key(s) (got != expected): {format_keys(wrong)}")
    if parts:
        raise WeightsError(f"{source}: state dict does not match the model: " + "; ".join(parts))


EXPORT_FORMAT = "vitally_jax.interop/1"


def export_metadata(kind: str, **fields) -> dict[str, str]:
    """The safetensors metadata of a file written by `export_*`: format, kind, library versions and `fields`."""
    from vitally_jax.checkpoint import versions

    doc = {"format": EXPORT_FORMAT, "kind": kind, "versions": versions()}
    doc.update(fields)
    return {"vitally_jax": json.dumps(doc, sort_keys=True)}
