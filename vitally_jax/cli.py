"""Shared command-line behaviour: one-line errors with documented exit codes, `--debug` for tracebacks."""
from __future__ import annotations

import sys
from typing import Callable

from vitally_jax.errors import VitallyError


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
