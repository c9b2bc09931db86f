"""Our MAE train step vs the PyTorch reference, measured side by side, plus the CPU MFU of our step.

    python tools/perf/bench_train.py                         # S/16, 256 px, mask 0.75, batch 32, 3 rounds
    python tools/perf/bench_train.py --variants=S/16,B/16 --rounds=2 --json=bench_out/train.json
    python tools/perf/bench_train.py --no-torch-compile      # eager PyTorch only (compile costs minutes)

The JAX step is `vitally_jax.train`'s real update (self-standardise, MAE loss, grad, Lion) jitted on one CPU
device. The PyTorch side (`tools/goldens/torch_reference.py`: timm 0.9.7 ParallelScalingBlock encoder + MAE
decoder + the same loss + Lion) runs in the torch venv as ONE long-lived subprocess, so compilation happens once and the
timed rounds interleave: JAX, torch eager, torch.compile, JAX, ... with the same thread count. Ratios are of
medians, against the faster PyTorch variant. MFU = analytic FLOPs (`vitally_jax.flops`) / step time / the rate
of a 2048^3 float32 jnp.dot measured in this process between rounds (median).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

from _shared import TorchWorker, build_jax_step, matmul_rate, torch_available


def bench_variant(
    variant: str, batch: int, crop: int, rounds: int, steps: int, use_compile: bool, micro_batch=None
) -> dict:
    t0 = time.perf_counter()
    run, state, flops_img, mae_cfg = build_jax_step(variant, batch, crop, micro_batch=micro_batch)
    state, _ = run(state)
    jax_compile_s = time.perf_counter() - t0
    print(f"[{variant}] JAX compiled + first step in {jax_compile_s:.1f} s", file=sys.stderr, flush=True)
    reason = torch_available()
    worker = None
    if reason is None:
        worker = TorchWorker(
            {
                "variant": variant,
                "img": crop,
                "batch": batch,
                "chans": mae_cfg.encoder.in_chans,
                "mask_ratio": mae_cfg.mask_ratio,
                "dec_width": mae_cfg.decoder_width,
                "dec_depth": mae_cfg.decoder_depth,
                "dec_heads": mae_cfg.decoder_heads,
                "threads": 2,
            }
        )
    times = {"jax": [], "torch_eager": [], "torch_compile": []}
    notes, warm, mm = [], {}, []
    cmds = ["eager"] + (["compile"] if use_compile else [])
    for r in range(rounds):
        for _ in range(steps):
            t = time.perf_counter()
            state, _ = run(state)
            times["jax"].append(time.perf_counter() - t)
        mm.append(matmul_rate())
        for cmd in cmds:
            if worker is None or f"torch_{cmd}_error" in warm:
                continue
            out = worker.run(cmd, steps)
            if "error" in out:
                warm[f"torch_{cmd}_error"] = out["error"]
                notes.append(f"torch {cmd}: {out['error']}")
                continue
            times[f"torch_{cmd}"] += out["times"]
            warm.setdefault(f"torch_{cmd}_warmup_s", round(out["warmup_s"], 1))
        print(
            f"[{variant}] round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v),
            file=sys.stderr,
            flush=True,
        )
    if worker is not None:
        worker.close()
    else:
        notes.append(f"PyTorch reference not available: {reason}")
    if not use_compile:
        notes.append("torch.compile not measured (--no-torch-compile)")
    med = {k: statistics.median(v) for k, v in times.items() if v}
    rate = statistics.median(mm)
    out = {
        "variant": variant,
        "batch": batch,
        "crop": crop,
        "mask_ratio": mae_cfg.mask_ratio,
        "rounds": rounds,
        "steps_per_round": steps,
        "micro_batch": int(getattr(run, "micro_batch", 0)),  # ours: samples per gradient-accumulation slice (0: none)
        "jax_compile_s": round(jax_compile_s, 1),
        **warm,
        "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "step_s": {k: {"median": med[k], "min": min(v), "max": max(v), "all": v} for k, v in times.items() if v},
        "images_per_s": {k: round(batch / v, 2) for k, v in med.items()},
        "flops_per_image": flops_img,
        "matmul_flops": rate,
        "achieved_flops": flops_img * batch / med["jax"],
        "notes": notes,
    }
    out["mfu"] = out["achieved_flops"] / rate
    torch_best = [v for k, v in med.items() if k.startswith("torch")]
    if torch_best:
        out["speedup_vs_torch"] = min(torch_best) / med["jax"]
        out["speedup_vs_torch_eager"] = med["torch_eager"] / med["jax"] if "torch_eager" in med else None
        out["speedup_vs_torch_compile"] = med["torch_compile"] / med["jax"] if "torch_compile" in med else None
    return out


def print_table(rows: list[dict], load: str) -> None:
    print(f"MAE train step, side by side (median of rounds); machine load: {load}")
    head = (
        f"{'model':>6} {'batch':>5} {'JAX s':>7} {'eager s':>8} {'compile s':>9} {'img/s JAX':>9} "
        f"{'x vs torch':>10} {'GFLOP/s':>8} {'mm GFLOP/s':>10} {'MFU':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        m = r["median_step_s"]
        sp = r.get("speedup_vs_torch")
        print(
            f"{r['variant']:>6} {r['batch']:>5} {m['jax']:7.2f} {m.get('torch_eager', float('nan')):8.2f} "
            f"{m.get('torch_compile', float('nan')):9.2f} {r['images_per_s']['jax']:9.2f} "
            f"{(f'{sp:.2f}x' if sp else 'n/a'):>10} {r['achieved_flops'] / 1e9:8.1f} "
            f"{r['matmul_flops'] / 1e9:10.1f} {100 * r['mfu']:5.1f}%"
        )
        for n in r["notes"]:
            print(f"  note ({r['variant']}): {n}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="S/16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="timed steps per side per round")
    p.add_argument("--no-torch-compile", action="store_true")
    p.add_argument(
        "--micro_batch",
        type=int,
        default=None,
        help="ours: input.micro_batch (default: the trainer's automatic choice; 0: the whole batch at once)",
    )
    p.add_argument("--json", default="bench_out/train.json")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from vitally_jax.cli import setup_compilation_cache

    setup_compilation_cache()
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    load = f"loadavg {' '.join(load)} on {os.cpu_count()} cores"
    rows = [
        bench_variant(
            v.strip(), args.batch, args.crop, args.rounds, args.steps, not args.no_torch_compile, args.micro_batch
        )
        for v in args.variants.split(",")
    ]
    if args.json:
        from vitally_jax.fileio import atomic_path

        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pathlib.Path(tmp).write_text(json.dumps({"load": load, "rows": rows}, indent=1))
    print_table(rows, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
