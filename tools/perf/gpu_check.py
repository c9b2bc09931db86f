"""One-accelerator check (<= 8 min on one GPU): bf16 train-step MFU of S/16, L/8 and G/8 (reduced depth with
per-block extrapolation), every-block inference crops/s, bf16 vs float32 forward numerics, which attention
implementation ran, and the data feed rate against the step's consumption. Writes JSON and prints a table.

    python tools/perf/gpu_check.py --json=bench_out/gpu_check.json              # on a GPU host
    python tools/perf/gpu_check.py --cpu-smoke --json=/tmp/gpu_check.json       # tiny shapes on CPU (CI)

Train step: the trainer's real jitted update, compiled at two reduced encoder depths d1 < d2 (`--depths`, full
decoder), median step time of `--steps` steps each. The encoder is one scanned stack, so the step time is affine
in depth and is extrapolated to the full depth (12 / 24 / 48 blocks): t(D) = t(d1) + (D - d1) (t(d2) - t(d1)) /
(d2 - d1), as the pod plan does for memory. MFU = analytic FLOPs of the full-depth step (`vitally_jax.flops`,
remat recomputation not counted) / t(D) / peak, where peak is `--peak_tflops` (default 989: dense bf16 of an
H100 / H200; 0 = the measured bf16 matmul rate, which is reported either way).
Attention: the default per backend (`vitally_jax.models.attention`: cuDNN on GPU with an XLA fallback); the log
lines saying which implementation ran are recorded. Inference: crops/s of every block's pooled embeddings in one
pass vs the final block only (L/8). Numerics: the same encoder weights in float32 and bfloat16 on the same crops,
cosine and max relative error of the final `cls_norm` embedding. Feed: Grain crops/s from a zarr store of random
wells (`vitally_jax.data.pipeline.train_dataset`, the trainer's input) against each model's step consumption.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import time

from _shared import build_jax_step, timed


def matmul_rate(dtype: str, n: int) -> float:
    """FLOP/s of an n^3 matmul in `dtype` on the default device (best of 5)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2.0 * n**3 / min(timed(lambda: f(a).block_until_ready(), 5))


def step_time(variant: str, batch: int, crop: int, depth: int, dtype: str, attention: str | None, steps: int):
    """-> (median step s, compile s, loss, finite, mae config) of the trainer's real update at encoder `depth`."""
    t0 = time.perf_counter()
    run, state, _, mae_cfg = build_jax_step(variant, batch, crop, depth=depth, dtype=dtype, attention_impl=attention)
    state, m = run(state)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = run(state)
        times.append(time.perf_counter() - t)
    return statistics.median(times), compile_s, float(m["loss"]), bool(m["finite"]), mae_cfg


def train_mfu(
    variant: str,
    batch: int,
    crop: int,
    depths: tuple[int, int],
    dtype: str,
    attention: str | None,
    steps: int,
    peak: float,
    full_depth: int | None = None,
) -> dict:
    """Step time at two reduced depths, extrapolated per block to the full depth; MFU of the full-depth step."""
    from vitally_jax import train
    from vitally_jax.models.mae import mae_config

    (t1, c1, _, f1, cfg1), (t2, c2, loss, f2, _) = (
        step_time(variant, batch, crop, d, dtype, attention, steps) for d in depths
    )
    d1, d2 = depths
    full = full_depth or mae_config(variant).encoder.depth
    per_block = (t2 - t1) / (d2 - d1)
    step_s = t1 + (full - d1) * per_block
    full_cfg = mae_config(variant, **{**_overrides(cfg1), "depth": full})
    flops_img = train._train_flops(full_cfg)
    achieved = flops_img * batch / step_s
    return {
        "variant": variant,
        "depth": full,
        "depths_run": list(depths),
        "step_s_at_depths": [t1, t2],
        "per_block_s": per_block,
        "batch": batch,
        "crop": crop,
        "dtype": dtype,
        "compile_s": round(c1 + c2, 1),
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "flops_per_image": flops_img,
        "tflops": achieved / 1e12,
        "mfu": achieved / peak,
        "loss": loss,
        "finite": f1 and f2,
    }


def _overrides(mae_cfg) -> dict:
    from vitally_jax import aot

    return aot.mae_overrides(mae_cfg)


def feed_rate(crop: int, batch: int, batches: int, wells: int, size: int) -> dict:
    """Crops/s of the trainer's Grain input (`train_dataset`, uint8 crops with flips / rot90) from a zarr store of
    `wells` random `size` x `size` x 6 wells written to a temporary folder."""
    import numpy as np

    from vitally_jax.data.pipeline import train_dataset
    from vitally_jax.data.store import ImageStore, metadata_frame, write_store
    from vitally_jax.data.synthetic import CHANNEL_NAMES

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "store"
        images = (rng.integers(0, 256, (size, size, 6), dtype=np.uint8) for _ in range(wells))
        write_store(path, images, metadata_frame([f"w{i}" for i in range(wells)]), CHANNEL_NAMES)
        it = iter(
            train_dataset(
                ImageStore.open(path), crop=crop, global_batch=batch, seed=0, process_index=0, process_count=1
            )
        )
        next(it)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        wall = time.perf_counter() - t
    return {"crop": crop, "batch": batch, "batches": batches, "crops_per_s": batch * batches / wall}


class _Lines(logging.Handler):
    """Collects the attention-choice log lines."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg not in self.lines:
            self.lines.append(msg)


def _encoder(variant: str, crop: int, depth: int | None, dtype: str, attention: str | None):
    from flax import nnx

    from vitally_jax import sharding
    from vitally_jax.models.vit import ViTEncoder, vit_config

    over = dict(img_size=crop, in_chans=6, dtype=dtype, attention_impl=attention)
    if depth is not None:
        over["depth"] = depth
    cfg = vit_config(variant, **over)
    return sharding.create_sharded(lambda: ViTEncoder(cfg, rngs=nnx.Rngs(0))), cfg


def extraction(
    variant: str, batch: int, crop: int, depth: int | None, dtype: str, attention: str | None, steps: int
) -> dict:
    """Images/s of every-block pooled embeddings in one pass vs the final block only."""
    import jax
    import numpy as np
    from flax import nnx

    from vitally_jax.models.preprocess import self_standardize

    enc, cfg = _encoder(variant, crop, depth, dtype, attention)
    graphdef, state = nnx.split(enc)

    @jax.jit
    def every_block(st, x):
        return nnx.merge(graphdef, st)(self_standardize(x))["blocks"]

    @jax.jit
    def final_only(st, x):
        e = nnx.merge(graphdef, st)
        return e.pool(e(self_standardize(x))["tokens"])

    x = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, crop, crop, 6), dtype=np.uint8))
    out = {"variant": variant, "depth": cfg.depth, "batch": batch, "dtype": dtype}
    for name, f in (("every_block", every_block), ("final_block", final_only)):
        jax.block_until_ready(f(state, x))
        out[f"{name}_images_per_s"] = batch / statistics.median(
            timed(lambda f=f: jax.block_until_ready(f(state, x)), steps)
        )
    return out


def agreement(variant: str, batch: int, crop: int, depth: int | None, attention: str | None) -> dict:
    """Same weights, same crops: float32 vs bfloat16 final-block cls_norm embeddings."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from vitally_jax.models.preprocess import self_standardize

    enc32, cfg = _encoder(variant, crop, depth, "float32", None)
    enc16, _ = _encoder(variant, crop, depth, "bfloat16", attention)
    nnx.update(enc16, nnx.state(enc32, nnx.Param))
    x = np.random.default_rng(1).integers(0, 256, (batch, crop, crop, 6), dtype=np.uint8)

    def emb(e):
        g, s = nnx.split(e)
        return np.asarray(
            jax.jit(
                lambda st, im: nnx.merge(g, st)(self_standardize(im))["blocks"]["cls_norm"][:, -1].astype(jnp.float32)
            )(s, x)
        )

    a, b = emb(enc32), emb(enc16)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rel = np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)
    return {
        "variant": variant,
        "depth": cfg.depth,
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_rel_err": float(rel),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (seconds); checks the script works")
    p.add_argument("--json", default="bench_out/gpu_check.json")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--s16_batch", type=int, default=128)
    p.add_argument("--l8_batch", type=int, default=32)
    p.add_argument("--g8_batch", type=int, default=16)
    p.add_argument("--depths", default="2,4", help="two reduced encoder depths; step time is extrapolated per block")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak; 0 = use the measured matmul")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from vitally_jax.cli import setup_compilation_cache

    setup_compilation_cache()
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    lines = _Lines()
    logging.getLogger("vitally_jax.attention").addHandler(lines)
    logging.getLogger("vitally_jax.attention").setLevel(logging.INFO)
    attention, dtype = None, "bfloat16"  # the per-backend default: cuDNN on GPU (XLA fallback), splash on TPU
    depths = tuple(int(v) for v in args.depths.split(","))
    if args.cpu_smoke:
        runs = [("mu/8", 2, 32, None)]
        depths = (1, 2)
        ext, mm_n, steps = ("mu/8", 8, 32, None), 512, 2
        feed = dict(crop=32, batch=8, batches=4, wells=4, size=64)
    else:
        runs = [
            ("S/16", args.s16_batch, 256, None),
            ("L/8", args.l8_batch, 256, None),
            ("G/8", args.g8_batch, 256, None),
        ]
        ext, mm_n, steps = ("L/8", 64, 256, None), 8192, args.steps
        feed = dict(crop=256, batch=64, batches=8, wells=16, size=512)
    mm_bf16 = matmul_rate("bfloat16", mm_n)
    peak = mm_bf16 if (args.cpu_smoke or args.peak_tflops <= 0) else args.peak_tflops * 1e12
    result = {
        "device": str(dev.device_kind),
        "platform": dev.platform,
        "cpu_smoke": args.cpu_smoke,
        "peak_flops": peak,
        "measured_bf16_matmul_flops": mm_bf16,
        "train": [],
        "errors": [],
    }
    for variant, batch, crop, full_depth in runs:
        try:
            result["train"].append(
                train_mfu(variant, batch, crop, depths, dtype, attention, steps, peak, full_depth=full_depth)
            )
        except Exception as e:  # keep going: one OOM must not hide the other figures
            result["errors"].append(f"train {variant}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        print(f"done train {variant} at {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    try:
        result["extraction"] = extraction(ext[0], ext[1], ext[2], ext[3], dtype, attention, steps)
    except Exception as e:
        result["errors"].append(f"extraction: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    try:
        result["agreement"] = agreement(ext[0], 8 if not args.cpu_smoke else 4, ext[2], ext[3], attention)
    except Exception as e:
        result["errors"].append(f"agreement: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    try:
        result["feed"] = feed_rate(**feed)
        result["feed"]["vs_consumption"] = {
            r["variant"]: result["feed"]["crops_per_s"] / r["images_per_s"] for r in result["train"]
        }
    except Exception as e:
        result["errors"].append(f"feed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    result["attention"] = lines.lines
    result["wall_s"] = time.perf_counter() - t_start
    path = pathlib.Path(args.json)
    from vitally_jax.fileio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pathlib.Path(tmp).write_text(json.dumps(result, indent=1))
    print(
        f"device {result['device']}; peak {peak / 1e12:.1f} TFLOP/s; measured bf16 matmul {mm_bf16 / 1e12:.2f} TFLOP/s"
    )
    print(
        f"{'model':>6} {'depth':>5} {'run at':>7} {'batch':>5} {'step s':>8} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'compile s':>9}"
    )
    for r in result["train"]:
        ran = ",".join(str(d) for d in r["depths_run"])
        print(
            f"{r['variant']:>6} {r['depth']:>5} {ran:>7} {r['batch']:>5} {r['step_s']:8.3f} {r['images_per_s']:8.1f} "
            f"{r['tflops']:8.2f} {100 * r['mfu']:5.1f}% {r['compile_s']:9.1f}"
        )
    if "extraction" in result:
        e = result["extraction"]
        print(
            f"extraction {e['variant']}: every block {e['every_block_images_per_s']:.1f} img/s, final block only "
            f"{e['final_block_images_per_s']:.1f} img/s"
        )
    if "agreement" in result:
        a = result["agreement"]
        print(f"bf16 vs fp32 ({a['variant']}): min cosine {a['min_cosine']:.5f}, max rel err {a['max_rel_err']:.4f}")
    if "feed" in result:
        f = result["feed"]
        vs = ", ".join(f"{k} {v:.1f}x" for k, v in f["vs_consumption"].items())
        print(f"feed {f['crops_per_s']:.0f} crops/s ({f['crop']} px) vs the step's consumption: {vs}")
    print("attention: " + ("; ".join(result["attention"]) or "no attention log line"))
    for err in result["errors"]:
        print("error:", err)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
