"""Safe file output: never touch what the project did not write; write to a temporary name, then rename.

Two rules hold for every writer (stores, embeddings, curation indices, sweeps, benchmark reports, weight files,
encoder exports, training and demo workdirs):

1. **A user's files are theirs.** Every artefact the project writes is recognisable: a folder by its marker file
   (`store.json`, `embedding.json`, `encoder.json`, `sweep.json`, `summary.json`, `workdir.json`), each holding
   `"artefact": "<kind>"`; a single file by a tag inside it (Parquet schema metadata, a safetensors header key,
   a PNG text chunk, a JSON key, a first-line comment in Markdown / HTML, `uns` in `.h5ad`). `check_output`
   refuses (`OutputError`, exit code 10, nothing touched) an output path that
   - exists and is not an artefact of the kind about to be written (an empty folder is fine);
   - is an artefact of that kind, unless `overwrite=True` (the command lines' `--overwrite`);
   - is a folder artefact that also holds entries its kind never writes (they would be lost on replacement);
   - equals an input, lies inside one, or (when replacing) contains one.
2. **Nothing is left half-written.** `atomic_path` yields a temporary path next to the output and renames it onto
   the output when the block succeeds. A folder that replaces an existing one is swapped in with one atomic
   `renameat2(RENAME_EXCHANGE)` (Linux), so a job killed at any moment leaves either the previous artefact or
   the new one, complete and readable; where the exchange is not available, two renames are used.

Resuming (training, embedding) reopens an artefact of the same kind without `overwrite`; only replacing needs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fnmatch
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from vitally_jax.errors import OutputError, ResourceError

ARTEFACT_KEY = "artefact"  # the key that names the kind, in marker files and file tags
TAG = "vitally_jax.artefact"  # the tag key inside single files (Parquet, safetensors, PNG, h5ad)


@dataclasses.dataclass(frozen=True)
class FolderKind:
    """A folder artefact: its marker file and the top-level entries (fnmatch patterns) it may hold."""

    name: str
    marker: str
    entries: tuple[str, ...]


FOLDERS: dict[str, FolderKind] = {
    k.name: k
    for k in (
        FolderKind(
            "image store",
            "store.json",
            (
                "store.json",
                "images.zarr",
                "metadata.parquet",
                "genes.parquet",
                "compound_targets.parquet",
                "world_pairs.parquet",
                "truth.parquet",
            ),
        ),  # + synthetic ground truth
        FolderKind("embedding store", "embedding.json", ("embedding.json", "*.zarr", "metadata.parquet", "done")),
        FolderKind("encoder export", "encoder.json", ("encoder.json", "params")),
        FolderKind(
            "probe sweep",
            "sweep.json",
            ("sweep.json", "sweep.csv", "sweep.png", "embeddings", "pooling_sensitivity.parquet"),
        ),
        FolderKind("benchmark report", "summary.json", ("summary.json", "*.csv", "*.png", "report.md")),
        FolderKind("training workdir", "workdir.json", ("*",)),  # resumed, never replaced
        FolderKind("demo workdir", "workdir.json", ("*",)),  # resumed stage by stage, never replaced
    )
}


# ------------------------------------------------------------------------------------------- recognising -----
def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


# folders written before markers named their kind, recognised by what their own marker file always held
_LEGACY = {
    "image store": lambda d: {"format_version", "channel_names", "shape"} <= set(d),
    "embedding store": lambda d: {"format_version", "poolings", "blocks"} <= set(d),
    "encoder export": lambda d: d.get("kind") == "vitally_jax encoder",
    "probe sweep": lambda d: {"b_star", "rows"} <= set(d),
    "benchmark report": lambda d: set(d) == {"summary", "notes"},
}


def folder_kind(path: str | os.PathLike) -> str | None:
    """The kind of project artefact the folder `path` is (by its marker file), or None."""
    path = pathlib.Path(path)
    for marker in sorted({k.marker for k in FOLDERS.values()}):
        doc = _read_json(path / marker) if (path / marker).is_file() else None
        if not isinstance(doc, dict):
            continue
        if doc.get(ARTEFACT_KEY) in FOLDERS and FOLDERS[doc[ARTEFACT_KEY]].marker == marker:
            return doc[ARTEFACT_KEY]
        for kind, looks_like in _LEGACY.items():
            if FOLDERS[kind].marker == marker and looks_like(doc):
                return kind
    if (path / "checkpoints").is_dir() and not (path / "workdir.json").exists():
        return "training workdir"  # a workdir from before workdir.json: its checkpoints are resumed
    return None


def file_kind(path: str | os.PathLike) -> str | None:
    """The kind of project artefact the single file `path` is (by the tag inside it), or None."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(path).metadata or {}
            value = meta.get(TAG.encode())
            return value.decode() if value else None
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                return (f.metadata() or {}).get(TAG)
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return getattr(im, "text", {}).get(TAG)
        if suffix == ".json":
            doc = _read_json(path)
            return doc.get(ARTEFACT_KEY) if isinstance(doc, dict) else None
        if suffix in (".md", ".html", ".csv"):
            with open(path, encoding="utf-8") as f:
                first = f.readline()
            for opening in ("<!-- ", "# "):
                head = f"{opening}{TAG}: "
                if first.startswith(head):
                    return first[len(head) :].split(" -->")[0].strip()
            return None
        if suffix == ".h5ad":
            import h5py

            with h5py.File(path, "r") as f:
                node = f.get("uns/vitally_jax/artefact")
                if node is None:
                    return None
                value = node[()]
                return value.decode() if isinstance(value, bytes) else str(value)
    except Exception:  # noqa: BLE001 - an unreadable file is simply not one of ours
        return None
    return None


def text_tag(kind: str, *, comment: str = "html") -> str:
    """The first line that marks a Markdown/HTML (`comment='html'`) or CSV (`'hash'`) file as a `kind` artefact."""
    return f"<!-- {TAG}: {kind} -->\n" if comment == "html" else f"# {TAG}: {kind}\n"


# ------------------------------------------------------------------------------------------- checking --------
def _inside(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Whether `a` equals `b` or lies below it (both resolved)."""
    return a == b or b in a.parents


def _resolved(p: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(os.path.realpath(os.fspath(p)))


def check_output(
    path: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    resume: bool = False,
) -> bool:
    """Refuse an output path that is not ours to write (see the module docstring); True if it exists already.

    `kind`: a folder kind in `FOLDERS`, or any name for a single file. `resume=True`: an existing artefact of the
    same kind is reopened, not replaced (training, embedding), so it needs no `overwrite`.
    Raises `OutputError` (exit code 10) with one line naming the path.
    """
    raw = pathlib.Path(path)
    out = _resolved(raw)
    is_folder = kind in FOLDERS
    exists = raw.exists() or raw.is_symlink()
    inputs = [(inp, _resolved(inp)) for inp in inputs if inp is not None and str(inp) != ""]
    for inp, src in inputs:
        if _inside(out, src):
            where = "is" if out == src else "lies inside"
            raise OutputError(f"{raw}: the output {where} the input {inp}; choose an output path outside the inputs")
    for inp, src in inputs:
        if exists and not resume and _inside(src, out):
            raise OutputError(f"{raw}: the output contains the input {inp}; replacing it would delete the input")
    if not exists:
        return False
    if is_folder:
        if not raw.is_dir():
            raise OutputError(f"{raw}: exists and is not a folder; expected a new path or a {kind} folder")
        entries = sorted(os.listdir(raw))
        if not entries:
            return False  # an empty folder: nothing to lose
        found = folder_kind(raw)
        if found != kind:
            what = f"a {found}" if found else f"not a {kind} written by vitally_jax (no {FOLDERS[kind].marker})"
            raise OutputError(f"{raw}: exists and is {what}; refusing to touch it (choose a new output path)")
        if resume:
            return True
        if not overwrite:
            raise OutputError(f"{raw}: a {kind} is already here; pass --overwrite to replace it")
        foreign = [e for e in entries if not any(fnmatch.fnmatch(e, p) for p in FOLDERS[kind].entries)]
        if foreign:
            raise OutputError(
                f"{raw}: the {kind} also holds {foreign[:5]} that vitally_jax did not write; "
                "move them away before replacing it"
            )
        return True
    if raw.is_dir():
        raise OutputError(f"{raw}: is a folder; expected a file path for the {kind}")
    found = file_kind(raw)
    if found != kind:
        what = f"a {found}" if found else f"not a {kind} written by vitally_jax"
        raise OutputError(f"{raw}: exists and is {what}; refusing to overwrite it (choose a new output path)")
    if not overwrite and not resume:
        raise OutputError(f"{raw}: a {kind} is already here; pass --overwrite to replace it")
    return True


def check_outputs(paths: Iterable[str | os.PathLike], kind: str, **kwargs) -> None:
    """`check_output` for each of several files written together (e.g. an index and its sidecars)."""
    for p in paths:
        check_output(p, kind, **kwargs)


def write_marker(folder: str | os.PathLike, kind: str, **fields: Any) -> pathlib.Path:
    """Write the marker file of a folder artefact of `kind` (atomically); returns its path."""
    path = pathlib.Path(folder) / FOLDERS[kind].marker
    write_text(path, json.dumps({ARTEFACT_KEY: kind, **fields}, indent=1, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------------------- writing ---------
def _wrap_oserror(path: pathlib.Path, e: OSError) -> ResourceError:
    if e.errno == errno.ENOSPC:
        return ResourceError(f"{path}: no space left on device while writing")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ResourceError(f"{path}: not writable ({os.strerror(e.errno)})")
    return ResourceError(f"{path}: write failed ({e.strerror or e})")


def _is_no_space(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "No space left on device" in text


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap the two paths (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Put the finished folder `tmp` at `path`, replacing an existing one without a moment where neither exists."""
    if not path.exists():
        os.replace(tmp, path)
    elif path.is_dir() and not any(path.iterdir()):
        os.replace(tmp, path)  # rename(2) replaces an empty folder atomically
    elif _exchange(tmp, path):
        shutil.rmtree(tmp)  # `tmp` now holds the previous artefact
    else:
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)) / "old"
        os.replace(path, old)  # a fresh name of our own: nothing of anyone else's is in the way
        os.replace(tmp, path)
        shutil.rmtree(old.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    On any exception the temporary file/folder is removed and `path` is untouched. Callers check the output
    first (`check_output`): this function replaces what is at `path` and does not judge whose it is.
    """
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _wrap_oserror(path, e) from None
    tmp = pathlib.Path(tmp_dir) / path.name
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if is_dir:
            swap_in(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:
        raise _wrap_oserror(path, e) from None
    except ValueError as e:  # TensorStore reports file-system failures as ValueError with the OS error inside
        if _is_no_space(e):
            raise ResourceError(f"{path}: no space left on device while writing") from None
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_parquet(path: str | os.PathLike, df, kind: str | None = None) -> pathlib.Path:
    """Write a DataFrame as Parquet (no index), atomically; `kind` tags the file as that artefact."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if kind is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), TAG.encode(): kind.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return pathlib.Path(path)


def write_npy(path: str | os.PathLike, x) -> pathlib.Path:
    """Write one array as .npy, atomically."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(x))
    return pathlib.Path(path)
