"""Data-path benchmark: synthetic generator images/s, store write rate, Grain training crops/s (256x256x6 from
the zarr store), raw TensorStore crop reads/s and inference tiles/s.

  python tools/perf/bench_data.py [--images 256] [--store-images 64] [--batches 12] [--json bench_data.json]

The generator renders `--images` wells of 256x256x6 (preset "full" geometry); wall and process-CPU seconds are
both reported because CPUs may be shared. Crops are read from a store of `--store-images` rendered 512x512x6
wells (RxRx3-core size), so every crop is a random 256x256 window.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def bench_generator(n: int, size: int = 256):
    from vitally_jax.data.synthetic import build_world, preset, render_wells

    cfg = preset("full", image_size=size, n_genes=200, n_compounds=20, n_experiments=4, replicates=2)
    *_, meta, z, imaging = build_world(cfg)
    n = min(n, len(z))
    imgs, wall, cpu = _timed(lambda: np.stack(list(render_wells(cfg, z, imaging, 0, n))))
    return imgs, {
        "images": n,
        "size": size,
        "wall_s": wall,
        "cpu_s": cpu,
        "images_per_s": n / wall,
        "images_per_cpu_s": n / cpu,
        "seconds_per_1000": 1000 * wall / n,
    }


def bench_demo_feed(tmp: pathlib.Path, images: int, batches: int) -> dict:
    """The demo config's input pipeline (crops of its screen, its batch) against its own train step's appetite.

    Feed: Grain batches from a store of `images` wells rendered with the demo preset, in the demo's mode
    (`input.in_memory`) and from the zarr store. Consumption: the demo's jitted train step on one CPU device,
    crops/s over `batches` steps after compilation. The feed must exceed the consumption with margin."""
    from vitally_jax import config_lib, train
    from vitally_jax.data.pipeline import train_dataset
    from vitally_jax.data.store import ImageStore, write_store
    from vitally_jax.data.synthetic import CHANNEL_NAMES, build_world, preset, render_wells

    demo = config_lib.load("demo", None)
    t = demo.train
    crop, gb = t.input.crop, t.input.global_batch
    cfg = preset(demo.screen.preset, **dict(demo.screen.overrides))
    *_, meta, z, imaging = build_world(cfg)
    path = tmp / "demo_store"
    write_store(
        path,
        np.stack(list(render_wells(cfg, z, imaging, 0, images))),
        meta.iloc[:images].reset_index(drop=True),
        CHANNEL_NAMES,
    )
    st = ImageStore.open(path)
    out = {"crop": crop, "global_batch": gb, "feed": {}}
    for in_memory in (bool(t.input.in_memory), not t.input.in_memory):
        it = iter(
            train_dataset(
                st,
                crop=crop,
                global_batch=gb,
                seed=0,
                process_index=0,
                process_count=1,
                flips=t.input.flips,
                rot90=t.input.rot90,
                in_memory=in_memory,
            )
        )
        next(it)
        _, wall, _ = _timed(lambda it=it: [next(it) for _ in range(batches)])
        out["feed"]["in_memory" if in_memory else "zarr"] = gb * batches / wall

    from _shared import one_device_step

    run, state = one_device_step(t, train.model_config(t))
    state, _ = run(state)  # compile
    w = time.perf_counter()
    for _ in range(batches):
        state, _ = run(state)
    out["train_crops_per_s"] = gb * batches / (time.perf_counter() - w)
    out["margin"] = out["feed"]["in_memory" if t.input.in_memory else "zarr"] / out["train_crops_per_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="wells to render at 256x256 for the generator rate")
    ap.add_argument("--store-images", type=int, default=64, help="512x512 wells in the crop-reading store")
    ap.add_argument("--batches", type=int, default=12, help="timed batches of 32 crops per setting")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--json", default="bench_data.json")
    ap.add_argument("--workdir", default=None, help="where to build the temporary store (default: a temp dir)")
    ap.add_argument("--demo-images", type=int, default=96, help="wells of the demo-config feed check (0 skips it)")
    args = ap.parse_args(argv)

    from vitally_jax.cli import setup_compilation_cache

    setup_compilation_cache()
    from vitally_jax.data.pipeline import inference_tiles, train_dataset
    from vitally_jax.data.store import ImageStore, metadata_frame, write_store
    from vitally_jax.data.synthetic import CHANNEL_NAMES

    results: dict = {"cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]}
    _, results["generator_256"] = bench_generator(args.images)
    big, results["generator_512"] = bench_generator(args.store_images, size=512)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = pathlib.Path(tmp) / "store"
        meta = metadata_frame([f"w{i}" for i in range(len(big))])
        _, wall, _ = _timed(lambda: write_store(path, big, meta, CHANNEL_NAMES))
        size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        results["store_write"] = {
            "images": len(big),
            "wall_s": wall,
            "raw_mb_per_s": big.nbytes / 2**20 / wall,
            "compression_ratio": big.nbytes / 2**20 / size_mb,
        }
        st = ImageStore.open(path)

        rng = np.random.default_rng(0)
        st.read_crop(0, 0, 0, 256)
        n_raw = 32 * args.batches

        def raw():
            for _ in range(n_raw):
                st.read_crop(int(rng.integers(len(st))), int(rng.integers(257)), int(rng.integers(257)), 256)

        _, wall, cpu = _timed(raw)
        results["tensorstore_crop_1thread"] = {
            "crops": n_raw,
            "crops_per_s": n_raw / wall,
            "crops_per_cpu_s": n_raw / cpu,
        }

        results["grain_crops"] = []
        for threads in args.threads:
            for standardize in (False, True):
                ds = train_dataset(
                    st,
                    crop=256,
                    global_batch=32,
                    seed=0,
                    process_index=0,
                    process_count=1,
                    read_threads=threads,
                    standardize=standardize,
                )
                it = iter(ds)
                next(it)  # warm-up: thread pool start, first reads
                _, wall, cpu = _timed(lambda it=it: [next(it) for _ in range(args.batches)])
                results["grain_crops"].append(
                    {
                        "read_threads": threads,
                        "standardize": standardize,
                        "crops": 32 * args.batches,
                        "crops_per_s": 32 * args.batches / wall,
                        "crops_per_cpu_s": 32 * args.batches / cpu,
                    }
                )

        _, wall, _ = _timed(lambda: list(inference_tiles(st, crop=256, batch_size=64)))
        results["inference_tiles"] = {"tiles": 4 * len(st), "tiles_per_s": 4 * len(st) / wall}
        if args.demo_images:
            results["demo_feed"] = bench_demo_feed(pathlib.Path(tmp), args.demo_images, max(3, args.batches // 2))

    g, g5 = results["generator_256"], results["generator_512"]
    print(f"machine: {results['cpu_count']} CPUs, load average {results['load_avg_1min']:.1f} at start")
    print(f"{'measurement':44s} {'rate':>12s}  note (per CPU s: robust when the CPUs are shared)")
    print(
        f"{'generator 256x256x6 images/s (wall)':44s} {g['images_per_s']:12.1f}  {g['images']} images, "
        f"{g['seconds_per_1000']:.1f} s per 1,000"
    )
    print(
        f"{'generator 256x256x6 images/s (per CPU s)':44s} {g['images_per_cpu_s']:12.1f}  "
        f"{1000 / g['images_per_cpu_s']:.1f} CPU s per 1,000"
    )
    print(f"{'generator 512x512x6 images/s (wall)':44s} {g5['images_per_s']:12.1f}")
    sw = results["store_write"]
    print(f"{'store write MB/s (raw uint8)':44s} {sw['raw_mb_per_s']:12.1f}  zstd ratio {sw['compression_ratio']:.2f}")
    raw1 = results["tensorstore_crop_1thread"]["crops_per_s"]
    print(
        f"{'TensorStore read_crop 256x256x6 /s, 1 thread':44s} {raw1:12.1f}  "
        f"{results['tensorstore_crop_1thread']['crops_per_cpu_s']:.0f} per CPU s"
    )
    for r in results["grain_crops"]:
        name = f"Grain crops/s, {r['read_threads']} threads" + (", standardised" if r["standardize"] else "")
        print(
            f"{name:44s} {r['crops_per_s']:12.1f}  x{r['crops_per_s'] / raw1:.2f} vs raw 1 thread, "
            f"{r['crops_per_cpu_s']:.0f} per CPU s"
        )
    print(f"{'inference tiles 256x256x6 /s':44s} {results['inference_tiles']['tiles_per_s']:12.1f}")
    if "demo_feed" in results:
        d = results["demo_feed"]
        for mode, rate in d["feed"].items():
            print(
                f"{'demo config feed crops/s (' + mode + ')':44s} {rate:12.1f}  {d['crop']}x{d['crop']} crops, "
                f"batch {d['global_batch']}"
            )
        print(
            f"{'demo config train step consumes crops/s':44s} {d['train_crops_per_s']:12.1f}  feed / consumption "
            f"(the demo's mode) = {d['margin']:.1f}x (must be > 1 with margin)"
        )
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from vitally_jax.cli import run_cli

    sys.exit(run_cli(main))
