"""Shared command-line behaviour: one-line errors with documented exit codes, `--debug` for tracebacks."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from vitally_jax.errors import VitallyError

CACHE_ENV = "VITALLY_JAX_COMPILATION_CACHE"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "vitally_jax", "jax_cc")


def setup_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache, so restarts and reruns skip recompiling; -> its folder or None.

    The folder is `$VITALLY_JAX_COMPILATION_CACHE` when that is set (empty: no cache); otherwise one JAX was
    already given (`JAX_COMPILATION_CACHE_DIR`, or an earlier call) is kept, else `~/.cache/vitally_jax/jax_cc`.
    """
    import jax

    path = os.environ.get(CACHE_ENV)
    if path is None:
        path = jax.config.jax_compilation_cache_dir or DEFAULT_CACHE
    if not path:
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def run_cli(fn: Callable[[], int | None], *, debug: bool | None = None) -> int:
    """Run `fn`; turn a `VitallyError` into `error: ...` on stderr and its exit code.

    `debug` defaults to whether `--debug` is on the command line; with it, the traceback is re-raised.
    """
    if debug is None:
        debug = "--debug" in sys.argv
    try:
        rc = fn()
        return int(rc or 0)
    except VitallyError as e:
        if debug:
            raise
        msg = " ".join(str(e).split())  # always one line
        print(f"error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
