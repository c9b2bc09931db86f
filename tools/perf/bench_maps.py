"""Speed of map building + recall: vitally_jax.benchmarks vs efaar-benchmarking 1.0, and a whole-genome recall.

C. 5,000 genes x 4 guides x 4 batches (+ 500 control wells per batch), 256-d, float64:
   TVN (per-batch CORAL) + mean aggregation + known-relationship recall on the 5 bundled sources.
   Both implementations run on the same arrays; outputs are compared (recall equal, map allclose up to signs).
   Reported twice for ours: step by step (well-level TVN, then aggregation), and fused (TVN fitted on controls,
   applied to per-perturbation-and-batch sums; exact because means commute with affine maps).
   Wall and CPU seconds (all threads of the process) are both shown: wall time depends on other load.
D. Recall on a 20,000-gene map (2e8-value null), exact, timed in a subprocess that reports its peak RSS.

Prints a table and ratios and writes JSON (default bench_maps.json). efaar-benchmarking is optional
(`pip install --no-deps -r requirements-efaar.txt`); stand-ins cover its unused module-level imports.
Usage: python tools/perf/bench_maps.py [--genes 5000] [--genome-genes 20000] [--skip-efaar] [--out bench_maps.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types
from unittest import mock

import numpy as np
import pandas as pd

from vitally_jax import benchmarks as B
from vitally_jax.benchmarks import annotations as ann


def real_genes(n: int, seed: int = 0) -> list[str]:
    """n gene symbols: annotated genes first (random order), padded with placeholder names if needed."""
    genes = set()
    for s in ann.SOURCES:
        r = ann.load_relationships(s)
        genes |= set(r.entity1) | set(r.entity2)
    genes = sorted(genes)
    rng = np.random.default_rng(seed)
    pick = list(rng.permutation(genes)[:n])
    return pick + [f"UNANNOTATED{i:05d}" for i in range(n - len(pick))]


def synthetic_screen(
    n_genes: int, guides: int = 4, batches: int = 4, ctrl_per_batch: int = 500, dim: int = 256, seed: int = 0
):
    """Well embeddings (N, dim) float64 and metadata (gene, guide, batch); CORUM complexes share signatures."""
    rng = np.random.default_rng(seed)
    genes = real_genes(n_genes, seed)
    sig = rng.normal(size=(n_genes, dim)) * 0.6
    index = {g: i for i, g in enumerate(genes)}
    for members in list(ann.load_clusters("CORUM").values())[:800]:
        idx = [index[g] for g in members if g in index]
        if len(idx) > 1:
            sig[idx] += rng.normal(size=dim) * 0.8
    batch_off = rng.normal(size=(batches, dim)) * 2
    batch_scale = rng.uniform(0.5, 2.0, size=(batches, dim))
    n_wells = n_genes * guides * batches
    gene_idx = np.repeat(np.arange(n_genes), guides * batches)
    batch_idx = np.tile(np.repeat(np.arange(batches), guides), n_genes)
    guide_idx = np.tile(np.arange(guides), n_genes * batches)
    x = sig[gene_idx] + rng.normal(size=(n_wells, dim))
    xc = rng.normal(size=(batches * ctrl_per_batch, dim))
    cb = np.repeat(np.arange(batches), ctrl_per_batch)
    x = np.concatenate([x, xc])
    b = np.concatenate([batch_idx, cb])
    x = x * batch_scale[b] + batch_off[b]
    md = pd.DataFrame(
        {
            "gene": np.concatenate([np.asarray(genes, object)[gene_idx], ["EMPTY"] * len(cb)]),
            "guide": np.concatenate([guide_idx, -np.ones(len(cb), int)]),
            "batch": [f"exp{k}" for k in b],
        }
    )
    return x, md


class Timer:
    """Wall and CPU (all threads of this process) seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def ours(x, md):
    ctrl = (md.gene == "EMPTY").to_numpy()
    t = {}
    with Timer() as t["tvn"]:
        aligned = B.tvn(x, ctrl, md.batch.to_numpy())
    with Timer() as t["aggregate"]:
        m = B.aggregate(aligned, md, perturbation_col="gene", drop=["EMPTY"])
    with Timer() as t["recall"]:
        rec = B.known_relationship_recall(m.features, m.perturbations)
    return t, m, rec


def ours_fused(x, md):
    """TVN fitted on controls, applied to per-(perturbation, batch) sums: the same mean map, ~16x fewer flops."""
    ctrl = (md.gene == "EMPTY").to_numpy()
    with Timer() as t:
        m = B.aggregate_transformed(
            x, md.gene.to_numpy(), B.tvn_transforms(x, ctrl, md.batch.to_numpy()), drop=["EMPTY"]
        )
    return t, m


def load_efaar():
    stand_ins = {}
    for name in ("scvi", "scvi.model", "torch", "geomloss"):
        if name not in sys.modules:
            stand_ins[name] = types.ModuleType(name)
    if "scvi" in stand_ins:
        stand_ins["scvi"].model = stand_ins["scvi.model"]
        stand_ins["scvi.model"].SCVI = None
    if "torch" in stand_ins:
        stand_ins["torch"].from_numpy = np.asarray
    if "geomloss" in stand_ins:
        stand_ins["geomloss"].SamplesLoss = None  # magnitude is not part of this benchmark
    with mock.patch.dict(sys.modules, stand_ins):
        import efaar_benchmarking.benchmarking as bm
        import efaar_benchmarking.efaar as ef
    return ef, bm


def efaar(x, md, ef, bm):
    t = {}
    with Timer() as t["tvn"]:
        aligned = ef.tvn_on_controls(x, md, "gene", "EMPTY", "batch")
    with Timer() as t["aggregate"]:
        m = ef.aggregate(aligned, md, "gene", keys_to_remove=["EMPTY"])
    with Timer() as t["recall"]:
        rec = bm.known_relationship_benchmark(m, "gene", benchmark_data_dir=str(ann.ANNOTATION_DIR))
    return t, m, rec


def genome_child(n_genes: int, dim: int, threads: int) -> None:
    """Subprocess body for D: prints JSON with time and peak RSS."""
    rng = np.random.default_rng(1)
    genes = real_genes(n_genes, 1)
    x = rng.normal(size=(n_genes, dim))
    with Timer() as t:
        rec = B.known_relationship_recall(x, genes, threads=threads)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        json.dumps(
            {
                "seconds": t.wall,
                "cpu_seconds": t.cpu,
                "peak_rss_gib": rss,
                "null_size": int(rec.null_distribution_size.iloc[0]),
                "recall": rec.to_dict(orient="records"),
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--genome-genes", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-efaar", action="store_true")
    ap.add_argument("--skip-genome", action="store_true")
    ap.add_argument("--out", default="bench_maps.json")
    ap.add_argument("--genome-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.genome_child:
        genome_child(a.genome_genes, a.dim, a.threads)
        return 0
    result = {"config": vars(a), "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (timings scale with other load)")
    x, md = synthetic_screen(a.genes, dim=a.dim)
    print(
        f"C. map: {a.genes} genes x 4 guides x 4 batches + {int((md.gene == 'EMPTY').sum())} controls, "
        f"{a.dim}-d, {len(x)} wells"
    )
    t_ours, m, rec = ours(x, md)
    t_fused, m_fused = ours_fused(x, md)
    signs = np.sign(np.sum(m.features * m_fused.features, axis=0))
    result["fused_map_max_abs_diff"] = float(np.abs(m_fused.features * signs - m.features).max())
    result["ours"] = {k: {"wall": v.wall, "cpu": v.cpu} for k, v in t_ours.items()}
    result["ours_fused_tvn_aggregate"] = {"wall": t_fused.wall, "cpu": t_fused.cpu}
    result["recall"] = rec.to_dict(orient="records")
    if not a.skip_efaar:
        try:
            ef, bm = load_efaar()
        except ImportError as e:
            print(f"efaar-benchmarking not importable ({e}); pip install --no-deps -r requirements-efaar.txt")
            ef = None
        if ef is not None:
            t_ref, m_ref, rec_ref = efaar(x, md, ef, bm)
            result["efaar"] = {k: {"wall": v.wall, "cpu": v.cpu} for k, v in t_ref.items()}
            feats_ref = m_ref.features.to_numpy()
            signs = np.sign(np.sum(m.features * feats_ref, axis=0))
            result["max_abs_diff_map"] = float(np.abs(m.features * signs - feats_ref).max())
            cols = [c for c in rec.columns if c.startswith("recall")]
            result["recall_equal"] = bool(
                np.allclose(rec[cols].to_numpy(float), rec_ref[cols].to_numpy(float), rtol=1e-8)
            )
    ref = result.get("efaar")
    print(f"{'step':<20}{'ours wall':>10}{'efaar wall':>11}{'ratio':>8}{'ours cpu':>10}{'efaar cpu':>10}{'ratio':>8}")
    names = {"tvn": "tvn", "aggregate": "aggregate", "recall": "recall (5 sources)"}
    tot = {"ours": [0.0, 0.0], "efaar": [0.0, 0.0]}
    for key, label in names.items():
        o = result["ours"][key]
        tot["ours"][0] += o["wall"]
        tot["ours"][1] += o["cpu"]
        line = f"{label:<20}{o['wall']:>10.2f}"
        if ref:
            r = ref[key]
            tot["efaar"][0] += r["wall"]
            tot["efaar"][1] += r["cpu"]
            line += (
                f"{r['wall']:>11.2f}{r['wall'] / o['wall']:>7.1f}x{o['cpu']:>10.2f}{r['cpu']:>10.2f}"
                f"{r['cpu'] / o['cpu']:>7.1f}x"
            )
        print(line)
    if ref:
        (ow, oc), (rw, rc) = tot["ours"], tot["efaar"]
        result["speedup_total_wall"] = rw / ow
        result["speedup_total_cpu"] = rc / oc
        print(f"{'total':<20}{ow:>10.2f}{rw:>11.2f}{rw / ow:>7.1f}x{oc:>10.2f}{rc:>10.2f}{rc / oc:>7.1f}x")
        print(
            f"outputs: recall equal (rtol 1e-8): {result['recall_equal']}; "
            f"map max |diff| up to column signs: {result['max_abs_diff_map']:.2e}"
        )
        fw = t_fused.wall + result["ours"]["recall"]["wall"]
        fc = t_fused.cpu + result["ours"]["recall"]["cpu"]
        result["speedup_total_fused_wall"] = rw / fw
        result["speedup_total_fused_cpu"] = rc / fc
        print(
            f"{'fused tvn+aggregate':<20}{t_fused.wall:>10.2f}{ref['tvn']['wall'] + ref['aggregate']['wall']:>11.2f}"
            f"{'':>8}{t_fused.cpu:>10.2f}{ref['tvn']['cpu'] + ref['aggregate']['cpu']:>10.2f}"
        )
        print(f"{'total (fused)':<20}{fw:>10.2f}{rw:>11.2f}{rw / fw:>7.1f}x{fc:>10.2f}{rc:>10.2f}{rc / fc:>7.1f}x")
        print(f"fused map vs unfused: max |diff| {result['fused_map_max_abs_diff']:.2e}")
    else:
        print(f"{'total':<20}{tot['ours'][0]:>10.2f}")
    print(rec.to_string(index=False))
    if not a.skip_genome:
        cmd = [
            sys.executable,
            __file__,
            "--genome-child",
            "--genome-genes",
            str(a.genome_genes),
            "--dim",
            str(a.dim),
            "--threads",
            str(a.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        g = json.loads(out)
        result["genome"] = g
        print(
            f"D. recall, {a.genome_genes} genes ({g['null_size']:.3g} null pairs, exact): {g['seconds']:.1f} s wall, "
            f"{g['cpu_seconds']:.1f} s CPU, peak RSS {g['peak_rss_gib']:.2f} GiB (targets: < 120 s, < 8 GiB)"
        )
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
