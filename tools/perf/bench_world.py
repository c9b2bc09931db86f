"""Synthetic world rendering speed: images/s of 256x256x6 fields (docs/world.md), on the CPUs given.

  python tools/perf/bench_world.py [--images 1000] [--size 256] [--preset full] [--threads 2]

Renders `--images` wells of the preset's world at `--size` px with `render_wells` (batches of 8 drawn by
`--threads` threads; numpy releases the GIL in its array loops) and prints images/s, wall and process-CPU
seconds, the seconds per 1,000 images (wall, and CPU seconds per thread: the wall time on idle cores), the CPU
model and the load average before and after (the machine may be shared).
The target is >= 1,000 images of 256x256x6 in <= 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from vitally_jax.metrics import host


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.images < 1 or args.threads < 1 or not 32 <= args.size <= 1024:
        ap.error("--images and --threads must be >= 1 and --size in [32, 1024]")

    from vitally_jax.data.synthetic import build_world, preset, render_wells

    cfg = preset(args.preset, image_size=args.size)
    *_, meta, z, imaging = build_world(cfg)
    while len(z) < args.images:  # a larger screen of the same geometry
        cfg = cfg.replace(n_genes=cfg.n_genes * 2)
        *_, meta, z, imaging = build_world(cfg)
    load0 = os.getloadavg()
    w, c = time.perf_counter(), time.process_time()
    n = 0
    for img in render_wells(cfg, z, imaging, 0, args.images, threads=args.threads):
        n += int(img.shape[0] > 0)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    out = {
        "images": n,
        "shape": [args.size, args.size, 6],
        "preset": args.preset,
        "cells_per_image": cfg.cells_per_image,
        "cell_radius": cfg.cell_radius,
        "threads": args.threads,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "images_per_s": round(n / wall, 2),
        "seconds_per_1000": round(1000 * wall / n, 1),
        # what the same work takes on `threads` otherwise idle cores (process CPU time spread over them)
        "cpu_seconds_per_1000_per_thread": round(1000 * cpu / n / args.threads, 1),
        "cpu_model": host()["cpu"],
        "cpu_count": os.cpu_count(),
        "load_before": [round(x, 2) for x in load0],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
