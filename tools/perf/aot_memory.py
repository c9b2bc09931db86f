"""Per-device memory of the real MAE train step, from ahead-of-time compilation on a mesh of fake devices.

`vitally_jax.aot.analyse` lowers and compiles `vitally_jax.train`'s update step (the same builders the
trainer uses) against abstract inputs (ShapeDtypeStructs carrying the real shardings) and this prints XLA's
per-device memory analysis: arguments (parameters + optimiser state + batch), outputs, temporaries
(activations, gradients), and the total. Nothing is allocated, so G/8 plans run on a laptop CPU:

    python tools/perf/aot_memory.py                                  # L/8 and G/8, 16 fake devices, fsdp
    python tools/perf/aot_memory.py --models=G/8 --devices=64 --per_device_batch=4 --dtype=bfloat16 --remat=full
    python tools/perf/aot_memory.py --json=plan.json

CPU memory analysis is the XLA:CPU view of the same SPMD program; on TPU/GPU the compiler fuses differently
(temporaries usually smaller), so treat the numbers as an upper-bound plan and confirm on one real host.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def _gib(b: int) -> str:
    return f"{b / 2**30:8.2f}"


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'model':>8} {'mesh (d,f,m)':>13} {'batch':>6} {'dtype':>9} {'remat':>13} {'params':>9} "
        f"{'args GiB':>9} {'out GiB':>8} {'temp GiB':>9} {'peak GiB':>9} {'compile s':>9}"
    )
    print("per-device memory of one train step (XLA memory analysis)")
    print(head)
    print("-" * len(head))
    for r in rows:
        mesh = ",".join(str(v) for v in r["mesh"].values())
        print(
            f"{r['variant']:>8} {mesh:>13} {r['global_batch']:>6} {r['dtype']:>9} {r['remat']:>13} "
            f"{r['params'] / 1e6:8.1f}M {_gib(r['argument_bytes']):>9} {_gib(r['output_bytes']):>8} "
            f"{_gib(r['temp_bytes']):>9} {_gib(r['peak_bytes']):>9} {r['compile_s']:>9}"
        )
    for r in rows:
        per_dev_state = r["state_bytes_total"] / r["devices"] / 2**30
        print(
            f"{r['variant']}: params+optimizer state {r['state_bytes_total'] / 2**30:.2f} GiB in total, "
            f"{per_dev_state:.2f} GiB per device if fully sharded; arguments/ideal = "
            f"{r['argument_bytes'] / max(r['state_bytes_total'] / r['devices'], 1):.2f}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="L/8,G/8", help="comma-separated: L/8, G/8, S/16, tiny")
    p.add_argument("--devices", type=int, default=16, help="number of fake CPU devices in the mesh")
    p.add_argument("--mesh", default="1,-1,1", help="mesh shape over (data, fsdp, model); one -1 allowed")
    p.add_argument("--per_device_batch", type=int, default=2, help="crops per device (global = this x devices)")
    p.add_argument("--dtype", default=None, help="compute dtype override: float32 | bfloat16")
    p.add_argument("--remat", default=None, help="remat override: none | full | dots_saveable")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    from vitally_jax import aot, sharding
    from vitally_jax.cli import setup_compilation_cache

    setup_compilation_cache()

    mesh = sharding.make_mesh(tuple(int(v) for v in args.mesh.split(",")))
    rows = []
    for name in args.models.split(","):
        config = aot.load_config(name.strip())
        config.input.global_batch = args.per_device_batch * args.devices
        if args.dtype:
            config.model.dtype = args.dtype
        if args.remat:
            config.model.remat = args.remat
        aot.accelerator_attention(config)
        rows.append(aot.analyse(config, mesh))
        print(f"compiled {name}: {rows[-1]['compile_s']} s", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
