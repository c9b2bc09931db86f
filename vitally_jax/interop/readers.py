"""Reading and writing PyTorch-style state dicts as numpy arrays, and checking them against a model.

A state dict here is `dict[str, np.ndarray]` keyed exactly like the PyTorch module (`blocks.0.attn.qkv.weight`),
arrays in PyTorch layout (Linear weights (out, in), Conv weights (out, in, kh, kw)).

- `.safetensors`: read with the `safetensors` package into numpy; no torch needed. bfloat16 tensors are read
  through the package's JAX backend and widened to float32.
- `.pth` / `.pt` / `.bin` / `.ckpt`: a pickled PyTorch checkpoint; read with `torch.load(weights_only=True)` when
  torch is importable, otherwise a `WeightsError` says to install torch or convert to safetensors.
- `.npz`: numpy archives (what the golden files use).

`check_state_dict` compares a state dict with the keys and shapes a model expects and raises ONE `WeightsError`
line naming the missing, unexpected and wrongly shaped keys (long lists truncated with a count).
"""

from __future__ import annotations

import json
import os
import pathlib
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


def format_keys(keys: Iterable[str], limit: int = _SHOWN) -> str:
    """`a, b, c` or `a, b, c ... (+12 more)`: a key list short enough for one error line."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    if len(keys) > limit:
        shown += f" ... (+{len(keys) - limit} more)"
    return shown


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
        raise WeightsError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    return out


def _torch_to_numpy(obj, path: pathlib.Path, prefix: str = "") -> StateDict:
    import torch

    out: StateDict = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16
                t = t.float()
            out[name] = t.numpy().copy()
        elif isinstance(value, Mapping):
            out.update(_torch_to_numpy(value, path, prefix=f"{name}."))
        # other entries (epoch counters, hyper-parameters) are not weights
    return out


def _read_torch(path: pathlib.Path) -> StateDict:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path}: reading a PyTorch checkpoint needs torch; install torch, or convert the file to "
            ".safetensors (safetensors.torch.save_file(torch.load(f), 'model.safetensors')) and read that"
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many exception types for corrupt or unsafe pickles
        why = " ".join(str(e).split())[:160]
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint with torch.load(weights_only=True) "
            f"({type(e).__name__}: {why}); if you trust the file, convert it to .safetensors"
        ) from None
    while isinstance(obj, Mapping):
        inner = [k for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)]
        if not inner or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = obj[inner[0]]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return _torch_to_numpy(obj, path)


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a weight file into `{key: np.ndarray}` (PyTorch layout, keys as saved).

    A leading `module.` (DistributedDataParallel) on every key is removed.
    Raises `WeightsError` for a missing or unreadable file or an unknown suffix.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable .npz archive ({e})") from None
    else:
        raise WeightsError(
            f"{path}: unknown weight file type {suffix!r}; expected one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES + ('.npz',))}"
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
