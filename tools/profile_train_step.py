"""Where the MAE train step spends its time on this CPU, ours and the PyTorch reference's, by ablation.

    python tools/profile_train_step.py                     # S/16, 128 px, batch 8 (the bench_all.py size)
    python tools/profile_train_step.py --variant=B/16 --crop=256 --batch=32

Each side is timed as the full step and with the MAE decoder cut from 8 blocks to 1, so the difference is the
cost of 7 decoder blocks (pre-norm, width 512, 16 heads, all tokens); ours is also timed without the Fourier loss
(its FFTs). Medians of `--steps` steps after two warm-up steps; the PyTorch side runs eagerly in the torch venv
(`VITALLY_TORCH_PYTHON`, see `tools/bench_train.py`) with 2 threads, after ours. Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_train  # noqa: E402


def _ours(variant: str, batch: int, crop: int, steps: int, **kw) -> float:
    run, state, _, _ = bench_train.build_jax_step(variant, batch, crop, **kw)
    for _ in range(2):
        state, _ = run(state)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, _ = run(state)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _torch(variant: str, batch: int, crop: int, steps: int, dec_depth: int) -> float | None:
    if bench_train.torch_available() is not None:
        return None
    w = bench_train.TorchWorker({"variant": variant, "img": crop, "batch": batch, "chans": 6, "mask_ratio": 0.75,
                                 "dec_width": 512, "dec_depth": dec_depth, "dec_heads": 16, "threads": 2})
    try:
        out = w.run("eager", steps)
    finally:
        w.close()
    return statistics.median(out["times"]) if "times" in out else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="S/16")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", default="bench_out/profile_train_step.json")
    args = p.parse_args(argv)
    import jax.numpy as jnp

    from vitally_jax.models import mae

    a = (args.variant, args.batch, args.crop, args.steps)
    r = {"ours_full": _ours(*a), "ours_decoder_1": _ours(*a, decoder_depth=1)}
    real = mae._fourier_l1
    mae._fourier_l1 = lambda pred, target, axes: 0.0 * jnp.mean(pred)  # the step without its FFTs
    try:
        r["ours_no_fourier"] = _ours(*a)
    finally:
        mae._fourier_l1 = real
    r["torch_full"], r["torch_decoder_1"] = _torch(*a, 8), _torch(*a, 1)

    def row(name, full, dec1, extra=""):
        if full is None:
            print(f"{name:<18} not available (torch venv missing)")
            return
        print(f"{name:<18} {full:8.3f} {dec1:8.3f} {full - dec1:10.3f} {(full - dec1) / 7:10.3f} {extra}")

    print(f"{args.variant}, {args.crop} px, batch {args.batch}, median of {args.steps} steps (seconds)")
    print(f"{'':<18} {'full':>8} {'dec 1':>8} {'7 dec blk':>10} {'per block':>10}")
    row("ours (JAX)", r["ours_full"], r["ours_decoder_1"],
        f"FFTs {r['ours_full'] - r['ours_no_fourier']:.3f} s")
    row("PyTorch eager", r["torch_full"], r["torch_decoder_1"])
    if r["torch_full"] is not None:
        print(f"ours / PyTorch: full step {r['torch_full'] / r['ours_full']:.2f}x, decoder blocks "
              f"{(r['torch_full'] - r['torch_decoder_1']) / (r['ours_full'] - r['ours_decoder_1']):.2f}x, "
              f"everything else {r['torch_decoder_1'] / r['ours_decoder_1']:.2f}x (> 1: ours faster)")
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "seconds": r}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
