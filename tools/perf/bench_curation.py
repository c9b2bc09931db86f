"""Benchmark of the curation consistency test at screen scale.

    python tools/perf/bench_curation.py                      # 100k wells, 1,000 perturbations, 1,000 permutations
    python tools/perf/bench_curation.py --wells 20000 --quick

Builds random well metadata (10 experiments, each perturbation in 4 of them, ~12% control wells) and
embeddings with a planted signal in half of the perturbations, runs `vitally_jax.curation.core` end to end,
and times a naive reference (an independent permutation loop per perturbation and experiment, direct pairwise
cosines) on a sample of the tests, extrapolated to all of them. Prints a table and the speed-up; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pandas as pd

from vitally_jax.curation import core as cu
from vitally_jax.curation import stats as cs


def make_screen(n_wells: int, n_perts: int, n_exp: int, d: int, seed: int = 0):
    """(metadata, embeddings (n_wells, d) float32, active (n_perts,) bool) with one image per well."""
    rng = np.random.default_rng(seed)
    n_ctrl = int(0.12 * n_wells)
    per_pert = (n_wells - n_ctrl) // n_perts
    exps = np.stack([rng.choice(n_exp, 4, replace=False) for _ in range(n_perts)])
    pert = np.repeat(np.arange(n_perts), per_pert)
    exp = exps[pert, np.arange(len(pert)) % 4]
    n_ctrl = n_wells - len(pert)
    pert = np.r_[pert, np.full(n_ctrl, -1)]
    exp = np.r_[exp, rng.integers(0, n_exp, n_ctrl)]
    plate = exp * 8 + rng.integers(0, 8, n_wells)
    is_ctrl = pert < 0
    ctype = np.where(is_ctrl, np.where(rng.random(n_wells) < 0.2, "positive", "negative"), "")
    meta = pd.DataFrame(
        {
            "image_id": np.char.add("i", np.arange(n_wells).astype(str)),
            "well_id": np.char.add("w", np.arange(n_wells).astype(str)),
            "plate": np.char.add("p", plate.astype(str)),
            "experiment": np.char.add("e", exp.astype(str)),
            "perturbation": np.where(
                is_ctrl, np.where(ctype == "positive", "POS", "NEG"), np.char.add("g", pert.astype(str))
            ),
            "perturbation_type": np.where(is_ctrl, "control", "gene"),
            "is_control": is_ctrl,
            "control_type": ctype,
        }
    )
    active = rng.random(n_perts) < 0.5
    prog = rng.normal(size=(n_perts, d)).astype(np.float32) * 0.3 * active[:, None]
    emb = rng.normal(size=(n_wells, d)).astype(np.float32) + rng.normal(size=(n_exp * 8, d)).astype(np.float32)[plate]
    emb[~is_ctrl] += prog[pert[~is_ctrl]]
    return meta, emb, active


def naive_seconds_per_test(u: np.ndarray, n: int, n_perm: int, reps: int, rng) -> float:
    """Time of one (perturbation, experiment) test done the direct way: n_perm random sets, O(n^2) cosines."""
    t0 = time.perf_counter()
    for _ in range(reps):
        obs = u[:n] @ u[:n].T
        _ = obs[np.triu_indices(n, 1)].mean()
        null = np.empty(n_perm)
        for k in range(n_perm):
            s = u[rng.choice(len(u), n, replace=False)]
            null[k] = (s @ s.T)[np.triu_indices(n, 1)].mean()
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wells", type=int, default=100_000)
    ap.add_argument("--perturbations", type=int, default=1000)
    ap.add_argument("--experiments", type=int, default=10)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 1024], help="embedding widths, one set each")
    ap.add_argument("--quick", action="store_true", help="time the naive reference on fewer tests")
    ap.add_argument("--json", default="bench_curation.json")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    meta, emb, active = make_screen(args.wells, args.perturbations, args.experiments, max(args.dims))
    sets = {f"d{d}": emb[:, :d] for d in args.dims}
    t_make = time.perf_counter() - t0
    cfg = cu.CurationConfig(n_permutations=args.permutations, min_wells=20, min_experiments=3)

    rows = []
    for name, x in sets.items():
        t0 = time.perf_counter()
        res = cu.curate(meta, {name: x}, cfg)
        dt = time.perf_counter() - t0
        per = res.perturbations.set_index("perturbation")
        act = pd.Series(active, index=[f"g{i}" for i in range(len(active))]).reindex(per.index).to_numpy(bool)
        rows.append(
            {
                "embedding": name,
                "dim": x.shape[1],
                "seconds": dt,
                "tests": len(res.tests),
                "kept_planted": float(per["kept"].to_numpy()[act].mean()),
                "kept_null": float(per["kept"].to_numpy()[~act].mean()),
            }
        )
    t0 = time.perf_counter()
    both = cu.curate(meta, sets, cfg)
    t_both = time.perf_counter() - t0

    # naive reference on a sample of tests, extrapolated to the number of tests actually run
    if len(both.tests) == 0:
        raise SystemExit(
            f"error: --wells={args.wells} over --perturbations={args.perturbations} gives fewer than "
            f"{cfg.min_wells} wells per perturbation, so nothing passes the replicate filter; "
            "use more wells or fewer perturbations"
        )
    n_tests = len(both.tests) // len(sets)
    typical = int(both.tests["n_wells"].median())
    pool = cs.unit_rows(sets[f"d{args.dims[0]}"][meta["experiment"].to_numpy() == "e0"])
    reps = 1 if args.quick else 3
    per_test = naive_seconds_per_test(pool, typical, args.permutations, reps, np.random.default_rng(0))
    naive_total = per_test * n_tests

    print(
        f"screen: {args.wells} wells, {args.perturbations} perturbations, {args.experiments} experiments, "
        f"{args.permutations} permutations, {os.cpu_count()} CPU cores (built in {t_make:.1f} s)"
    )
    print(f"{'embedding':>10} {'dim':>5} {'tests':>6} {'seconds':>8} {'kept planted':>13} {'kept null':>10}")
    for r in rows:
        print(
            f"{r['embedding']:>10} {r['dim']:>5} {r['tests']:>6} {r['seconds']:>8.1f} "
            f"{r['kept_planted']:>13.3f} {r['kept_null']:>10.3f}"
        )
    print(f"all {len(sets)} sets together (full curate, keep if p < {cfg.alpha} under any): {t_both:.1f} s")
    print(
        f"naive loop, one test of {typical} wells x {args.permutations} permutations: {per_test * 1e3:.1f} ms; "
        f"x {n_tests} tests = {naive_total:.0f} s for one set"
    )
    speedup = naive_total / rows[0]["seconds"]
    print(f"speed-up of the shared-permutation form over the naive loop (d{args.dims[0]}): {speedup:.0f}x")
    out = {
        "wells": args.wells,
        "perturbations": args.perturbations,
        "experiments": args.experiments,
        "permutations": args.permutations,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "per_set": rows,
        "all_sets_seconds": t_both,
        "naive_seconds_per_test": per_test,
        "naive_seconds_estimate": naive_total,
        "speedup": speedup,
    }
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
