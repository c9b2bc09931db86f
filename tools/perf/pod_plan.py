"""Pod plan: per-device memory of the L/8 and G/8 MAE train steps at the paper's global batch sizes, bf16
compute, over data x fsdp meshes of fake devices, against 16 / 32 / 80 / 141 GiB accelerators.

    python tools/perf/pod_plan.py                       # writes docs/pod_plan.md and bench_out/pod_plan.json
    python tools/perf/pod_plan.py --models=tiny --devices=8 --depths=2,3 --validate_depth=4 --out=/tmp/plan.md

Method (per block, linear in depth; `vitally_jax.aot`). Compiling the full 48-block G/8 step costs minutes per
configuration on a CPU host, so every configuration is compiled (the trainer's own builders, abstract inputs
with real shardings, XLA memory analysis) at two reduced encoder depths d1 < d2 with the full decoder. The
encoder blocks are one scanned stack, so every per-device quantity (arguments, temporaries, peak) is affine in
depth: per_block = (m(d2) - m(d1)) / (d2 - d1), m(D) = m(d1) + (D - d1) per_block. The method is validated by
compiling one configuration at a third depth and comparing with the extrapolation (error printed in the doc).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="L/8,G/8")
    p.add_argument("--devices", default="8,64,256")
    p.add_argument("--remat", default="full,none")
    p.add_argument(
        "--depths",
        default="2,4",
        help="two reduced encoder depths to compile (at depth 1 XLA's buffer "
        "assignment differs from deeper stacks; start at 2)",
    )
    p.add_argument(
        "--validate_depth",
        type=int,
        default=8,
        help="compile the first model at this depth on the largest device count to check the extrapolation (0 = skip)",
    )
    p.add_argument(
        "--attention",
        default="xla,chunked",
        help="attention memory models: xla (score matrices materialised, upper bound), chunked (fused, no scores)",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="docs/pod_plan.md")
    p.add_argument("--json", default="bench_out/pod_plan.json")
    args = p.parse_args(argv)
    counts = [int(v) for v in args.devices.split(",")]
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(counts)}".strip()
    import jax

    from vitally_jax import aot
    from vitally_jax.cli import setup_compilation_cache

    setup_compilation_cache()
    if len(jax.devices()) < max(counts):
        from vitally_jax.errors import ConfigError

        raise ConfigError(f"--devices: {max(counts)} devices needed, {len(jax.devices())} available")
    depths = tuple(int(v) for v in args.depths.split(","))
    models = [m.strip() for m in args.models.split(",")]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    check = None
    if args.validate_depth:
        check = aot.validate(models[0], counts[-1], args.remat.split(",")[0], depths, args.validate_depth, args.dtype)
        log(f"validation: rel err {check['rel_err']:.3%}")
    rows = aot.plan(models, counts, args.remat.split(","), depths, args.dtype, log, args.attention.split(","))
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
    cmd = "python tools/perf/pod_plan.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    aot.write_doc(pathlib.Path(args.out), rows, check, cmd, load)
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "validation": check}, indent=1))
    print(pathlib.Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
