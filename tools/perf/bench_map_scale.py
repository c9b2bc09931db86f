"""mAP at scale: our blocked AP vs copairs 0.5.5, peak memory and time, each case in a fresh subprocess.

    python tools/perf/bench_map_scale.py [--ours 10000,50000] [--copairs 2048,4096,9216,16384] [--cap-gb 8]
                                         [--timeout 1200] [--doc] [--json out.json]

Task (the one copairs issue #90 reports killed at 9,216 profiles on a 14 GB machine): N profiles x 256 float64
features in N/4 groups of 4 replicates; every profile is a query, positives = its group, negatives = every other
profile (all-vs-all replicate retrieval; copairs: pos_sameby=[group], neg_diffby=[group]).

Measured per case, in its own process: wall seconds of the AP computation, the process's RSS high-water mark
(`resource.getrusage(RUSAGE_SELF).ru_maxrss` after the call, so it includes the interpreter, the imports and the
input), and for ours also the tracemalloc peak of the call (Python and NumPy allocations made by it, input
excluded). copairs runs under a memory cap: a watchdog samples the child's RSS every 0.1 s and kills it above
`--cap-gb` (RSS sampled, so a short spike between samples can pass); sizes are tried in increasing order and the
first one killed or failing stops the copairs series. Where both finish, the APs are compared.

Our bound (`vitally_jax.benchmarks.mapk` docstring): 8*N*D bytes for the normalised copy, 12*B*N for a block of
B = 512 query rows, 8*B*D for the gathered query rows and 96*N for outputs. `--doc` writes the printed table to
the `scale` section of docs/real-data.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from vitally_jax.fileio import write_text
from vitally_jax.metrics import host

ROOT = pathlib.Path(__file__).resolve().parents[2]
D = 256
BLOCK = 512


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 256) float64 profiles in n/4 groups of 4 (group effect + noise), and the group labels."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) // 4
    effect = rng.normal(size=(n // 4 + 1, D)) * 0.5
    return effect[groups] + rng.normal(size=(n, D)), groups.astype(str)


def bound_bytes(n: int, d: int = D, block: int = BLOCK) -> int:
    """Documented peak of `average_precisions` beyond the input: 8*N*D + 12*B*N + 8*B*D + 96*N bytes."""
    b = min(block, n)
    return 8 * n * d + 12 * b * n + 8 * b * d + 96 * n


def worker(kind: str, n: int, out: str) -> None:
    """One case in this process; writes JSON (and the APs as .npy next to it)."""
    x, groups = make_data(n)
    if kind == "ours":
        import tracemalloc

        from vitally_jax.benchmarks.mapk import average_precisions

        tracemalloc.start()
        t = time.perf_counter()
        ap = average_precisions(x, groups, block_rows=BLOCK).average_precision.to_numpy()
        secs = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    else:
        import warnings

        import pandas as pd
        from copairs.map import average_precision

        warnings.simplefilter("ignore")
        meta = pd.DataFrame({"group": groups})
        t = time.perf_counter()
        res = average_precision(
            meta, x, pos_sameby=["group"], pos_diffby=[], neg_sameby=[], neg_diffby=["group"], progress_bar=False
        )
        secs = time.perf_counter() - t
        ap = res.average_precision.to_numpy()
        peak = None
    np.save(out + ".npy", ap)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pathlib.Path(out).write_text(json.dumps({"seconds": secs, "tracemalloc_peak": peak, "maxrss": rss}))


def run_case(kind: str, n: int, cap_bytes: int, timeout: float, tmp: str) -> dict:
    """Run one case in a subprocess under the RSS watchdog."""
    import psutil

    out = os.path.join(tmp, f"{kind}_{n}.json")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, __file__, "--worker", kind, str(n), out], env=env)
    proc = psutil.Process(p.pid)
    peak, t0, status = 0, time.perf_counter(), None
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        if rss > cap_bytes:
            p.kill()
            status = f"killed at RSS {rss / 2**30:.1f} GiB (cap {cap_bytes / 2**30:.1f} GiB)"
        elif time.perf_counter() - t0 > timeout:
            p.kill()
            status = f"stopped after {timeout:.0f} s (time limit)"
        time.sleep(0.1)
    p.wait()
    if status is None and p.returncode != 0:
        status = f"failed (exit code {p.returncode})"
    row = {"kind": kind, "n": n, "status": status or "ok", "sampled_rss_peak": peak}
    if status is None:
        row.update(json.loads(pathlib.Path(out).read_text()))
        row["ap_file"] = out + ".npy"
    return row


def _gib(v) -> str:
    return "-" if v is None else f"{v / 2**30:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| implementation | profiles | status | seconds | RSS high-water GiB | tracemalloc peak GiB | bound GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        rss = r.get("maxrss") or r.get("sampled_rss_peak")
        bound = _gib(bound_bytes(r["n"])) if r["kind"] == "ours" else "-"
        name = "vitally_jax" if r["kind"] == "ours" else "copairs 0.5.5"
        lines.append(
            f"| {name} | {r['n']:,} | {r['status']} | {secs} | {_gib(rss)} | {_gib(r.get('tracemalloc_peak'))} | "
            f"{bound} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", default="10000,50000")
    ap.add_argument("--copairs", default="2048,4096,9216,16384")
    ap.add_argument("--cap-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per copairs case")
    ap.add_argument("--doc", action="store_true", help="write the table to the scale section of docs/real-data.md")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "N", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return 0
    cap = int(args.cap_gb * 2**30)
    load0 = os.getloadavg()
    rows, agree = [], []
    with tempfile.TemporaryDirectory() as tmp:
        largest = None
        for n in [int(v) for v in args.copairs.split(",") if v]:
            r = run_case("copairs", n, cap, args.timeout, tmp)
            rows.append(r)
            print(table([r]).splitlines()[-1], flush=True)
            if r["status"] != "ok":
                break
            largest = r
        ours_sizes = [int(v) for v in args.ours.split(",") if v]
        if largest is not None and largest["n"] not in ours_sizes:
            ours_sizes = [largest["n"], *ours_sizes]
        for n in ours_sizes:
            r = run_case("ours", n, 1 << 62, 1e9, tmp)
            rows.append(r)
            print(table([r]).splitlines()[-1], flush=True)
            if largest is not None and n == largest["n"] and r["status"] == "ok":
                a, b = np.load(r["ap_file"]), np.load(largest["ap_file"])
                agree.append((n, float(np.nanmax(np.abs(a - b)))))
    load1 = os.getloadavg()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    stopped = next((r for r in rows if r["kind"] == "copairs" and r["status"] != "ok"), None)
    text = table(rows)
    print(text)
    summary = [
        "## mAP at scale: blocked AP vs copairs",
        "",
        f"Command: `python tools/perf/bench_map_scale.py --ours {args.ours} --copairs {args.copairs} "
        f"--cap-gb {args.cap_gb:g} --timeout {args.timeout:g}{' --doc' if args.doc else ''}`. Ran {when} on "
        f"{host()['cpu']}, {os.cpu_count()} cores, load average {load0[0]:.1f} before and {load1[0]:.1f} after "
        "(1 min).",
        "",
        "Task: N profiles x 256 float64 features, N/4 groups of 4 replicates, every profile a query against all "
        "others (positives: its group; negatives: all other profiles), the setting copairs issue #90 "
        "(github.com/cytomining/copairs) reports killed at 9,216 profiles on a 14 GB machine. Each case runs in a "
        "fresh process. RSS high-water = `ru_maxrss` of that process (interpreter, imports and input included; "
        "for a killed case, the watchdog's last sampled RSS); tracemalloc peak = allocations made during our AP "
        "call (input excluded); bound = 8*N*D + 12*B*N + 8*B*D + 96*N bytes with B = 512 (mapk.py docstring).",
        "",
        text,
        "",
    ]
    if stopped is not None:
        summary.append(f"copairs stopped at {stopped['n']:,} profiles: {stopped['status']}.")
    elif rows:
        summary.append("copairs finished every size tried.")
    for n, diff in agree:
        summary.append(f"At {n:,} profiles, largest |AP ours - AP copairs| = {diff:.1e}.")
    body = "\n".join(summary) + "\n"
    if args.json:
        write_text(args.json, json.dumps({"rows": rows, "agree": agree}, indent=1, default=str))
    if args.doc:
        sys.path.insert(0, str(ROOT / "tools" / "real"))
        from _doc import write_section

        print(write_section("scale", body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
