"""Where the MAE train step spends its time on this CPU, ours and the PyTorch reference's, by ablation.

    python tools/perf/profile_train_step.py                     # S/16, 128 px, batch 8 (the bench_all.py size)
    python tools/perf/profile_train_step.py --variant=B/16 --crop=256 --batch=32

Each side is timed as the full step and with the MAE decoder cut from 8 blocks to 1, so the difference is the
cost of 7 decoder blocks (pre-norm, width 512, 16 heads, all tokens); ours is also timed without the Fourier loss
(its FFTs), with attention as one `jax.nn.dot_product_attention` op instead of the CPU default's head groups, and
with `model.remat='none'` instead of the CPU default 'dots_saveable' (`vitally_jax.train.auto_remat`).
Medians of `--steps` steps after two warm-up steps; the PyTorch side runs eagerly in the torch venv
(`VITALLY_TORCH_PYTHON`, see `tools/perf/_shared.py`) with `--threads` threads (default 2), after ours.

One core for both sides (XLA's matmuls single-threaded, PyTorch with 1 thread):

    taskset -c 0 env XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python tools/perf/profile_train_step.py --threads=1

A second table times the decoder block's non-matmul kernels at the step's own shapes (GELU over the MLP hidden
activations, forward and forward+backward; LayerNorm over the block width; softmax over attention rows) and a
2048^3 float32 matmul, ours (XLA:CPU) against PyTorch at 1 and 2 threads: it shows which kernels use both cores.
Prints both tables; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import _shared


def _star(f):
    """f(*x) as a one-argument function (the kernel table calls every kernel with one input)."""
    return lambda x: f(*x)


def _ours(variant: str, batch: int, crop: int, steps: int, **kw) -> float:
    run, state, _, _ = _shared.build_jax_step(variant, batch, crop, **kw)
    box = [state]

    def step():
        box[0], _ = run(box[0])

    return _shared.median_s(step, steps, warmup=2)


def _torch(variant: str, batch: int, crop: int, steps: int, dec_depth: int, threads: int = 2) -> float | None:
    if _shared.torch_available() is not None:
        return None
    w = _shared.TorchWorker(
        {
            "variant": variant,
            "img": crop,
            "batch": batch,
            "chans": 6,
            "mask_ratio": 0.75,
            "dec_width": 512,
            "dec_depth": dec_depth,
            "dec_heads": 16,
            "threads": threads,
        }
    )
    try:
        out = w.run("eager", steps)
    finally:
        w.close()
    return statistics.median(out["times"]) if "times" in out else None


def kernel_spec(variant: str, batch: int, crop: int, repeats: int) -> dict:
    """The decoder's kernel shapes for this step: rows = batch x tokens (patches + CLS)."""
    from vitally_jax.models.mae import mae_config

    cfg = mae_config(variant, img_size=crop)
    tokens = (crop // cfg.encoder.patch_size) ** 2 + 1
    return {
        "rows": batch * tokens,
        "width": cfg.decoder_width,
        "hidden": 4 * cfg.decoder_width,
        "tokens": tokens,
        "heads": cfg.decoder_heads,
        "repeats": repeats,
    }


def jax_kernel_cases(spec: dict) -> dict:
    """name -> zero-argument callable running a jitted kernel to completion (same cases as the torch side)."""
    import jax
    import jax.numpy as jnp

    from vitally_jax.models.layers import attention, layer_norm

    k = jax.random.split(jax.random.key(0), 7)
    hid = jax.random.normal(k[0], (spec["rows"], spec["hidden"]))
    act = jax.random.normal(k[1], (spec["rows"], spec["width"]))
    scores = jax.random.normal(k[2], (spec["rows"] // spec["tokens"] * spec["heads"] * spec["tokens"], spec["tokens"]))
    a = jax.random.normal(k[3], (2048, 2048))
    ones, zeros = jnp.ones(spec["width"]), jnp.zeros(spec["width"])
    b, t, n = spec["rows"] // spec["tokens"], spec["tokens"], spec["heads"]
    qkv = tuple(jax.random.normal(kk, (b, t, n, spec["width"] // n)) for kk in jax.random.split(k[4], 3))
    qb = jax.random.normal(k[5], (b * n, t, spec["width"] // n))

    def attn_fwd_bwd(impl):
        return jax.jit(jax.grad(lambda *x: jnp.sum(attention(*x, impl)), argnums=(0, 1, 2)))

    fns = {
        "gelu": (jax.jit(lambda x: jax.nn.gelu(x, approximate=False)), hid),
        "gelu_fwd_bwd": (jax.jit(jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=False)))), hid),
        "layer_norm": (jax.jit(lambda x: layer_norm(x, ones, zeros, 1e-6)), act),
        "softmax": (jax.jit(lambda x: jax.nn.softmax(x, axis=-1)), scores),
        "attention_fwd_bwd": (_star(attn_fwd_bwd(None)), qkv),  # CPU default: head groups
        "attention_unfused_fwd_bwd": (_star(attn_fwd_bwd("xla")), qkv),  # one XLA op
        "batched_qk": (jax.jit(lambda x: jnp.einsum("bqh,bkh->bqk", x, x)), qb),
        # the MLP's three GEMMs (forward, input grad, weight grad): X @ W1, G @ W1^T, X^T @ G
        "mlp_gemms": (
            jax.jit(lambda xs: (xs[0] @ xs[1], xs[2] @ xs[1].T, xs[0].T @ xs[2])),
            (act, jax.random.normal(k[6], (spec["width"], spec["hidden"])), hid),
        ),
        "matmul_2048": (jax.jit(lambda x: x @ x), a),
    }
    return {name: (lambda f=f, x=x: jax.block_until_ready(f(x))) for name, (f, x) in fns.items()}


def kernels(spec: dict) -> dict:
    """{"ours": {kernel: ms}, "torch_1": {...} | None, "torch_2": {...} | None}, medians of spec["repeats"]."""
    out = {"ours": {}, "torch_1": None, "torch_2": None}
    for name, fn in jax_kernel_cases(spec).items():
        out["ours"][name] = _shared.median_s(fn, spec["repeats"]) * 1e3
    t, reason = _shared.torch_kernels(spec)
    if t is not None:
        out["torch_1"], out["torch_2"] = t["1"], t["2"]
    if reason is not None:
        print(f"PyTorch kernels not measured: {reason}", file=sys.stderr)
    return out


def print_kernels(spec: dict, k: dict) -> None:
    print(
        f"decoder kernels at rows {spec['rows']}, width {spec['width']}, hidden {spec['hidden']}, "
        f"{spec['heads']} heads x {spec['tokens']} tokens (median ms of {spec['repeats']})"
    )
    print(
        "attention: ours = head groups (the CPU default) / one XLA op (unfused); PyTorch = SDPA (fused) / "
        "matmul-softmax-matmul (unfused)"
    )
    print(
        f"{'kernel':<26} {'ours':>9} {'torch 1 thr':>12} {'torch 2 thr':>12} {'torch 1/2 thr':>14} {'ours/torch 2':>13}"
    )
    for name, ms in k["ours"].items():
        t1 = k["torch_1"][name] if k["torch_1"] else float("nan")
        t2 = k["torch_2"][name] if k["torch_2"] else float("nan")
        print(f"{name:<26} {ms:9.2f} {t1:12.2f} {t2:12.2f} {t1 / t2:13.2f}x {ms / t2:12.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="S/16")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="PyTorch's thread count")
    p.add_argument("--kernel-repeats", type=int, default=20, help="0 skips the kernel table")
    p.add_argument("--kernels-only", action="store_true", help="only the kernel table (no step ablation)")
    p.add_argument("--json", default="bench_out/profile_train_step.json")
    args = p.parse_args(argv)
    import os

    from vitally_jax.cli import setup_compilation_cache

    setup_compilation_cache()
    print(
        f"{args.variant}, {args.crop} px, batch {args.batch}; PyTorch {args.threads} thread(s), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {len(os.sched_getaffinity(0))} core(s) allowed"
    )
    result = {"config": vars(args)}
    if not args.kernels_only:
        result["seconds"] = step_ablation(args)
    if args.kernel_repeats:
        spec = kernel_spec(args.variant, args.batch, args.crop, args.kernel_repeats)
        result["kernels_ms"] = kernels(spec)
        print_kernels(spec, result["kernels_ms"])
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


def step_ablation(args) -> dict:
    """Time the step variants on both sides and print the ablation table; -> seconds per variant."""
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
    r["ours_xla_attention"] = _ours(*a, attention_impl="xla")  # one dot_product_attention op, not head groups
    r["ours_remat_none"] = _ours(*a, remat="none")  # every intermediate stored, not the CPU default dots_saveable
    r["torch_full"], r["torch_decoder_1"] = _torch(*a, 8, args.threads), _torch(*a, 1, args.threads)

    def row(name, full, dec1, extra=""):
        if full is None:
            print(f"{name:<18} not available (torch venv missing)")
            return
        print(f"{name:<18} {full:8.3f} {dec1:8.3f} {full - dec1:10.3f} {(full - dec1) / 7:10.3f} {extra}")

    print(f"train step, median of {args.steps} steps (seconds)")
    print(f"{'':<18} {'full':>8} {'dec 1':>8} {'7 dec blk':>10} {'per block':>10}")
    row("ours (JAX)", r["ours_full"], r["ours_decoder_1"], f"FFTs {r['ours_full'] - r['ours_no_fourier']:.3f} s")
    row("PyTorch eager", r["torch_full"], r["torch_decoder_1"])
    print(
        f"ours with attention as one XLA op (attention_impl='xla') instead of head groups: full step "
        f"{r['ours_xla_attention']:.3f} s ({r['ours_xla_attention'] / r['ours_full']:.2f}x the default's time)"
    )
    print(
        f"ours with model.remat='none' (every intermediate stored) instead of the CPU default 'dots_saveable': full "
        f"step {r['ours_remat_none']:.3f} s ({r['ours_remat_none'] / r['ours_full']:.2f}x the default's time)"
    )
    if r["torch_full"] is not None:
        print(
            f"ours / PyTorch: full step {r['torch_full'] / r['ours_full']:.2f}x, decoder blocks "
            f"{(r['torch_full'] - r['torch_decoder_1']) / (r['ours_full'] - r['ours_decoder_1']):.2f}x, "
            f"everything else {r['torch_decoder_1'] / r['ours_decoder_1']:.2f}x (> 1: ours faster)"
        )
    return r


if __name__ == "__main__":
    sys.exit(main())
