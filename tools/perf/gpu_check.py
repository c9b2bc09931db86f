"""One-accelerator check (<= 8 min on one H200): bf16 MFU of L/8 and G/8 MAE train steps with cuDNN attention,
every-block extraction throughput, and bf16 vs float32 agreement. Writes JSON and prints a table.

    python tools/perf/gpu_check.py --json=bench_out/gpu_check.json              # on a GPU host
    python tools/perf/gpu_check.py --cpu-smoke --json=/tmp/gpu_check.json       # tiny shapes on CPU (CI)

MFU = analytic FLOPs (`vitally_jax.flops`, remat recomputation not counted) / median step time / peak, where
peak is `--peak_tflops` (default: 989 dense bf16 for H100/H200, 0 = measured) and the measured bf16 matmul rate
of this device is reported next to it. G/8 runs at reduced encoder depth (`--g8_depth`, default 12 of 48) so
that it compiles and fits one device at batch 64; its MFU is per-block representative (FLOPs are counted for
the depth that ran). Agreement: the same encoder weights run in float32 and bfloat16 on the same crops;
reported are the cosine similarity of the final `cls_norm` embeddings and the max relative error.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
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


def train_mfu(
    variant: str, batch: int, crop: int, depth: int | None, dtype: str, attention: str | None, steps: int, peak: float
) -> dict:
    """Median step time and MFU of the trainer's real update step."""
    t0 = time.perf_counter()
    run, state, flops_img, mae_cfg = build_jax_step(
        variant, batch, crop, depth=depth, dtype=dtype, attention_impl=attention
    )
    state, m = run(state)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = run(state)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    achieved = flops_img * batch / step_s
    return {
        "variant": variant,
        "depth": mae_cfg.encoder.depth,
        "batch": batch,
        "crop": crop,
        "dtype": dtype,
        "attention_impl": attention,
        "compile_s": round(compile_s, 1),
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "tflops": achieved / 1e12,
        "mfu": achieved / peak,
        "loss": float(m["loss"]),
        "finite": bool(m["finite"]),
    }


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
    p.add_argument("--l8_batch", type=int, default=32)
    p.add_argument("--g8_batch", type=int, default=16)
    p.add_argument("--g8_depth", type=int, default=12)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak; 0 = use the measured matmul")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from vitally_jax.cli import setup_compilation_cache

    setup_compilation_cache()
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    if args.cpu_smoke:
        attention, dtype = None, "bfloat16"
        runs = [("mu/8", 2, 32, 1)]
        ext, mm_n, steps = ("mu/8", 8, 32, None), 512, 2
    else:
        attention, dtype = ("cudnn" if dev.platform == "gpu" else None), "bfloat16"
        runs = [("L/8", args.l8_batch, 256, None), ("G/8", args.g8_batch, 256, args.g8_depth)]
        ext, mm_n, steps = ("L/8", 64, 256, None), 8192, args.steps
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
    for variant, batch, crop, depth in runs:
        try:
            result["train"].append(train_mfu(variant, batch, crop, depth, dtype, attention, steps, peak))
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
        f"{'model':>6} {'depth':>5} {'batch':>5} {'step s':>8} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'compile s':>9}"
    )
    for r in result["train"]:
        print(
            f"{r['variant']:>6} {r['depth']:>5} {r['batch']:>5} {r['step_s']:8.3f} {r['images_per_s']:8.1f} "
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
    for err in result["errors"]:
        print("error:", err)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
