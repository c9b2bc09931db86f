"""Helpers shared by the performance scripts in this folder: timing, the trainer's step on one device, and the
long-lived PyTorch reference process (`tools/goldens/torch_reference.py`, run in the torch venv).

Scripts here import it as `import _shared` (a script's own folder is on sys.path when run as
`python tools/perf/NAME.py`).
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
TORCH_PY = os.environ.get("VITALLY_TORCH_PYTHON", "/work/goldens-venv/bin/python")
TORCH_REFERENCE = ROOT / "tools" / "goldens" / "torch_reference.py"


# ----------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------


def timed(fn, n: int) -> list[float]:
    """Wall seconds of each of `n` calls of fn()."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median_s(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `repeats` calls of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, repeats))


def matmul_rate(n: int = 2048) -> float:
    """float32 FLOP/s of one n^3 jnp.dot through XLA (best of 3)."""
    from vitally_jax.flops import measure_matmul_flops

    return measure_matmul_flops(n, repeats=3)


# ----------------------------------------------------------------------------------------------------------------
# the trainer's step on one device
# ----------------------------------------------------------------------------------------------------------------


def build_jax_step(
    variant: str,
    batch: int,
    crop: int = 256,
    *,
    depth: int | None = None,
    dtype: str = "float32",
    attention_impl: str | None = None,
    decoder_depth: int | None = None,
    seed: int = 0,
    micro_batch: int | None = None,
    remat: str = "auto",
):
    """-> (step(state) -> state, state, flops per image, mae_cfg): the trainer's jitted update on one device.
    `micro_batch`: `input.micro_batch` (None: the trainer's automatic choice); `step.micro_batch` tells which ran.
    `remat`: `model.remat` ("auto": the trainer's per-backend choice)."""
    from vitally_jax import aot, train
    from vitally_jax.models.mae import mae_config

    config = aot.load_config("vitl8")
    config.model.variant = variant
    config.model.dtype = dtype
    config.model.drop_path_rate = 0.0
    config.model.attention_impl = attention_impl
    config.input.crop = crop
    config.input.global_batch = batch
    config.input.micro_batch = micro_batch
    config.model.remat = remat
    mae_cfg = train.model_config(config)
    over = {}
    if depth is not None:
        over["depth"] = depth
    if decoder_depth is not None:
        over["decoder_depth"] = decoder_depth
    if over:
        mae_cfg = mae_config(variant, **{**aot.mae_overrides(mae_cfg), **over})
    run, state = one_device_step(config, mae_cfg, seed)
    return run, state, train._train_flops(mae_cfg), mae_cfg


def one_device_step(config, mae_cfg, seed: int = 0):
    """-> (run(state) -> (state, metrics), initial state): the trainer's jitted update of `config` / `mae_cfg` on
    one device, fed one fixed random uint8 batch of the config's crop and global batch. `run.trace(state)` returns
    the step's jaxpr."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from vitally_jax import sharding, train

    batch, crop = config.input.global_batch, config.input.crop
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graphdef, abs_state, state_sh, schedules, create = train.build_abstract(config, mae_cfg, mesh)
    micro = train.train_micro_batch(config, mae_cfg, mesh)
    step = train.jit_train_step(
        train.make_train_step(graphdef, mae_cfg, schedules, use_drop_path=False, micro_batch=micro), state_sh, mesh
    )
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(create())[1], out_shardings=state_sh)()
        key = jax.device_put(jax.random.key(seed), NamedSharding(mesh, P()))
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (batch, crop, crop, mae_cfg.encoder.in_chans), dtype=np.uint8)
        batch_arr = {"image": jax.device_put(images, sharding.batch_sharding(mesh))}

    def run(state):
        with jax.set_mesh(mesh):
            state, metrics = step(state, batch_arr, key)
        jax.block_until_ready(metrics["loss"])
        return state, metrics

    def trace(state):
        with jax.set_mesh(mesh):
            return jax.make_jaxpr(step)(state, batch_arr, key)

    run.micro_batch = micro
    run.trace = trace  # -> the step's jaxpr (forward, backward and update), for tools/perf/gemm_bound.py
    return run, state


# ----------------------------------------------------------------------------------------------------------------
# the PyTorch reference process
# ----------------------------------------------------------------------------------------------------------------


class TorchWorker:
    """The long-lived PyTorch reference process (see tools/goldens/torch_reference.py)."""

    def __init__(self, spec: dict):
        self.proc = subprocess.Popen(
            [TORCH_PY, str(TORCH_REFERENCE), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        self.info = json.loads(self.proc.stdout.readline())

    def run(self, cmd: str, n: int) -> dict:
        self.proc.stdin.write(f"{cmd} {n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"error": "worker exited"}

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()


def torch_available() -> str | None:
    """None if the venv imports torch + timm, else the reason."""
    try:
        r = subprocess.run([TORCH_PY, str(TORCH_REFERENCE)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["failed"])[-1]


def torch_kernels(spec: dict) -> tuple[dict | None, str | None]:
    """-> (PyTorch kernel timings {"1": {...}, "2": {...}}, None) or (None, why not)."""
    reason = torch_available()
    if reason is not None:
        return None, reason
    r = subprocess.run(
        [TORCH_PY, str(TORCH_REFERENCE), "--kernels", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(r.stdout.strip().splitlines()[-1]), None
