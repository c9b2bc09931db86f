"""Atomic file output: write to a temporary name in the same folder, then rename.

Nothing already written is lost or left half-written if a job dies or a write fails.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

from vitally_jax.errors import ResourceError


def _wrap_oserror(path: pathlib.Path, e: OSError) -> ResourceError:
    if e.errno == errno.ENOSPC:
        return ResourceError(f"{path}: no space left on device while writing")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ResourceError(f"{path}: not writable ({os.strerror(e.errno)})")
    return ResourceError(f"{path}: write failed ({e.strerror or e})")


def _is_no_space(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "No space left on device" in text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    On any exception the temporary file/folder is removed and `path` is untouched.
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
        if is_dir and path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
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
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
