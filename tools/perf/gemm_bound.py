"""The matmul floor of the CPU benchmarks: every matmul of our compiled program, timed alone through XLA:CPU and
through PyTorch's MKL, next to both whole programs measured in the same run.

    python tools/perf/gemm_bound.py                         # the train step: S/16, 128 px, batch 8 (bench_all's)
    python tools/perf/gemm_bound.py --job=forward --batch=32    # the every-block embedding pass, one CPU slice

The matmuls are read from the jaxpr of our program (`dot_generals`): every `dot_general`, forward and backward,
counted as often as it runs (a layer scan of 12 blocks counts its body's matmuls 12 times). Each distinct matmul
is timed alone three ways, in `--passes` interleaved passes of `--repeats` calls each (the median over passes of
each pass's median):

- XLA as in the program: `lax.dot_general` with the program's operand shapes and dimension numbers (any transpose
  copy XLA inserts for that layout is included, as it is in the program);
- XLA (B, M, K) x (B, K, N): the same arithmetic on operands already in row-major matmul layout;
- MKL (B, M, K) x (B, K, N): `torch.matmul` on those operands in the torch venv (`VITALLY_TORCH_PYTHON`), 2
  threads by default; PyTorch's own step passes MKL transposed views, which costs it nothing.

The sums, times the counts, are what the program's matmuls alone cost on each library. The whole programs run
side by side in the same process pair: ours (the trainer's jitted step / the every-block pass) and the PyTorch
reference (`tools/goldens/torch_reference.py`: eager step, or under torch.compile with `--torch-compile` / inference
forward, all in float32). The last line is
the bound that follows: even if every op other than a matmul cost nothing in our program, ours could be at most
(PyTorch's whole program) / (our matmuls alone) as fast as PyTorch, where "our matmuls alone" takes, per matmul,
the faster of XLA's two ways (the bound is the most generous to us). XLA runs `INNER` matmuls per call in one
compiled loop, so its figures carry no per-call dispatch cost; PyTorch's eager calls carry theirs (microseconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
from collections import Counter

import _shared


def _subjaxprs(params: dict):
    """The jaxprs nested in an equation's params (pjit, scan, checkpoint, custom_jvp/vjp, cond branches)."""
    for v in params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def dot_generals(jaxpr, count: int = 1, out: Counter | None = None, notes: set | None = None) -> Counter:
    """Counter {(lhs shape, rhs shape, dimension_numbers, lhs dtype, rhs dtype): times it runs} over a (closed)
    jaxpr, recursing into nested jaxprs; a scan's body counts `length` times. A while loop's body counts once (its
    trip count is not static) and a cond's branches each count, both noted in `notes`."""
    out = Counter() if out is None else out
    jaxpr = jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") and not hasattr(jaxpr, "eqns") else jaxpr
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            dims = eqn.params["dimension_numbers"]
            key = (tuple(lhs.shape), tuple(rhs.shape), _freeze(dims), str(lhs.dtype), str(rhs.dtype))
            out[key] += count
            continue
        mult = count * int(eqn.params["length"]) if name == "scan" else count
        if notes is not None and name in ("while", "cond"):
            notes.add(f"{name}: body counted once per run" if name == "while" else "cond: every branch counted")
        for sub in _subjaxprs(eqn.params):
            dot_generals(sub, mult, out, notes)
    return out


def _freeze(x):
    return tuple(_freeze(i) for i in x) if isinstance(x, (tuple, list)) else int(x)


def canonical(key) -> dict:
    """(B, M, K, N) of a dot_general key: batch, lhs free, contracting and rhs free sizes; flops = 2 B M K N."""
    lhs, rhs, ((lc, rc), (lb, rb)), _, _ = key
    prod = lambda dims, shape: math.prod(shape[d] for d in dims)  # noqa: E731
    b, k = prod(lb, lhs), prod(lc, lhs)
    m = math.prod(lhs) // (b * k)
    n = math.prod(rhs) // (prod(rb, rhs) * prod(rc, rhs))
    return {"b": b, "m": m, "k": k, "n": n, "flops": 2 * b * m * k * n}


INNER = 8  # matmuls per XLA call: one dispatch runs this many in a loop, so the figure is the matmul, not the call


def _looped(matmul, inner: int = INNER):
    """jit of `inner` dependent runs of matmul(x, y) in one program: each run's lhs is the previous lhs plus 0 x one
    element of its product, so XLA can neither hoist the matmul out of the loop nor drop a run (x + 0 * v is not
    simplified away under IEEE semantics); the extra elementwise pass over the lhs is 1/N of the matmul's work."""
    import jax

    def body(x, y):
        return x + 0.0 * matmul(x, y).reshape(-1)[0].astype(x.dtype)

    return jax.jit(lambda x, y: jax.lax.fori_loop(0, inner, lambda i, xx: body(xx, y), x))


def _xla_cases(key):
    """-> (run as in the program, run as (B, M, K) x (B, K, N)): zero-argument callables, compiled and warm, each
    running `INNER` matmuls in one call."""
    import jax
    import jax.numpy as jnp

    lhs, rhs, dims, ldt, rdt = key
    c = canonical(key)
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = jax.random.normal(ka, lhs, ldt), jax.random.normal(kb, rhs, rdt)
    a2 = jax.random.normal(ka, (c["b"], c["m"], c["k"]) if c["b"] > 1 else (c["m"], c["k"]), ldt)
    b2 = jax.random.normal(kb, (c["b"], c["k"], c["n"]) if c["b"] > 1 else (c["k"], c["n"]), rdt)
    f = _looped(lambda x, y: jax.lax.dot_general(x, y, dims))
    g = _looped(jnp.matmul)
    runs = (lambda: jax.block_until_ready(f(a, b)), lambda: jax.block_until_ready(g(a2, b2)))
    for r in runs:
        r()
    return runs


def _time_mkl(cases: list[dict], repeats: int, threads: int) -> tuple[list[float] | None, str | None]:
    """-> (median ms of each case through torch.matmul, None) or (None, why not); needs the torch venv."""
    spec = {"gemms": [{k: c[k] for k in "bmkn"} for c in cases], "repeats": repeats, "threads": threads}
    r = subprocess.run(
        [_shared.TORCH_PY, str(_shared.TORCH_REFERENCE), "--gemms", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=_shared.ROOT,
    )
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(r.stdout.strip().splitlines()[-1])["ms"], None


def _program(args):
    """-> (jaxpr of our program, run() timing one call of it, torch worker spec, torch command, label)."""
    import jax
    import numpy as np

    if args.job == "train":
        run, state, _, mae_cfg = _shared.build_jax_step(
            args.variant, args.batch, args.crop, depth=args.depth, micro_batch=args.micro_batch
        )
        box = [state]

        def once():
            box[0], _ = run(box[0])

        jaxpr = run.trace(state)
        spec = {
            "variant": args.variant,
            "img": args.crop,
            "batch": args.batch,
            "chans": mae_cfg.encoder.in_chans,
            "mask_ratio": mae_cfg.mask_ratio,
            "dec_width": mae_cfg.decoder_width,
            "dec_depth": mae_cfg.decoder_depth,
            "dec_heads": mae_cfg.decoder_heads,
            "threads": args.threads,
            **({"depth": args.depth} if args.depth else {}),
        }
        label = (
            f"MAE train step {args.variant}, {args.crop} px, batch {args.batch} (slices: {run.micro_batch or 'none'})"
        )
        return jaxpr, once, spec, "compile" if args.torch_compile else "eager", label
    from flax import nnx

    from vitally_jax.embedding import blocks as blocks_lib
    from vitally_jax.models.vit import ViTEncoder, vit_config

    over = {"depth": args.depth} if args.depth else {}
    cfg = vit_config(args.variant, img_size=args.crop, in_chans=6, **over)
    graphdef, state = nnx.split(ViTEncoder(cfg, rngs=nnx.Rngs(0)))
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.crop, args.crop, 6), dtype=np.uint8)
    every = tuple(range(1, cfg.depth + 1))
    poolings = ("cls_norm", "mean_norm")
    f = jax.jit(lambda s, x: blocks_lib._forward(graphdef, s, x, blocks=every, poolings=poolings))
    jaxpr = jax.make_jaxpr(f)(state, images)
    spec = {"variant": args.variant, "img": args.crop, "batch": args.batch, "chans": 6, "threads": args.threads}
    spec.update({"depth": args.depth} if args.depth else {})
    label = f"every-block forward {args.variant}, {args.crop} px, batch {args.batch} (one pass, no slices)"
    return jaxpr, lambda: jax.block_until_ready(f(state, images)), spec, "forward", label


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=("train", "forward"), default="train")
    p.add_argument("--variant", default="S/16")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--depth", type=int, default=None, help="encoder depth (default: the variant's)")
    p.add_argument("--micro_batch", type=int, default=None, help="train: input.micro_batch (default: automatic)")
    p.add_argument("--repeats", type=int, default=10, help="calls per matmul timing")
    p.add_argument("--passes", type=int, default=3, help="interleaved passes over the matmuls")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the whole programs")
    p.add_argument("--threads", type=int, default=2, help="PyTorch's thread count")
    p.add_argument("--torch-compile", action="store_true", help="train: PyTorch's whole step under torch.compile")
    p.add_argument("--json", default="bench_out/gemm_bound.json")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from vitally_jax.cli import setup_compilation_cache
    from vitally_jax.fileio import atomic_path

    setup_compilation_cache()
    load0 = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    jaxpr, once, spec, cmd, label = _program(args)
    notes: set = set()
    dots = dot_generals(jaxpr, notes=notes)
    cases, runs = [], []
    for key, n in sorted(dots.items(), key=lambda kv: -canonical(kv[0])["flops"] * kv[1]):
        c = canonical(key)
        c.update(count=n, lhs=list(key[0]), rhs=list(key[1]), dims=key[2], dtype=key[3])
        cases.append(c)
        runs.append(_xla_cases(key))
    # `--passes` interleaved passes over every matmul (XLA both ways, then MKL); per matmul, the median over passes
    # of each pass's median, so a burst of load on a shared host moves one pass, not the figure
    why = _shared.torch_available()  # None: the torch venv imports torch and timm (checked once: it takes seconds)
    xla, xla_nn, mkl = [], [], []
    for _ in range(args.passes):
        xla.append([_shared.median_s(r[0], args.repeats, warmup=0) * 1e3 / INNER for r in runs])
        xla_nn.append([_shared.median_s(r[1], args.repeats, warmup=0) * 1e3 / INNER for r in runs])
        if why is None:
            ms, why = _time_mkl(cases, args.repeats, args.threads)
            if ms is not None:
                mkl.append(ms)
    for i, c in enumerate(cases):
        c["xla_ms"] = statistics.median(p[i] for p in xla)
        c["xla_nn_ms"] = statistics.median(p[i] for p in xla_nn)
        c["xla_best_ms"] = min(c["xla_ms"], c["xla_nn_ms"])
        if mkl:
            c["mkl_ms"] = statistics.median(p[i] for p in mkl)

    # the whole programs, interleaved rounds
    worker = _shared.TorchWorker(spec) if why is None else None
    ours, theirs = [], []
    once()
    try:
        for _ in range(args.rounds):
            ours += _shared.timed(once, 2)
            if worker is not None and why is None:
                r = worker.run(cmd, 2)
                theirs += r.get("times", [])
                why = r.get("error")  # a failed PyTorch program (e.g. torch.compile) is named, not dropped
    finally:
        if worker is not None:
            worker.close()

    total = lambda k: sum(c[k] * c["count"] for c in cases) / 1e3 if all(k in c for c in cases) else None  # noqa: E731
    res = {
        "job": label,
        "load_start": load0,
        "load_end": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"],
        "distinct": len(cases),
        "calls": sum(c["count"] for c in cases),
        "gflop": sum(c["flops"] * c["count"] for c in cases) / 1e9,
        "xla_s": total("xla_ms"),
        "xla_nn_s": total("xla_nn_ms"),
        "xla_best_s": total("xla_best_ms"),
        "mkl_s": total("mkl_ms"),
        "ours_s": statistics.median(ours),
        "ours_all": ours,
        "torch_s": statistics.median(theirs) if theirs else None,
        "torch_all": theirs,
        "torch_cmd": cmd,
        "torch_note": why,
        "notes": sorted(notes),
        "cases": cases,
    }
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pathlib.Path(tmp).write_text(json.dumps(res, indent=1))
    print_report(res)
    return 0


def print_report(res: dict) -> None:
    fmt = lambda v, f="{:.3f} s": "n/a" if v is None else f.format(v)  # noqa: E731
    print(f"{res['job']}; load {' '.join(res['load_start'])} -> {' '.join(res['load_end'])}")
    print(f"matmuls: {res['distinct']} distinct, {res['calls']} calls, {res['gflop']:.1f} GFLOP")
    print(f"{'B x M x K x N':>24} {'calls':>5} {'XLA ms':>8} {'XLA NN ms':>9} {'MKL ms':>8} {'XLA/MKL':>8}")
    for c in res["cases"][:12]:
        mkl = c.get("mkl_ms")
        ratio = f"{c['xla_ms'] / mkl:7.2f}x" if mkl else "n/a"
        shape = f"{c['b']}x{c['m']}x{c['k']}x{c['n']}"
        print(
            f"{shape:>24} {c['count']:5d} {c['xla_ms']:8.2f} {c['xla_nn_ms']:9.2f} {fmt(mkl, '{:8.2f}'):>8} {ratio:>8}"
        )
    if len(res["cases"]) > 12:
        print(f"  ... {len(res['cases']) - 12} more in the JSON")
    x, xnn, best, mkl = res["xla_s"], res["xla_nn_s"], res["xla_best_s"], res["mkl_s"]
    print(
        f"matmuls alone: XLA as in the program {fmt(x)}, XLA row-major {fmt(xnn)}, XLA's best (the faster of the two "
        f"per matmul) {fmt(best)}; MKL {fmt(mkl)}"
        + (f" ({best / mkl:.2f}x faster than XLA's best)" if mkl else f" ({res['torch_note']})")
    )
    print(f"whole program: ours {fmt(res['ours_s'])}, PyTorch ({res['torch_cmd']}) {fmt(res['torch_s'])}", end="")
    print(f", ours/PyTorch speed {res['torch_s'] / res['ours_s']:.2f}x" if res["torch_s"] else "")
    print(f"XLA's best matmul time is {best / res['ours_s']:.0%} of our program's time", end="")
    if res["torch_s"]:
        print(f"; with every other op free, ours could reach at most {res['torch_s'] / best:.2f}x PyTorch's speed")
    else:
        print()
    for n in res["notes"]:
        print(f"note: {n}")


if __name__ == "__main__":
    sys.exit(main())
