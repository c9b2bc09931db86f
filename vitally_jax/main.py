"""Entry point: `python -m vitally_jax.main --config=configs/vitg8.py --workdir=DIR`.

Flags: `--config` (an ml_collections config file; `--config=FILE:ARG` passes ARG to `get_config`, e.g.
`runlocal`; `--config.a.b=v` overrides a declared key), `--workdir`, `--debug` (tracebacks instead of one-line
errors). Multi-host: one process per host; `jax.distributed.initialize` is called when `--coordinator_address`
(with `--num_processes`, `--process_id`) is given, or when the standard environment variables are set
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); on TPU pods and SLURM/Open MPI clusters
`--distributed` lets JAX discover them.
Dispatch on `config.job`: "train" (MAE pretraining) or "demo" (the embedded-default pipeline). Config values
are checked (`vitally_jax.config_checks`) before the workdir is created and before anything is compiled.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:ARG]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics, exports (resumes if present).")
flags.DEFINE_bool("debug", False, "Show tracebacks instead of one-line errors.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.DEFINE_bool("distributed", False, "Multi-host with cluster auto-detection (TPU pods, SLURM, Open MPI).")


def _init_distributed() -> None:
    import jax

    addr = FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        n = FLAGS.num_processes if FLAGS.num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
        pid = FLAGS.process_id if FLAGS.process_id is not None else int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def _check_writable(workdir: str) -> None:
    """Create `workdir` if needed and prove a file can be written there; `ResourceError` (exit 8) if not."""
    import tempfile

    from vitally_jax.errors import ResourceError

    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test."):
            pass
    except OSError as e:
        raise ResourceError(f"--workdir {workdir}: not writable ({e.strerror or e})") from None


def _run() -> int:
    from vitally_jax.errors import ConfigError

    try:
        config = FLAGS.config
        if config is not None:
            config.job  # noqa: B018  (forces the lazy load)
    except OSError:  # ml_collections loads the file lazily and reports a failure on first access
        raise _config_file_error(sys.argv) from None
    if config is None:
        raise ConfigError("--config: required (e.g. --config=configs/tiny.py)")
    if config.job not in ("train", "demo"):
        raise ConfigError(f"config.job: {config.job!r}; expected 'train' or 'demo'")
    workdir = FLAGS.workdir
    if not workdir and config.job == "demo":
        workdir = config.workdir  # the demo has a sensible default (./runs/demo)
    if not workdir:
        raise ConfigError("--workdir: required (output folder)")
    # Config values are checked before anything is written or compiled: numbers first (no devices needed) ...
    from vitally_jax import config_checks

    if config.job == "train":
        config_checks.check_values(config)
    else:  # the demo's trainer config and its synthetic world
        config_checks.check_values(config.train, prefix="config.train.")
        if not config.screen.store:
            config_checks.check_world(config)
    try:
        _init_distributed()
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"multi-host settings: incomplete or invalid ({e}); give coordinator address, "
            "number of processes and process id"
        ) from None
    # persistent compilation cache: restarts and resumes skip recompiling the step
    from vitally_jax.cli import setup_compilation_cache

    setup_compilation_cache()
    if config.job == "train":  # ... then the mesh over the devices, then crop vs the store's images
        from vitally_jax import sharding

        config_checks.check_mesh(config, sharding.make_mesh(tuple(config.mesh.shape)))
        config_checks.check_store(config, workdir)
    # ... and the workdir is ours or new: a user's folder, or one inside an input, is refused (exit 10)
    from vitally_jax import fileio

    if config.job == "train":
        fileio.check_output(workdir, "training workdir", resume=True, inputs=[config.input.store, config.input.index])
    else:
        fileio.check_output(workdir, "demo workdir", resume=True, inputs=[config.screen.store])
    _check_writable(workdir)
    if config.job == "train":
        from vitally_jax.train import train_and_evaluate

        summary = train_and_evaluate(config, workdir)
        logging.info("stopped at step %d (%s)", summary["step"], summary["stopped"])
        return 0
    from vitally_jax import demo

    return demo.run(config, workdir) or 0


def _config_key_message(e: Exception) -> str:
    """ml_collections' unknown-key error (a KeyError inside an AttributeError, with a did-you-mean hint) -> one line."""
    inner = e
    while isinstance(inner, BaseException) and inner.args:
        inner = inner.args[0]
    return " ".join(str(inner).split())


def _config_file_error(argv):
    from vitally_jax.errors import ConfigError

    given = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    return ConfigError(
        f"--config={given}: config file not found or not loadable (expected a Python file defining "
        "get_config, e.g. configs/tiny.py)"
    )


def parse_flags(argv: list[str]) -> list[str]:
    """Parse the command line; a bad flag, config file or config override exits with one line and code 3."""
    from vitally_jax.cli import run_cli
    from vitally_jax.errors import ConfigError

    out: dict = {}

    def parse() -> None:
        try:
            out["argv"] = FLAGS(argv)
        except flags.Error as e:
            raise ConfigError(f"command line: {' '.join(str(e).split())}") from None
        except (AttributeError, KeyError) as e:
            raise ConfigError(
                f"--config: no such config key {_config_key_message(e)}; overrides must name "
                "keys declared in the config file"
            ) from None
        except OSError:
            raise _config_file_error(argv) from None

    rc = run_cli(parse, debug="--debug" in argv)
    if rc:
        sys.exit(rc)
    return out["argv"]


def main(argv) -> None:
    """absl entry point: flags -> config -> train or demo, with one-line errors (see `run_cli`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vitally_jax.cli import run_cli

    logging.getLogger().setLevel(logging.INFO)
    if not FLAGS.debug:  # our own INFO lines stay; Orbax's and JAX's per-call INFO chatter only with --debug
        for name in ("absl", "jax"):
            logging.getLogger(name).setLevel(logging.WARNING)
    rc = run_cli(_run, debug=FLAGS.debug)
    if rc:
        # An error has been reported and every writer, checkpoint manager and store was closed by the code it
        # interrupted: leave without interpreter finalisation, which can abort while native threads (XLA,
        # TensorStore, Arrow) are still winding down on a loaded machine.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(0)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
