"""Pod plan: per-device memory of the L/8 and G/8 MAE train steps at the paper's global batch sizes, bf16
compute, over data x fsdp meshes of fake devices, against 16 / 32 / 80 / 141 GiB accelerators.

    python tools/pod_plan.py                       # writes docs/pod_plan.md and bench_out/pod_plan.json
    python tools/pod_plan.py --models=tiny --devices=8 --depths=2,3 --validate_depth=4 --out=/tmp/plan.md

Method (per block, linear in depth). Compiling the full 48-block G/8 step costs minutes per configuration on a
CPU host, so every configuration is compiled by `tools/aot_memory.py`'s path (the trainer's own builders, abstract
inputs with real shardings, XLA memory analysis) at two reduced encoder depths d1 < d2 with the full decoder.
The encoder blocks are one scanned stack, so every per-device quantity (arguments, temporaries, peak) is affine
in depth: per_block = (m(d2) - m(d1)) / (d2 - d1), m(D) = m(d1) + (D - d1) per_block. The method is validated by
compiling one configuration at a third depth and comparing with the extrapolation (error printed in the doc).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAPER_BATCH = {"L/8": 16384, "G/8": 8192, "tiny": 64}
FULL_DEPTH = {"L/8": 24, "G/8": 48, "tiny": None}
TARGETS_GIB = (16, 32, 80, 141)
KEYS = ("argument_bytes", "temp_bytes", "peak_bytes")


def compile_at_depth(name: str, depth: int, mesh_shape: tuple[int, int], global_batch: int, dtype: str,
                     remat: str) -> dict:
    """aot_memory's analysis of `name` with the encoder cut to `depth` blocks on a (data, fsdp, 1) mesh."""
    import jax

    import aot_memory
    from vitally_jax import sharding, train
    from vitally_jax.models.mae import mae_config

    config = aot_memory.load_config(aot_memory.CONFIGS[name])
    config.input.global_batch = global_batch
    config.model.dtype = dtype
    config.model.remat = remat
    aot_memory.accelerator_attention(config)
    n = mesh_shape[0] * mesh_shape[1]
    mesh = sharding.make_mesh((mesh_shape[0], mesh_shape[1], 1), devices=jax.devices()[:n])
    real = train.model_config
    cut = mae_config(config.model.variant, **_overrides(real(config), depth))
    train.model_config = lambda c: cut  # aot_memory.analyse builds the step from train.model_config(config)
    try:
        row = aot_memory.analyse(config, mesh)
    finally:
        train.model_config = real
    row.update(name=name, depth=depth, full_depth=FULL_DEPTH.get(name) or real(config).encoder.depth)
    return row


def _overrides(mae_cfg, depth: int) -> dict:
    e = mae_cfg.encoder
    return dict(img_size=e.img_size, in_chans=e.in_chans, dtype=e.dtype, remat=e.remat, depth=depth,
                attention_impl=e.attention_impl, mask_ratio=mae_cfg.mask_ratio, drop_path_rate=e.drop_path_rate,
                fourier_weight=mae_cfg.fourier_weight, fourier=mae_cfg.fourier, decoder_depth=mae_cfg.decoder_depth,
                decoder_width=mae_cfg.decoder_width, decoder_heads=mae_cfg.decoder_heads)


def extrapolate(r1: dict, r2: dict, depth: int) -> dict:
    """Affine-in-depth estimate at `depth` from two compiled rows at depths r1['depth'] < r2['depth']."""
    d1, d2 = r1["depth"], r2["depth"]
    out = {}
    for k in KEYS:
        per = (r2[k] - r1[k]) / (d2 - d1)
        out[k] = r1[k] + (depth - d1) * per
        out[k.replace("_bytes", "_per_block")] = per
    return out


@functools.lru_cache(maxsize=None)
def _param_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(state path, shape) of every trainable parameter of model `name` (abstract, built once per model)."""
    import jax
    from flax import nnx

    import aot_memory
    from vitally_jax import sharding, train
    from vitally_jax.models.mae import MAE

    config = aot_memory.load_config(aot_memory.CONFIGS[name])
    abstract = nnx.state(nnx.eval_shape(lambda: MAE(train.model_config(config), rngs=nnx.Rngs(0))), nnx.Param)
    return tuple((sharding._path_str(path), tuple(leaf.shape))
                 for path, leaf in jax.tree_util.tree_leaves_with_path(abstract))


def state_bytes_per_device(name: str, mesh_shape: tuple[int, int]) -> float:
    """Per-device bytes of the float32 parameters + Lion state under the default sharding rules (no compile)."""
    from vitally_jax import sharding

    sizes = {"data": mesh_shape[0], "fsdp": mesh_shape[1], "model": 1}
    mesh = type("ShapeOnly", (), {"shape": sizes})()
    total = 0.0
    for path, shape in _param_shapes(name):
        split = 1
        for ax in sharding.spec_for(path, shape, mesh):
            for a in (() if ax is None else (ax,) if isinstance(ax, str) else ax):
                split *= sizes[a]
        total += 2 * math.prod(shape) * 4 / split  # parameter + Lion moment, float32
    return total


def choose_mesh(name: str, n: int) -> tuple[int, int]:
    """(data, fsdp) for n devices: the fsdp size (a divisor of n) that leaves the least training state per device,
    the largest such. Pure fsdp over n unless some weight dimension does not divide by n (G/8's width 1664 = 13 x
    128: over 256 devices its fused projections would stay whole on every device, so data=2 x fsdp=128 wins)."""
    best = None
    for f in sorted((f for f in range(1, n + 1) if n % f == 0), reverse=True):
        b = state_bytes_per_device(name, (n // f, f))
        if best is None or b < best[0] * 0.999:
            best = (b, (n // f, f))
        if f <= n // 16:
            break
    return best[1]


def plan(models, device_counts, remats, depths, dtype, log=print) -> list[dict]:
    rows = []
    for name in models:
        for n in device_counts:
            gb = PAPER_BATCH[name]
            if gb % n:
                gb = (gb // n + 1) * n
            mesh = choose_mesh(name, n)  # the batch is split over data x fsdp
            for remat in remats:
                t = time.perf_counter()
                r1, r2 = (compile_at_depth(name, d, mesh, gb, dtype, remat) for d in depths)
                full = r1["full_depth"]
                est = extrapolate(r1, r2, full)
                rows.append({"model": name, "devices": n, "mesh": {"data": mesh[0], "fsdp": mesh[1]}, "global_batch": gb,
                             "per_device_batch": gb // n, "remat": remat, "dtype": dtype, "depth": full,
                             "depths_compiled": list(depths), "params": None, **est,
                             "compile_s": round(time.perf_counter() - t, 1)})
                log(f"{name} {n} devices remat={remat}: peak {est['peak_bytes'] / 2**30:.2f} GiB "
                    f"({rows[-1]['compile_s']} s)")
    return rows


def validate(name, n, remat, depths, check_depth, dtype) -> dict:
    gb = PAPER_BATCH[name]
    r1, r2 = (compile_at_depth(name, d, (1, n), gb, dtype, remat) for d in depths)
    real = compile_at_depth(name, check_depth, (1, n), gb, dtype, remat)
    est = extrapolate(r1, r2, check_depth)
    return {"model": name, "devices": n, "remat": remat, "depths": list(depths), "check_depth": check_depth,
            "estimated_peak": est["peak_bytes"], "compiled_peak": real["peak_bytes"],
            "rel_err": abs(est["peak_bytes"] - real["peak_bytes"]) / max(real["peak_bytes"], 1)}


def recommend(rows: list[dict]) -> list[str]:
    """Per target: the smallest device count (then lightest remat) whose per-device peak fits with 10% headroom."""
    order = {"none": 0, "dots_saveable": 1, "full": 2}
    lines = []
    for name in sorted({r["model"] for r in rows}):
        for gib in TARGETS_GIB:
            fit = [r for r in rows if r["model"] == name and r["peak_per_block"] >= 0
                   and r["peak_bytes"] <= 0.9 * gib * 2**30]
            if not fit:
                lines.append(f"- {name} on {gib} GiB devices: nothing planned fits at the paper batch; use more "
                             f"devices or gradient accumulation (peak scales ~linearly with per-device batch).")
                continue
            best = min(fit, key=lambda r: (r["devices"], order.get(r["remat"], 3)))
            mesh = best.get("mesh", {"data": 1, "fsdp": best["devices"]})
            lines.append(f"- {name} on {gib} GiB devices: {best['devices']} devices, mesh data={mesh['data']} x "
                         f"fsdp={mesh['fsdp']}, remat `{best['remat']}` ({best['per_device_batch']} crops/device, "
                         f"peak {best['peak_bytes'] / 2**30:.1f} GiB)")
    return lines


def write_doc(path: pathlib.Path, rows, check, argv_line: str, load: str) -> None:
    from vitally_jax.fileio import atomic_path
    g = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["# Pod plan: per-device memory of the MAE train step", "",
             f"Regenerate: `{argv_line}` (CPU only, fake devices; about a minute per configuration here).", "",
             "Per-device memory from XLA's memory analysis of the real train step (`vitally_jax.train` builders via "
             "`tools/aot_memory.py`), bf16 compute, float32 parameters and Lion state sharded over 'fsdp', batch "
             "split over all devices, paper global batches (L/8: 16,384; G/8: 8,192). The data x fsdp mesh per "
             "device count is the one that leaves the least training state per device (`choose_mesh`; G/8's width "
             "1,664 = 13 x 128 does not split 256 ways, so G/8 on 256 devices uses data=2 x fsdp=128).", "",
             "**Method: measured per block and extrapolated linearly in depth.** Each configuration is compiled at "
             "two reduced encoder depths (full decoder); the encoder is one scanned block stack, so arguments, "
             "temporaries and peak are affine in depth and are extrapolated to 24 (L/8) / 48 (G/8) blocks.", ""]
    if check:
        lines += [f"Validation: {check['model']} on {check['devices']} devices, remat `{check['remat']}`, depths "
                  f"{check['depths']} extrapolated to {check['check_depth']} blocks: {g(check['estimated_peak'])} "
                  f"GiB vs {g(check['compiled_peak'])} GiB compiled at that depth (error "
                  f"{100 * check['rel_err']:.1f}%).", ""]
    lines += ["XLA:CPU fuses less than XLA:GPU/TPU, so temporaries here are an upper-bound plan; confirm on one "
              f"real host. Measured under machine load {load}.", "",
              "| model | devices | mesh (data x fsdp) | crops/device | remat | arguments GiB | temporaries GiB | "
              "peak GiB | peak per block GiB | fits 16 / 32 / 80 / 141 GiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fits = " / ".join("yes" if r["peak_bytes"] <= 0.9 * t * 2**30 else "no" for t in TARGETS_GIB)
        if r["peak_per_block"] < 0:  # XLA's buffer assignment was not monotonic between the two depths
            fits = "INVALID: peak fell with depth; compile at depths further apart"
        mesh = r.get("mesh", {"data": 1, "fsdp": r["devices"]})
        lines.append(f"| {r['model']} | {r['devices']} | {mesh['data']} x {mesh['fsdp']} | {r['per_device_batch']} | "
                     f"{r['remat']} | {g(r['argument_bytes'])} | {g(r['temp_bytes'])} | {g(r['peak_bytes'])} | "
                     f"{g(r['peak_per_block'])} | {fits} |")
    lines += ["", "'fits' keeps 10% headroom. Recommended mesh and remat per target (fewest devices, then the "
              "lightest remat that fits):", ""] + recommend(rows) + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pathlib.Path(tmp).write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="L/8,G/8")
    p.add_argument("--devices", default="8,64,256")
    p.add_argument("--remat", default="full,none")
    p.add_argument("--depths", default="2,4", help="two reduced encoder depths to compile (at depth 1 XLA's buffer "
                   "assignment differs from deeper stacks; start at 2)")
    p.add_argument("--validate_depth", type=int, default=8, help="compile the first model at this depth on the "
                   "largest device count to check the extrapolation (0 = skip)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="docs/pod_plan.md")
    p.add_argument("--json", default="bench_out/pod_plan.json")
    args = p.parse_args(argv)
    counts = [int(v) for v in args.devices.split(",")]
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(counts)}".strip()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    import jax
    jax.config.update("jax_compilation_cache_dir", os.environ.get(
        "VITALLY_JAX_COMPILATION_CACHE", str(pathlib.Path.home() / ".cache" / "vitally_jax" / "jax_cc")))
    if len(jax.devices()) < max(counts):
        from vitally_jax.errors import ConfigError
        raise ConfigError(f"--devices: {max(counts)} devices needed, {len(jax.devices())} available")
    depths = tuple(int(v) for v in args.depths.split(","))
    models = [m.strip() for m in args.models.split(",")]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    check = None
    if args.validate_depth:
        check = validate(models[0], counts[-1], args.remat.split(",")[0], depths, args.validate_depth, args.dtype)
        log(f"validation: rel err {check['rel_err']:.3%}")
    rows = plan(models, counts, args.remat.split(","), depths, args.dtype, log)
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
    cmd = "python tools/pod_plan.py" + ("" if argv is None and len(sys.argv) == 1 else
                                       " " + " ".join(sys.argv[1:] if argv is None else argv))
    write_doc(pathlib.Path(args.out), rows, check, cmd, load)
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "validation": check}, indent=1))
    print(pathlib.Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
