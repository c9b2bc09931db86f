"""Our MAE train step vs the PyTorch reference, measured side by side, plus the CPU MFU of our step.

    python tools/bench_train.py                                   # S/16, 256 px, mask 0.75, batch 32, 3 rounds
    python tools/bench_train.py --variants=S/16,B/16 --rounds=2 --json=bench_out/train.json
    python tools/bench_train.py --no-torch-compile                # eager PyTorch only (compile costs minutes)

The JAX step is `vitally_jax.train`'s real update (self-standardise, MAE loss, grad, Lion) jitted on one CPU
device. The PyTorch side (`tools/torch_reference.py`: timm 0.9.7 ParallelScalingBlock encoder + MAE decoder +
the same loss + Lion) runs in the torch venv as ONE long-lived subprocess, so compilation happens once and the
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
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCH_PY = os.environ.get("VITALLY_TORCH_PYTHON", "/work/goldens-venv/bin/python")


def build_jax_step(variant: str, batch: int, crop: int = 256, *, depth: int | None = None, dtype: str = "float32",
                   attention_impl: str | None = None, decoder_depth: int | None = None, seed: int = 0):
    """-> (step(state) -> state, state, flops per image, mae_cfg): the trainer's jitted update on one device."""
    sys.path.insert(0, str(ROOT))
    from vitally_jax import train
    from vitally_jax.models.mae import mae_config

    sys.path.insert(0, str(ROOT / "tools"))
    import aot_memory

    config = aot_memory.load_config("vitl8")
    config.model.variant = variant
    config.model.dtype = dtype
    config.model.drop_path_rate = 0.0
    config.model.attention_impl = attention_impl
    config.input.crop = crop
    config.input.global_batch = batch
    mae_cfg = train.model_config(config)
    over = {}
    if depth is not None:
        over["depth"] = depth
    if decoder_depth is not None:
        over["decoder_depth"] = decoder_depth
    if over:
        mae_cfg = mae_config(variant, **{**_mae_overrides(mae_cfg), **over})
    run, state = one_device_step(config, mae_cfg, seed)
    return run, state, train._train_flops(mae_cfg), mae_cfg


def one_device_step(config, mae_cfg, seed: int = 0):
    """-> (run(state) -> (state, metrics), initial state): the trainer's jitted update of `config` / `mae_cfg` on
    one device, fed one fixed random uint8 batch of the config's crop and global batch."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vitally_jax import sharding, train

    batch, crop = config.input.global_batch, config.input.crop
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graphdef, abs_state, state_sh, schedules, create = train.build_abstract(config, mae_cfg, mesh)
    step = train.jit_train_step(train.make_train_step(graphdef, mae_cfg, schedules, use_drop_path=False),
                                state_sh, mesh)
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

    return run, state


def _mae_overrides(mae_cfg) -> dict:
    e = mae_cfg.encoder
    return dict(img_size=e.img_size, in_chans=e.in_chans, dtype=e.dtype, remat=e.remat,
                attention_impl=e.attention_impl, mask_ratio=mae_cfg.mask_ratio, drop_path_rate=e.drop_path_rate,
                fourier_weight=mae_cfg.fourier_weight, fourier=mae_cfg.fourier, decoder_depth=mae_cfg.decoder_depth,
                decoder_width=mae_cfg.decoder_width, decoder_heads=mae_cfg.decoder_heads)


def matmul_rate(n: int = 2048) -> float:
    """float32 FLOP/s of one n^3 jnp.dot through XLA (best of 3)."""
    from vitally_jax.flops import measure_matmul_flops
    return measure_matmul_flops(n, repeats=3)


class TorchWorker:
    """The long-lived PyTorch reference process (see tools/torch_reference.py)."""

    def __init__(self, spec: dict):
        self.proc = subprocess.Popen([TORCH_PY, str(ROOT / "tools" / "torch_reference.py"), "--worker",
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
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
        r = subprocess.run([TORCH_PY, str(ROOT / "tools" / "torch_reference.py")], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["failed"])[-1]


def bench_variant(variant: str, batch: int, crop: int, rounds: int, steps: int, use_compile: bool) -> dict:
    import jax
    t0 = time.perf_counter()
    run, state, flops_img, mae_cfg = build_jax_step(variant, batch, crop)
    state, _ = run(state)
    jax_compile_s = time.perf_counter() - t0
    print(f"[{variant}] JAX compiled + first step in {jax_compile_s:.1f} s", file=sys.stderr, flush=True)
    reason = torch_available()
    worker = None
    if reason is None:
        worker = TorchWorker({"variant": variant, "img": crop, "batch": batch, "chans": mae_cfg.encoder.in_chans,
                              "mask_ratio": mae_cfg.mask_ratio, "dec_width": mae_cfg.decoder_width,
                              "dec_depth": mae_cfg.decoder_depth, "dec_heads": mae_cfg.decoder_heads, "threads": 2})
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
        print(f"[{variant}] round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v[-1]:.2f}s" for k, v in times.items() if v), file=sys.stderr, flush=True)
    if worker is not None:
        worker.close()
    else:
        notes.append(f"PyTorch reference not available: {reason}")
    if not use_compile:
        notes.append("torch.compile not measured (--no-torch-compile)")
    med = {k: statistics.median(v) for k, v in times.items() if v}
    rate = statistics.median(mm)
    out = {"variant": variant, "batch": batch, "crop": crop, "mask_ratio": mae_cfg.mask_ratio, "rounds": rounds,
           "steps_per_round": steps, "jax_compile_s": round(jax_compile_s, 1), **warm,
           "median_step_s": {k: round(v, 4) for k, v in med.items()},
           "images_per_s": {k: round(batch / v, 2) for k, v in med.items()},
           "flops_per_image": flops_img, "matmul_flops": rate,
           "achieved_flops": flops_img * batch / med["jax"], "notes": notes}
    out["mfu"] = out["achieved_flops"] / rate
    torch_best = [v for k, v in med.items() if k.startswith("torch")]
    if torch_best:
        out["speedup_vs_torch"] = min(torch_best) / med["jax"]
        out["speedup_vs_torch_eager"] = med["torch_eager"] / med["jax"] if "torch_eager" in med else None
    return out


def print_table(rows: list[dict], load: str) -> None:
    print(f"MAE train step, side by side (median of rounds); machine load: {load}")
    head = (f"{'model':>6} {'batch':>5} {'JAX s':>7} {'eager s':>8} {'compile s':>9} {'img/s JAX':>9} "
            f"{'x vs torch':>10} {'GFLOP/s':>8} {'mm GFLOP/s':>10} {'MFU':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        m = r["median_step_s"]
        sp = r.get("speedup_vs_torch")
        print(f"{r['variant']:>6} {r['batch']:>5} {m['jax']:7.2f} {m.get('torch_eager', float('nan')):8.2f} "
              f"{m.get('torch_compile', float('nan')):9.2f} {r['images_per_s']['jax']:9.2f} "
              f"{(f'{sp:.2f}x' if sp else 'n/a'):>10} {r['achieved_flops'] / 1e9:8.1f} "
              f"{r['matmul_flops'] / 1e9:10.1f} {100 * r['mfu']:5.1f}%")
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
    p.add_argument("--json", default="bench_out/train.json")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    jax.config.update("jax_compilation_cache_dir", os.environ.get(
        "VITALLY_JAX_COMPILATION_CACHE", str(pathlib.Path.home() / ".cache" / "vitally_jax" / "jax_cc")))
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    load = f"loadavg {' '.join(load)} on {os.cpu_count()} cores"
    rows = [bench_variant(v.strip(), args.batch, args.crop, args.rounds, args.steps, not args.no_torch_compile)
            for v in args.variants.split(",")]
    if args.json:
        sys.path.insert(0, str(ROOT))
        from vitally_jax.fileio import atomic_path
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pathlib.Path(tmp).write_text(json.dumps({"load": load, "rows": rows}, indent=1))
    print_table(rows, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
