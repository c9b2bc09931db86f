"""One process of the 2-process training test: 4 fake CPU devices, joined over loopback.

Usage: python tests/mh_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR STORE OUT_JSON
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main():
    pid, n, port, workdir, store, out = sys.argv[1:7]
    if os.environ.get("VITALLY_JAX_TEST_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.environ["VITALLY_JAX_TEST_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(n), process_id=int(pid))
    from vitally_jax import checkpoint as ckpt
    from vitally_jax import config_lib
    from vitally_jax.train import train_and_evaluate

    c = config_lib.load("tiny")
    c.input.store = store
    c.total_steps = 20
    c.stop_after_steps = 6
    c.log.every_steps = 2
    summary = train_and_evaluate(c, workdir)
    params = ckpt.state_to_numpy(summary["state"][0])  # gathered from both processes
    digest = {k: float(np.abs(v).sum()) for k, v in params.items()}
    if jax.process_index() == 0:
        np.savez(pathlib.Path(out).with_suffix(".npz"), **params)
    pathlib.Path(out).write_text(
        json.dumps(
            {
                "process": jax.process_index(),
                "devices": jax.device_count(),
                "local_devices": jax.local_device_count(),
                "step": summary["step"],
                "metrics": summary["metrics"],
                "digest": digest,
            }
        )
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
