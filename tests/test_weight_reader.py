"""The weight reader tells formats by content and reads PyTorch files without torch and without running pickles.

`tests/goldens/torch_*_state_dict.pt` were written by real `torch.save` (tools/goldens/make_goldens_torch_files.py):
the zip format (what OpenPhenom's `save_pretrained` writes, under the name `model.safetensors`) and the legacy
pickle format; `torch_state_dict_expected.npz` holds the same tensors as torch converted them to numpy.
"""

from __future__ import annotations

import builtins
import io
import os
import pathlib
import pickle
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from vitally_jax.errors import WeightsError
from vitally_jax.interop import readers

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens"
TORCH_FILES = {"zip": "torch_zip_state_dict.pt", "legacy": "torch_legacy_state_dict.pt"}


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(GOLDENS / "torch_state_dict_expected.npz") as z:
        return {k: z[k] for k in z.files if not k.startswith("meta/")}


def _error(path) -> str:
    with pytest.raises(WeightsError) as e:
        readers.read_state_dict(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize("fmt", sorted(TORCH_FILES))
@pytest.mark.parametrize("name", ["model.safetensors", "weights.pth", "checkpoint"])
def test_torch_save_file_loads_under_any_name(tmp_path, expected, fmt, name):
    path = tmp_path / name
    shutil.copy(GOLDENS / TORCH_FILES[fmt], path)
    assert readers.weight_file_format(path) == f"torch-{fmt}"
    sd = readers.read_state_dict(path)
    assert sorted(sd) == sorted(expected)  # {"state_dict": ...} unwrapped; the epoch counter is not a weight
    for k, want in expected.items():
        assert sd[k].dtype == want.dtype and sd[k].shape == want.shape, k
        np.testing.assert_array_equal(sd[k], want, err_msg=k)  # copies of the stored bits: exact
    # views of one storage come out as the values torch shows, not the storage order
    np.testing.assert_array_equal(sd["decoder.base_t"], sd["decoder.base"].T)
    np.testing.assert_array_equal(sd["decoder.rows"], sd["decoder.base"][1:3])
    assert sd["encoder.norm.weight"].dtype == np.float32  # bfloat16 widened
    assert sd["decoder.flags"].dtype == np.bool_ and sd["decoder.counts"].dtype == np.int64


def test_reader_never_imports_torch(tmp_path, monkeypatch, expected):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` would raise ImportError
    shutil.copy(GOLDENS / TORCH_FILES["zip"], tmp_path / "model.safetensors")
    assert sorted(readers.read_state_dict(tmp_path / "model.safetensors")) == sorted(expected)


def test_safetensors_and_npz_are_told_by_content(tmp_path):
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_file(a, str(tmp_path / "weights.pth"))  # safetensors bytes under a torch name
    assert readers.weight_file_format(tmp_path / "weights.pth") == "safetensors"
    np.testing.assert_array_equal(readers.read_state_dict(tmp_path / "weights.pth")["w"], a["w"])
    with open(tmp_path / "arrays.bin", "wb") as f:
        np.savez(f, **a)
    assert readers.weight_file_format(tmp_path / "arrays.bin") == "npz"
    np.testing.assert_array_equal(readers.read_state_dict(tmp_path / "arrays.bin")["w"], a["w"])
    (tmp_path / "text.safetensors").write_text("hello")
    assert readers.weight_file_format(tmp_path / "text.safetensors") is None
    assert "not a readable safetensors file" in _error(tmp_path / "text.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 32)
    assert "not a readable PyTorch checkpoint" in _error(tmp_path / "junk.pt")


class _Payload:
    """Pickles as a call of `fn(*args)`: what a malicious checkpoint does on `pickle.load`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: pathlib.Path) -> dict[str, object]:
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
    }


def _as_legacy(obj) -> bytes:
    """A legacy torch.save stream (magic, protocol, sys info, object, storage keys) carrying `obj`."""
    f = io.BytesIO()
    for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {"state_dict": obj}, []):
        pickle.dump(part, f, protocol=2)
    return f.getvalue()


def _as_zip(obj) -> bytes:
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"state_dict": obj}, protocol=2))
        zf.writestr("archive/byteorder", "little")
    return f.getvalue()


def test_payloads_are_live(tmp_path):
    """The control: plain pickle.loads of a payload does run it (so the refusals below prove something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_payloads(marker)["builtins.eval"]))
    assert marker.exists()


@pytest.mark.parametrize("wrap", ["legacy", "zip"])
@pytest.mark.parametrize("global_name", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen"])
def test_pickle_naming_another_global_is_refused_and_nothing_runs(tmp_path, wrap, global_name):
    marker = tmp_path / "ran"
    payload = _payloads(marker)[global_name]
    data = (_as_legacy if wrap == "legacy" else _as_zip)({"w": payload})
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    msg = _error(path)
    module, name = global_name.split(".")
    shown = {"os": ("posix", "nt")}.get(module, (module,))  # os.system pickles as posix.system
    assert any(f"names the global {m}.{name}," in msg for m in shown) and "refused" in msg, msg
    assert not marker.exists()


def test_damaged_torch_files_are_one_line_errors(tmp_path):
    src = zipfile.ZipFile(GOLDENS / TORCH_FILES["zip"])
    # a storage record shorter than its tensors need
    short = tmp_path / "short.safetensors"
    with zipfile.ZipFile(short, "w") as zf:
        for info in src.infolist():
            data = src.read(info)
            zf.writestr(info.filename, data[:-4] if info.filename.endswith("/data/0") else data)
    assert "holds" in _error(short) and "expected" in _error(short)
    # a missing storage record
    missing = tmp_path / "missing.pt"
    with zipfile.ZipFile(missing, "w") as zf:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                zf.writestr(info.filename, src.read(info))
    assert "is missing" in _error(missing)
    # a legacy file cut inside its raw storages
    raw = (GOLDENS / TORCH_FILES["legacy"]).read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[:-10])
    assert "file ends early" in _error(tmp_path / "cut.pt")
    # a pickle that is not a torch file
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert "magic number" in _error(tmp_path / "plain.pt")


def test_tensor_view_past_its_storage_is_refused(tmp_path):
    """A hand-made view that would read beyond its storage: refused before any memory is touched."""
    from vitally_jax.interop.readers import _rebuild_tensor, _Refused, _Storage, _StorageType

    st = _Storage(_StorageType("FloatStorage"), 4)
    st.data = np.arange(4, dtype=np.float32)
    ok = _rebuild_tensor(st, 1, (3,), (1,))
    np.testing.assert_array_equal(ok.to_numpy(), [1, 2, 3])
    with pytest.raises(_Refused, match="reaches past its storage"):
        _rebuild_tensor(st, 1, (2, 2), (2, 1)).to_numpy()
    with pytest.raises(_Refused, match="negative"):
        _rebuild_tensor(st, 0, (2,), (-1,))
