"""Run every CPU benchmark with small-but-meaningful settings; one summary table + bench_out/summary.json.

    python tools/perf/bench_all.py                     # <= 10 min on an idle 2-core host
    python tools/perf/bench_all.py --only=train,maps   # a subset

Each benchmark runs as its own process (fresh JAX runtime, its own time limit); its JSON goes to bench_out/ and
the last lines it printed (its table, with its ratios) are repeated in the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "bench_out"
BENCHES = {
    # the issue-size comparison (256 px, batch 32, with torch.compile) takes ~30 min on 2 cores: see
    # docs/performance.md; here the same S/16 and B/16 steps at 128 px, batch 8, eager PyTorch, 3 interleaved rounds
    "train": [
        "tools/perf/bench_train.py",
        "--variants=S/16,B/16",
        "--crop=128",
        "--batch=8",
        "--rounds=3",
        "--steps=2",
        "--no-torch-compile",
        f"--json={OUT}/train.json",
    ],
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
    # inference: every-block extraction vs final block only vs the PyTorch reference forward (+ linear probes)
    "infer": ["tools/perf/bench_probe.py", "--repeats=3", "--json", f"{OUT}/infer.json"],
    "curation": [
        "tools/perf/bench_curation.py",
        "--wells=20000",
        "--perturbations=200",
        "--quick",
        "--permutations=200",
        f"--json={OUT}/curation.json",
    ],
}


def run_one(name: str, limit_s: int) -> dict:
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, *BENCHES[name]], cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        rc, out = (
            r.returncode,
            r.stdout + ("\n" + r.stderr.strip().splitlines()[-1] if r.returncode and r.stderr.strip() else ""),
        )
    except subprocess.TimeoutExpired as e:
        rc, out = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    return {"name": name, "rc": rc, "wall_s": round(time.perf_counter() - t, 1), "tail": out.strip().splitlines()[-12:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(BENCHES))
    p.add_argument("--limit_s", type=int, default=480, help="time limit per benchmark")
    args = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
    rows = [run_one(n.strip(), args.limit_s) for n in args.only.split(",")]
    from vitally_jax.fileio import atomic_path

    with atomic_path(OUT / "summary.json") as tmp:
        pathlib.Path(tmp).write_text(json.dumps({"load_start": load, "rows": rows}, indent=1))
    for r in rows:
        print(f"=== {r['name']} (rc {r['rc']}, {r['wall_s']} s)")
        print("\n".join(r["tail"]))
    print(f"\n{'benchmark':>10} {'rc':>4} {'wall s':>8}   (load at start: {load})")
    for r in rows:
        print(f"{r['name']:>10} {r['rc']:>4} {r['wall_s']:8.1f}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
