"""Cost of extracting every block's embedding in one pass, measured side by side in one run.

    python tools/perf/bench_probe.py                                   # ViT-S/16 at 128 px, batch 16, CPU
    python tools/perf/bench_probe.py --variant L/8 --img 256 --batch 64 --json bench_probe.json   # on an accelerator

Three jitted programs on the same uint8 batch (self-standardisation included in each):

- all blocks: `vitally_jax.embedding.blocks` extractor, every block, CLS+norm and mean pooling (pooled inside the
  layer scan);
- final block only: the same encoder run with no per-block pooling, pooled once after the last block;
- truncated re-runs: the final-block-only program of the encoder cut to b blocks, for every b = 1..depth (what
  a block sweep costs without the single pass).

Each program is compiled first, then timed `--repeats` times in interleaved order; medians are reported.
Targets: all-blocks / final-only <= 1.05; speed-up over truncated re-runs ~ (depth + 1) / 2.

The PyTorch reference forward (`tools/goldens/torch_reference.py`: timm 0.9.7 ParallelScalingBlock encoder,
self-standardisation, final norm, CLS and mean pooling, `torch.inference_mode`, eager and with `--torch-compile`
also torch.compile) runs in the torch venv (`VITALLY_TORCH_PYTHON`) as one long-lived process with 2 threads,
interleaved with the JAX programs in every repeat; skipped with a note when that venv is missing.

Then the linear probes: one standardised logistic regression per block on synthetic features of the encoder's
width, the JAX probe (all blocks in one vmapped solve) against scikit-learn (block by block), time and accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="S/16", help="ViT variant string (vitally_jax.models.vit.vit_config)")
    p.add_argument("--depth", type=int, default=None, help="override the variant's depth")
    p.add_argument("--img", type=int, default=128, help="crop side in pixels")
    p.add_argument("--channels", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="bench_probe.json", help="where to write the results")
    p.add_argument(
        "--probe-samples", type=int, default=1000, help="linear-probe timing: samples per split (0 skips it)"
    )
    p.add_argument("--probe-classes", type=int, default=20)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference forward")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile of the reference forward")
    return p.parse_args(argv)


def _programs(encoder):
    """(all_blocks(state, x), final_only(state, x, num_blocks)) jitted over split NNX state."""
    import jax
    from flax import nnx

    from vitally_jax.models.preprocess import self_standardize
    from vitally_jax.models.vit import run_stack

    graphdef, state = nnx.split(encoder)

    def final_only(state, images, num_blocks):
        enc = nnx.merge(graphdef, state)
        t = enc._with_cls(enc.embed_patches(self_standardize(images)))
        t, _ = run_stack(enc.blocks, t, num=num_blocks, pool=None)
        pooled = enc.pool(t)
        return {"cls_norm": pooled["cls_norm"], "mean": pooled["mean"]}

    return state, jax.jit(final_only, static_argnums=2)


def _bench_probes(blocks: int, width: int, n: int, k: int) -> dict:
    """Time the JAX probe (vmapped over blocks) and scikit-learn on the same (blocks, n, width) features."""
    import numpy as np

    from vitally_jax.probes.linear import JaxLogisticProbe, SklearnLogisticProbe, probe_scores

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(k, width))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    scale = np.linspace(1.0, 4.0, blocks)[:, None, None]  # class separation grows with the block

    def split():
        y = rng.integers(0, k, n)
        return (centers[y][None] * scale + rng.normal(size=(blocks, n, width))).astype(np.float32), y

    (trx, try_), (tex, tey) = split(), split()
    out = {}
    for name, probe in (("jax", JaxLogisticProbe()), ("sklearn", SklearnLogisticProbe())):
        t0 = time.perf_counter()
        acc = probe_scores(trx, try_, tex, tey, probe=probe)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        probe_scores(trx, try_, tex, tey, probe=probe)
        out[name] = {"first_s": first, "s": time.perf_counter() - t0, "balanced_accuracy": acc.tolist()}
    diff = float(
        np.abs(np.array(out["jax"]["balanced_accuracy"]) - np.array(out["sklearn"]["balanced_accuracy"])).max()
    )
    print(f"\nlinear probes: {blocks} blocks x {n} train / {n} test samples x {width} features, {k} classes")
    print(f"{'backend':<10}{'s (warm)':>10}{'s (first)':>11}{'mean bal. acc.':>16}")
    for name in ("jax", "sklearn"):
        r = out[name]
        print(f"{name:<10}{r['s']:>10.2f}{r['first_s']:>11.2f}{np.mean(r['balanced_accuracy']):>16.4f}")
    print(
        f"JAX / scikit-learn speed-up (warm): {out['sklearn']['s'] / out['jax']['s']:.2f}x; "
        f"max |accuracy difference| over blocks: {diff:.4f}"
    )
    out["max_abs_accuracy_diff"] = diff
    return out


def _torch_worker(args, cfg):
    """-> (commands to time, worker or None, note): the PyTorch reference forward process, when available."""
    if args.no_torch:
        return [], None, "PyTorch reference skipped (--no-torch)"
    from _shared import TorchWorker, torch_available

    reason = torch_available()
    if reason is not None:
        return [], None, f"PyTorch reference not available: {reason}"
    worker = TorchWorker(
        {
            "variant": args.variant,
            "img": args.img,
            "batch": args.batch,
            "chans": args.channels,
            "depth": cfg.depth,
            "threads": 2,
        }
    )
    return ["forward"] + (["forward_compile"] if args.torch_compile else []), worker, None


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    import jax
    import numpy as np
    from flax import nnx

    from vitally_jax.cli import setup_compilation_cache
    from vitally_jax.embedding.blocks import make_extractor
    from vitally_jax.models.vit import ViTEncoder, vit_config

    setup_compilation_cache()

    over = dict(img_size=args.img, in_chans=args.channels)
    if args.depth:
        over["depth"] = args.depth
    cfg = vit_config(args.variant, **over)
    enc = ViTEncoder(cfg, rngs=nnx.Rngs(0))
    depth = cfg.depth
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (args.batch, args.img, args.img, args.channels), dtype=np.uint8)
    )
    extractor = make_extractor(enc, pooling=("cls_norm", "mean"))
    state, final_only = _programs(enc)

    runs = {"all_blocks": lambda: extractor(images), "final_only": lambda: final_only(state, images, depth)}
    for b in range(1, depth + 1):
        runs[f"truncated_{b}"] = lambda b=b: final_only(state, images, b)
    compile_s = {}
    for name, fn in runs.items():  # compile + warm up
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s[name] = time.perf_counter() - t0
    # the single pass really returns every block, and its last block equals the final-only program
    full = extractor(images)
    ref = final_only(state, images, depth)
    err = max(float(np.abs(np.asarray(full[p])[:, -1] - np.asarray(ref[p])).max()) for p in ("cls_norm", "mean"))

    torch_cmds, worker, torch_note = _torch_worker(args, cfg)
    times: dict[str, list[float]] = {name: [] for name in runs}
    times.update({f"torch_{c}": [] for c in torch_cmds})
    names = list(runs)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            jax.block_until_ready(runs[name]())
            times[name].append(time.perf_counter() - t0)
        for c in list(torch_cmds):
            out = worker.run(c, 1)
            if "error" in out:
                torch_note = f"torch {c}: {out['error']}"
                torch_cmds.remove(c)
                times.pop(f"torch_{c}")
                continue
            times[f"torch_{c}"] += out["times"]
            compile_s.setdefault(f"torch_{c}", out["warmup_s"])
    if worker is not None:
        worker.close()
    times = {k: v for k, v in times.items() if v}
    med = {name: statistics.median(v) for name, v in times.items()}
    best = {name: min(v) for name, v in times.items()}  # least disturbed by other work on a shared machine
    truncated_total = sum(med[f"truncated_{b}"] for b in range(1, depth + 1))
    ratio = med["all_blocks"] / med["final_only"]
    speedup = truncated_total / med["all_blocks"]
    ratio_min = best["all_blocks"] / best["final_only"]
    speedup_min = sum(best[f"truncated_{b}"] for b in range(1, depth + 1)) / best["all_blocks"]

    print(
        f"device: {jax.devices()[0].platform} x{jax.device_count()}  model: {args.variant} depth {depth} width "
        f"{cfg.width}  batch {args.batch} x {args.img}x{args.img}x{args.channels}  repeats {args.repeats}"
    )
    print(f"{'program':<26}{'median s':>12}{'crops/s':>12}{'compile s':>12}")
    for name in ("all_blocks", "final_only", *[k for k in med if k.startswith("torch_")]):
        label = {
            "torch_forward": "PyTorch reference (eager)",
            "torch_forward_compile": "PyTorch reference (compile)",
        }.get(name, name)
        print(f"{label:<26}{med[name]:>12.4f}{args.batch / med[name]:>12.1f}{compile_s[name]:>12.2f}")
    print(
        f"{'truncated 1..' + str(depth) + ' (sum)':<26}{truncated_total:>12.4f}"
        f"{args.batch / truncated_total:>12.1f}{sum(compile_s[f'truncated_{b}'] for b in range(1, depth + 1)):>12.2f}"
    )
    print(f"all blocks / final block only: {ratio:.3f} by medians, {ratio_min:.3f} by minima (target <= 1.05)")
    print(
        f"speed-up over truncated re-runs per block: {speedup:.2f}x by medians, {speedup_min:.2f}x by minima "
        f"(ideal (depth+1)/2 = {(depth + 1) / 2:.1f}x)"
    )
    torch_meds = [v for k, v in med.items() if k.startswith("torch_")]
    vs_torch = min(torch_meds) / med["all_blocks"] if torch_meds else None
    if vs_torch is not None:
        print(
            f"every-block extraction vs the faster PyTorch reference forward (final block only): {vs_torch:.2f}x "
            f"by medians"
        )
    if torch_note:
        print(f"note: {torch_note}")
    print(f"max |single-pass last block - final-only| = {err:.2e}")
    result = {
        "device": jax.devices()[0].platform,
        "device_count": jax.device_count(),
        "variant": args.variant,
        "depth": depth,
        "width": cfg.width,
        "batch": args.batch,
        "img": args.img,
        "channels": args.channels,
        "repeats": args.repeats,
        "median_s": med,
        "compile_s": compile_s,
        "truncated_total_s": truncated_total,
        "all_over_final_ratio": ratio,
        "speedup_over_truncated": speedup,
        "all_over_final_ratio_min": ratio_min,
        "speedup_over_truncated_min": speedup_min,
        "min_s": best,
        "max_abs_diff_last_block": err,
        "times_s": times,
        "all_blocks_vs_torch": vs_torch,
        "torch_note": torch_note,
    }
    if args.probe_samples:
        result["probe"] = _bench_probes(depth, cfg.width, args.probe_samples, args.probe_classes)
    from vitally_jax.fileio import write_text

    write_text(args.json, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
