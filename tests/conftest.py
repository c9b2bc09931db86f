"""Test setup: 8 fake CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so this happens at the very top.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from vitally_jax.cli import setup_compilation_cache  # noqa: E402

setup_compilation_cache()  # $VITALLY_JAX_COMPILATION_CACHE, else ~/.cache/vitally_jax/jax_cc
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return ROOT


@pytest.fixture(scope="session")
def shrunken_demo(tmp_path_factory):
    """The shrunken demo (configs/demo.py:ci) run once per session: (config, stage outputs, run folder)."""
    from vitally_jax import config_lib, demo

    config = config_lib.load("demo", "ci")
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    return config, demo.run_pipeline(config, run_dir), run_dir


def tool_main(name: str):
    """The `main(argv)` of the command line tools/<name>.py, run from its file as `python tools/<name>.py` would
    (no sys.path changes; tests import library code from the package only)."""
    import runpy

    return runpy.run_path(str(ROOT / "tools" / f"{name}.py"))["main"]


def wait_all(procs, timeout: float) -> list[str]:
    """Wait for subprocesses started together (stdout piped, text); kill stragglers; assert each exited 0.

    Returns their outputs."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs
