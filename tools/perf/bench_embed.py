"""Whole-screen embedding end to end on CPU: ours (store -> tiles -> every block in one pass -> per-image mean in
zarr -> per-well mean) vs a PyTorch reference doing the same job the way OpenPhenom's example notebook does it (a
torch DataLoader over the tiles, the timm encoder, per-well mean), every block and the last block only.

    python tools/perf/bench_embed.py --rounds=3 --json=bench_out/embed.json

Both sides: S/16 (timm 0.9.7 ParallelScalingBlock for the reference; our ViT with the same geometry), random
weights, `--crop` px tiles of 6-channel `--size` px wells (2 sites per well), batch `--batch`, 2 threads. Ours is
`vitally_jax.embedding.screen.embed_screen` (what `tools/embed.py` runs) into a fresh output folder each round,
then `well_features` over every block; the reference reads the same pixels from an uncompressed memory-mapped
.npy (cheaper than our zarr decode, so the comparison favours the reference) and writes its well means with
numpy. Rounds interleave (ours, reference every block, reference last block); each side is warmed up first
(compilation cache / first batch), so the figures are steady-state crops/s. Reported: median and min-max over
rounds, the ratios of medians, the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import _shared


def _stats(v: list[float]) -> dict:
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="S/16")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--micro_batch",
        default="auto",
        help="ours: crops per slice inside a forward pass ('auto': cache-sized slices on CPU; 0: the whole batch)",
    )
    p.add_argument(
        "--whole_batch_too",
        type=int,
        default=1,
        help="1: also time ours with the whole batch in one slice (micro_batch=0), in the same rounds",
    )
    p.add_argument("--json", default="bench_out/embed.json")
    args = p.parse_args(argv)

    import numpy as np
    from flax import nnx

    from vitally_jax.cli import setup_compilation_cache
    from vitally_jax.data.store import ImageStore, metadata_frame, write_store
    from vitally_jax.data.synthetic import CHANNEL_NAMES
    from vitally_jax.embedding.screen import EmbeddingStore, embed_screen, well_features
    from vitally_jax.fileio import atomic_path
    from vitally_jax.models.vit import ViTEncoder, vit_config

    setup_compilation_cache()
    load0 = os.getloadavg()
    n = args.images - args.images % 2
    tiles = n * (args.size // args.crop) ** 2
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, args.size, args.size, 6), dtype=np.uint8)
    wells = np.arange(n) // 2
    result: dict = {
        "variant": args.variant,
        "images": n,
        "crops": tiles,
        "crop": args.crop,
        "batch": args.batch,
        "threads": args.threads,
        "micro_batch": args.micro_batch,
        "load_start": list(load0),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        meta = metadata_frame([f"img{i}" for i in range(n)], well_id=[f"w{w}" for w in wells], site=np.arange(n) % 2)
        store_path = write_store(tmp / "store", images, meta, CHANNEL_NAMES)
        np.save(tmp / "images.npy", images)
        store = ImageStore.open(store_path)
        enc = ViTEncoder(vit_config(args.variant, img_size=args.crop, in_chans=6), rngs=nnx.Rngs(0))

        counter = iter(range(10**6))

        micro = args.micro_batch if args.micro_batch == "auto" else int(args.micro_batch)

        def ours(micro=micro) -> float:
            out = tmp / f"emb{next(counter)}"
            t = time.perf_counter()
            embed_screen(enc, store, out, crop=args.crop, batch_size=args.batch, progress=False, micro_batch=micro)
            es = EmbeddingStore.open(out)
            for pooling in es.poolings:
                well_features(es.features(pooling), es.metadata)
            return time.perf_counter() - t

        spec = {
            "variant": args.variant,
            "img": args.crop,
            "chans": 6,
            "threads": args.threads,
            "embed": {
                "npy": str(tmp / "images.npy"),
                "wells": wells.tolist(),
                "crop": args.crop,
                "batch": args.batch,
                "out": str(tmp / "torch_wells.npy"),
            },
        }
        reason = _shared.torch_available()
        worker = _shared.TorchWorker(spec) if reason is None else None
        whole = bool(args.whole_batch_too) and micro != 0
        ours()  # warm-up: compilation (cache) and first reads
        if whole:
            ours(0)
        times: dict[str, list[float]] = {"ours_every_block": [], "torch_every_block": [], "torch_last_block": []}
        if whole:
            times["ours_whole_batch"] = []
        for _ in range(args.rounds):
            times["ours_every_block"].append(ours())
            if whole:
                times["ours_whole_batch"].append(ours(0))
            if worker is not None:
                for cmd, key in (("embed_all", "torch_every_block"), ("embed_last", "torch_last_block")):
                    r = worker.run(cmd, 1)
                    if "error" in r:
                        reason = r["error"]
                    else:
                        times[key].extend(r["times"])
        if worker is not None:
            worker.close()
    result["torch"] = reason or "ok"
    result["seconds"] = {k: _stats(v) for k, v in times.items() if v}
    result["crops_per_s"] = {k: tiles / v["median"] for k, v in result["seconds"].items()}
    cps = result["crops_per_s"]
    if "torch_every_block" in cps:
        result["ratio_vs_torch_every_block"] = cps["ours_every_block"] / cps["torch_every_block"]
        result["ratio_vs_torch_last_block"] = cps["ours_every_block"] / cps["torch_last_block"]
    if "ours_whole_batch" in cps:
        result["ratio_sliced_vs_whole_batch"] = cps["ours_every_block"] / cps["ours_whole_batch"]
    result["load_end"] = list(os.getloadavg())
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp_path:
        pathlib.Path(tmp_path).write_text(json.dumps(result, indent=1))
    print(
        f"whole-screen embedding, {args.variant}, {tiles} crops of {args.crop} px, batch {args.batch}, "
        f"{args.rounds} interleaved rounds, load {load0[0]:.1f}"
    )
    for k, v in result["seconds"].items():
        print(f"{k:>18}: {cps[k]:7.1f} crops/s (median {v['median']:.2f} s, min-max {v['min']:.2f}-{v['max']:.2f})")
    if "ratio_vs_torch_every_block" in result:
        print(
            f"ours every block vs PyTorch every block: {result['ratio_vs_torch_every_block']:.2f}x; "
            f"vs PyTorch last block only: {result['ratio_vs_torch_last_block']:.2f}x"
        )
    else:
        print(f"PyTorch reference not available: {reason}")
    if "ratio_sliced_vs_whole_batch" in result:
        print(
            f"ours micro_batch={args.micro_batch} vs the whole batch in one slice: "
            f"{result['ratio_sliced_vs_whole_batch']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
