"""Run every CPU benchmark, side by side in one run; print the figures and write them into docs/performance.md.

    python tools/perf/bench_all.py                     # ~40-60 min on an idle 2-core host (the 256 px step dominates)
    python tools/perf/bench_all.py --only=train128,embed --no-doc   # a subset, docs untouched

Each benchmark runs as its own process (fresh JAX runtime, its own time limit) and writes its JSON to bench_out/.
The summary (machine: CPU model, cores, SIMD flags; load at start and end; date; every figure with its median and
min-max over rounds) is printed, saved as bench_out/summary.json, and written between the markers
`<!-- bench_all:begin -->` and `<!-- bench_all:end -->` of docs/performance.md, so no figure there is typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

from vitally_jax.metrics import host

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "bench_out"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench_all:begin -->", "<!-- bench_all:end -->"
BENCHES = {
    # MAE train step vs the PyTorch reference (eager), S/16 at 128 px, batch 8, 3 interleaved rounds of 2 steps
    "train128": [
        "tools/perf/bench_train.py",
        "--variants=S/16",
        "--crop=128",
        "--batch=8",
        "--rounds=3",
        "--steps=2",
        "--no-torch-compile",
        f"--json={OUT}/train128.json",
    ],
    # the full-size step: S/16 at 256 px, batch 32, against eager PyTorch and torch.compile, 2 interleaved rounds
    "train256": [
        "tools/perf/bench_train.py",
        "--variants=S/16",
        "--crop=256",
        "--batch=32",
        "--rounds=2",
        "--steps=1",
        f"--json={OUT}/train256.json",
    ],
    # whole-screen embedding end to end vs the PyTorch DataLoader reference (every block, last block only)
    "embed": ["tools/perf/bench_embed.py", "--rounds=3", f"--json={OUT}/embed.json"],
    # the matmul floor: every matmul of our program alone, XLA:CPU vs MKL, next to both whole programs
    "gemm_train128": [
        "tools/perf/gemm_bound.py",
        "--job=train",
        "--crop=128",
        "--batch=8",
        f"--json={OUT}/gemm_train128.json",
    ],
    "gemm_forward": ["tools/perf/gemm_bound.py", "--job=forward", "--batch=32", f"--json={OUT}/gemm_forward.json"],
    # the 256 px step's matmul floor against torch.compile (fewer repeats: one step is ~15 s on 2 cores)
    "gemm_train256": [
        "tools/perf/gemm_bound.py",
        "--job=train",
        "--crop=256",
        "--batch=32",
        "--torch-compile",
        "--repeats=3",
        "--passes=2",
        "--rounds=2",
        f"--json={OUT}/gemm_train256.json",
    ],
    # inference: every-block extraction vs final block only vs the PyTorch reference forward (+ linear probes)
    "infer": ["tools/perf/bench_probe.py", "--repeats=3", "--json", f"{OUT}/infer.json"],
    "data": [
        "tools/perf/bench_data.py",
        "--images=64",
        "--store-images=16",
        "--batches=6",
        "--threads",
        "1",
        "4",
        f"--json={OUT}/data.json",
    ],
    "maps": ["tools/perf/bench_maps.py", "--genes=2000", "--skip-genome", f"--out={OUT}/maps.json"],
    "curation": [
        "tools/perf/bench_curation.py",
        "--wells=20000",
        "--perturbations=200",
        "--quick",
        "--permutations=200",
        f"--json={OUT}/curation.json",
    ],
}
LIMITS = {"train256": 3600}


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"


def run_one(name: str, limit_s: int) -> dict:
    t = time.perf_counter()
    limit_s = max(limit_s, LIMITS.get(name, 0))
    print(f"running {name} (limit {limit_s} s) ...", file=sys.stderr, flush=True)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        r = subprocess.run(
            [sys.executable, *BENCHES[name]], cwd=ROOT, capture_output=True, text=True, timeout=limit_s, env=env
        )
        rc, out = (
            r.returncode,
            r.stdout + ("\n" + r.stderr.strip().splitlines()[-1] if r.returncode and r.stderr.strip() else ""),
        )
    except subprocess.TimeoutExpired as e:
        rc, out = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    return {"name": name, "rc": rc, "wall_s": round(time.perf_counter() - t, 1), "tail": out.strip().splitlines()[-12:]}


def _read(name: str, since: float) -> dict | None:
    """bench_out/NAME.json if this run wrote it (modified after `since`, a time.time())."""
    path = OUT / f"{name}.json"
    try:
        return json.loads(path.read_text()) if path.stat().st_mtime >= since else None
    except (OSError, ValueError):
        return None


def _mm(d: dict) -> str:
    return f"{d['median']:.2f} s ({d['min']:.2f}-{d['max']:.2f})"


def _x(ratio) -> str:
    return f"**{ratio:.2f}x**" if ratio else "n/a"


def summary_lines(info: dict, rows: list[dict]) -> list[str]:
    """The markdown summary of one run: machine, load, date, then every figure from the benchmarks' JSON."""
    m = info["machine"]
    lines = [
        f"Measured by `{info['command']}` on {info['date']} (UTC): {m['cpu']}, {m['cores']} cores, SIMD "
        f"{' '.join(m['simd']) or '?'}; load average {info['load_start']} at the start, {info['load_end']} at "
        f"the end; {info['wall_s'] / 60:.0f} min. Each pair of figures is measured side by side in one process "
        "(rounds interleaved); times are medians with the min-max over rounds in brackets; ratios are of medians "
        "(> 1: ours is faster).",
        "",
    ]
    ran = {r["name"]: r for r in rows}
    train_rows = []
    for name in ("train128", "train256"):
        data = _read(name, info["started"]) if name in ran and ran[name]["rc"] == 0 else None
        for r in (data or {}).get("rows", []):
            st = r.get("step_s", {})
            if "jax" not in st:
                continue
            eager, comp = st.get("torch_eager"), st.get("torch_compile")
            mb = r.get("micro_batch", 0)
            acc = f" ({r['batch'] // mb} slices of {mb})" if mb else ""
            train_rows.append(
                f"| {r['variant']}, {r['crop']} px, batch {r['batch']}{acc} | {_mm(st['jax'])} | "
                f"{_mm(eager) if eager else 'n/a'} | {_mm(comp) if comp else 'not run'} | "
                f"{_x(r.get('speedup_vs_torch_eager'))} | {_x(r.get('speedup_vs_torch_compile'))} | "
                f"{100 * r['mfu']:.0f}% of {r['matmul_flops'] / 1e9:.0f} GFLOP/s |"
            )
    if train_rows:
        lines += [
            "MAE train step (`tools/perf/bench_train.py`: the trainer's jitted update, with the gradient accumulation "
            "it chooses on a CPU (a row names its slices; `--micro_batch=0` times the whole batch at once), vs the "
            "PyTorch reference, "
            "timm 0.9.7 encoder + MAE decoder + the same loss + Lion, 2 threads each; CPU MFU = analytic matmul "
            "FLOPs / step time / a 2048^3 float32 matmul measured in the same process):",
            "",
            "| step | ours | PyTorch eager | torch.compile | vs eager | vs torch.compile | CPU MFU (ours) |",
            "|---|---|---|---|---|---|---|",
            *train_rows,
            "",
        ]
    e = _read("embed", info["started"]) if "embed" in ran and ran["embed"]["rc"] == 0 else None
    if e and "seconds" in e:
        sec, cps = e["seconds"], e["crops_per_s"]
        lines += [
            f"Whole-screen embedding end to end (`tools/perf/bench_embed.py`: {e['variant']}, {e['crops']} crops of "
            f"{e['crop']} px, batch {e['batch']}; ours: store -> tiles -> every block in one pass -> per-image mean "
            "in zarr -> per-well mean; PyTorch: a DataLoader over the same pixels, the timm encoder, per-well mean):",
            "",
            "| job | crops/s | seconds |",
            "|---|---|---|",
            *[f"| {k.replace('_', ' ')} | {cps[k]:.1f} | {_mm(sec[k])} |" for k in sec],
            "",
        ]
        if "ratio_vs_torch_every_block" in e:
            lines += [
                f"Ours (every block) vs PyTorch every block: **{e['ratio_vs_torch_every_block']:.2f}x**; vs PyTorch "
                f"last block only: **{e['ratio_vs_torch_last_block']:.2f}x**.",
                "",
            ]
        if "ratio_sliced_vs_whole_batch" in e:
            lines += [
                f"Ours in cache-sized slices (micro_batch {e.get('micro_batch', 'auto')}) vs the whole batch of "
                f"{e['batch']} at once: **{e['ratio_sliced_vs_whole_batch']:.2f}x**.",
                "",
            ]
    bound_rows = []
    for name in ("gemm_train128", "gemm_train256", "gemm_forward"):
        g = _read(name, info["started"]) if name in ran and ran[name]["rc"] == 0 else None
        if not g or not g.get("mkl_s") or not g.get("torch_s"):
            continue
        vs = " vs torch.compile" if g.get("torch_cmd") == "compile" else ""
        bound_rows.append(
            f"| {g['job']}{vs} | {g['calls']} ({g['gflop']:.0f} GFLOP) | {g['xla_s']:.3f} s | {g['xla_nn_s']:.3f} s | "
            f"{g['xla_best_s']:.3f} s | {g['mkl_s']:.3f} s | {g['xla_best_s'] / g['mkl_s']:.2f}x | "
            f"{g['ours_s']:.3f} s | {g['torch_s']:.3f} s | {g['xla_best_s'] / g['ours_s']:.0%} | "
            f"**{g['torch_s'] / g['xla_best_s']:.2f}x** |"
        )
    if bound_rows:
        lines += [
            "The matmul floor (`tools/perf/gemm_bound.py`: every matmul of our program, read from its jaxpr and "
            "counted as often as it runs, timed alone through XLA:CPU as in the program, through XLA on row-major "
            "(B, M, K) x (B, K, N) operands (XLA's best: the faster of the two per matmul), and through PyTorch's "
            "MKL; the whole programs measured in the same run; the bound is PyTorch's whole program over XLA's best "
            "matmul time, the most ours could reach if every other op were free):",
            "",
            "| program | matmul calls | XLA as in program | XLA row-major | XLA's best | MKL | MKL faster by | "
            "ours whole | PyTorch whole | XLA's best / ours | bound vs PyTorch |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *bound_rows,
            "",
        ]
    for r in rows:
        if r["name"] in ("infer", "data", "maps", "curation"):
            lines += [f"`{r['name']}` (rc {r['rc']}, {r['wall_s']:.0f} s), its last lines:", "", "```"]
            lines += [ln for ln in r["tail"][-8:]] + ["```", ""]
    failed = [f"{r['name']} (rc {r['rc']})" for r in rows if r["rc"]]
    if failed:
        lines += [f"Failed or timed out in this run: {', '.join(failed)}.", ""]
    return lines


def write_doc_section(lines: list[str], doc: pathlib.Path = DOC) -> None:
    """Replace the text between the bench_all markers of `doc` (atomic rewrite)."""
    from vitally_jax.errors import ConfigError
    from vitally_jax.fileio import write_text

    text = doc.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ConfigError(f"{doc}: expected one '{BEGIN}' line followed by one '{END}' line")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text(doc, head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(BENCHES))
    p.add_argument("--limit_s", type=int, default=1200, help="time limit per benchmark (train256: at least 3600)")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/performance.md")
    args = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    info = {
        "command": "python tools/perf/bench_all.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": host(),
        "load_start": _load(),
        "started": time.time(),
    }
    rows = [run_one(n.strip(), args.limit_s) for n in args.only.split(",")]
    info.update(load_end=_load(), wall_s=time.perf_counter() - t0)
    lines = summary_lines(info, rows)
    from vitally_jax.fileio import atomic_path

    with atomic_path(OUT / "summary.json") as tmp:
        pathlib.Path(tmp).write_text(json.dumps({**info, "rows": rows, "summary": lines}, indent=1))
    for r in rows:
        print(f"=== {r['name']} (rc {r['rc']}, {r['wall_s']} s)")
        print("\n".join(r["tail"]))
    print()
    print("\n".join(lines))
    if not args.no_doc:
        write_doc_section(lines)
        print(f"wrote the figures into {DOC.relative_to(ROOT)}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
