"""Benchmark one real LINCS Cell Painting plate (cpg0004) with the project's profile benchmarks; write its section
of docs/real-data.md.

    python tools/real/lincs_plate.py --plate ../shared/data/real/SQ00015054.csv.gz [--null-size 10000] [--no-doc]

The plate: CellProfiler well profiles (normalised and feature-selected by its producers), `Metadata_*` columns and
numeric features. Measured, all with cosine similarity and copairs-equal mAP:

- phenotypic activity: each compound well is a query; positives = the compound's wells at its other doses,
  negatives = the DMSO wells. mAP per compound x dose (one well per dose on this plate, so mAP = that well's AP)
  with p-values, BH over all compound x dose tests and the hierarchical correction (compound over doses);
  fraction retrieved (corrected p < 0.05); mAP per compound over all its doses;
- dose trend: Spearman correlation of the per-dose mAP with dose for each compound with >= 3 doses, and the share
  of compounds where it is positive;
- consistency: per-compound profiles (mean of the wells at the compound's highest dose); multilabel mAP per MoA
  and per target (labels joined by `|`), positives = compounds sharing the label, negatives = compounds sharing no
  label;
- alignment on the DMSO wells: the activity benchmark after centre-scaling on DMSO, PCA + centre-scale on DMSO,
  and TVN fitted on DMSO.

Exit codes: 4 unreadable/ill-formed plate (see vitally_jax/errors.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import time

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from vitally_jax.benchmarks import mapk, multilabel
from vitally_jax.benchmarks.align import centerscale_on_controls, pca_centerscale, tvn
from vitally_jax.cli import run_cli
from vitally_jax.errors import DataError
from vitally_jax.metrics import host

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_PLATE = ROOT.parent / "shared" / "data" / "real" / "SQ00015054.csv.gz"
CPD, DOSE, MOA, TARGET = "Metadata_broad_sample", "Metadata_mmoles_per_liter", "Metadata_moa", "Metadata_target"
CONTROL = "DMSO"
THRESHOLD = 0.05


def load_plate(path) -> tuple[np.ndarray, pd.DataFrame]:
    """Read a plate CSV (optionally gzipped) -> features (N, D) float64 and the `Metadata_*` columns."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a LINCS plate CSV (e.g. SQ00015054.csv.gz)")
    try:
        df = pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad input file
        raise DataError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in (CPD, DOSE, MOA, TARGET) if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing metadata columns {missing}; expected LINCS plate columns")
    meta_cols = [c for c in df.columns if c.startswith("Metadata_")]
    feat_cols = [c for c in df.columns if not c.startswith("Metadata_")]
    if not feat_cols:
        raise DataError(f"{path}: no feature columns (every column starts with 'Metadata_')")
    feats = df[feat_cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(feats)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"{path}: {int(bad.sum())} non-numeric/NaN feature values (first: row {r}, {feat_cols[c]!r})")
    if not (df[CPD] == CONTROL).any():
        raise DataError(f"{path}: no {CONTROL} wells in {CPD}; expected negative-control wells")
    if df[CPD].isna().any() or df[DOSE].isna().any():
        raise DataError(f"{path}: missing {CPD} or {DOSE} values")
    return feats, df[meta_cols].reset_index(drop=True)


def dose_keys(meta: pd.DataFrame) -> np.ndarray:
    """'compound@dose' labels (the dose as written in the plate)."""
    return (meta[CPD].astype(str) + "@" + meta[DOSE].map(repr)).to_numpy()


def activity(x: np.ndarray, meta: pd.DataFrame, *, null_size: int, seed: int) -> dict:
    """Phenotypic activity per compound x dose and per compound against DMSO (see module docstring)."""
    ctrl = (meta[CPD] == CONTROL).to_numpy()
    cpd = meta[CPD].astype(str).to_numpy()
    ap = mapk.average_precisions(x, cpd, reference=ctrl)
    sub = ap[~ctrl].reset_index(drop=True)
    keys = dose_keys(meta)[~ctrl]
    kw = dict(null_size=null_size, threshold=THRESHOLD, seed=seed)
    flat = mapk.mean_average_precision(sub, keys, **kw)
    hier = mapk.mean_average_precision(sub, keys, hierarchical_by=cpd[~ctrl], **kw)
    per_cpd = mapk.mean_average_precision(sub, cpd[~ctrl], **kw)
    info = meta[~ctrl].assign(group=keys).drop_duplicates("group").set_index("group")
    for t in (flat, hier):
        t["compound"] = info.loc[t.group, CPD].to_numpy()
        t["dose"] = info.loc[t.group, DOSE].to_numpy().astype(float)
    return {"ap": ap, "flat": flat, "hierarchical": hier, "per_compound": per_cpd}


def dose_trend(table: pd.DataFrame, col: str = "mean_average_precision") -> pd.DataFrame:
    """Spearman rho of `col` with dose per compound with >= 3 doses (NaN when `col` is constant)."""
    rows = []
    for c, g in table.groupby("compound", sort=True):
        if g.dose.nunique() < 3:
            continue
        v = g[col].to_numpy()
        rho = np.nan if np.ptp(v) == 0 else float(spearmanr(g.dose.to_numpy(), v).statistic)
        rows.append((c, len(g), rho, float(v[np.argmax(g.dose.to_numpy())]), float(v[np.argmin(g.dose.to_numpy())])))
    return pd.DataFrame(rows, columns=["compound", "n_doses", "spearman_rho", "map_top_dose", "map_low_dose"])


def compound_profiles(x: np.ndarray, meta: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Mean profile of each compound's wells at its highest dose -> (C, D), one metadata row per compound."""
    keep = (meta[CPD] != CONTROL).to_numpy()
    m = meta[keep].assign(_row=np.nonzero(keep)[0])
    top = m.groupby(CPD)[DOSE].transform("max")
    m = m[m[DOSE] == top]
    rows, info = [], []
    for c, g in m.groupby(CPD, sort=True):
        rows.append(x[g._row.to_numpy()].mean(axis=0))
        info.append({CPD: c, MOA: g[MOA].iloc[0], TARGET: g[TARGET].iloc[0], "n_wells": len(g)})
    return np.array(rows), pd.DataFrame(info)


def consistency(x: np.ndarray, meta: pd.DataFrame, *, null_size: int, seed: int) -> dict:
    """Multilabel mAP per MoA and per target over compound profiles at their highest dose."""
    xc, info = compound_profiles(x, meta)
    out = {"n_compounds": len(info)}
    for name, col in (("moa", MOA), ("target", TARGET)):
        ann = {c: v for c, v in zip(info[CPD], info[col]) if isinstance(v, str) and v.strip()}
        labels = [lab for v in ann.values() for lab in v.split("|")]
        res = multilabel.multilabel_consistency(xc, info[CPD], ann, null_size=null_size, seed=seed)
        out[name] = {
            "table": res,
            "n_annotated": len(ann),
            "n_labels": len(set(labels)),
            "n_multi": sum("|" in v for v in ann.values()),
        }
    return out


def alignments(x: np.ndarray, meta: pd.DataFrame, *, null_size: int, seed: int) -> pd.DataFrame:
    """Activity (hierarchical fraction retrieved, mean mAP) after each alignment fitted on the DMSO wells."""
    ctrl = (meta[CPD] == CONTROL).to_numpy()
    variants = {
        "none (as published)": x,
        "centre-scale on DMSO": centerscale_on_controls(x, ctrl),
        "PCA (128) + centre-scale on DMSO": pca_centerscale(x, ctrl, 128),
        "TVN on DMSO": tvn(x, ctrl),
    }
    rows = []
    for name, z in variants.items():
        a = activity(z, meta, null_size=null_size, seed=seed)
        h, f = a["hierarchical"], a["flat"]
        rates = [float(t.below_corrected_p.mean()) for t in (h, f)]
        rows.append((name, z.shape[1], *rates, float(h.mean_average_precision.mean()),
                     float(a["per_compound"].below_corrected_p.mean())))  # fmt: skip
    cols = ["alignment", "dims", "retrieved_hier", "retrieved_bh", "mean_map", "retrieved_compound"]
    return pd.DataFrame(rows, columns=cols)


def copairs_parity(x: np.ndarray, meta: pd.DataFrame, act: dict, *, null_size: int, seed: int) -> dict | None:
    """Largest differences to copairs 0.5.5 on this plate (None when copairs is not installed)."""
    try:
        import tempfile
        import warnings

        import copairs.map as cm
        from copairs.matching import assign_reference_index
    except ImportError:
        return None
    m = assign_reference_index(meta.copy(), f"{CPD} == '{CONTROL}'", reference_col="Metadata_reference_index")
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        cols = [CPD, "Metadata_reference_index"]
        ref = cm.average_precision(m, x, pos_sameby=cols, pos_diffby=[], neg_sameby=[], neg_diffby=cols,
                                   progress_bar=False)  # fmt: skip
        ref = ref[ref[CPD] != CONTROL]
        kw = dict(null_size=null_size, threshold=THRESHOLD, seed=seed, progress_bar=False, cache_dir=tmp)
        flat = cm.mean_average_precision(ref, [CPD, DOSE], **kw)
        hier = cm.mean_average_precision_hierarchical(ref, [CPD, DOSE], hierarchical_by=[CPD], **kw)
    ours_ap = act["ap"][(meta[CPD] != CONTROL).to_numpy()]
    out = {
        "ap": float(np.abs(ours_ap.average_precision.to_numpy() - ref.average_precision.to_numpy()).max()),
        "nap": float(
            np.abs(ours_ap.normalized_average_precision.to_numpy() - ref.normalized_average_precision.to_numpy()).max()
        ),
    }
    for name, r, o in (("flat", flat, act["flat"]), ("hier", hier, act["hierarchical"])):
        r = r.assign(group=dose_keys(r)).set_index("group").loc[o.group]
        for col in ("mean_average_precision", "mean_normalized_average_precision", "p_value", "corrected_p_value"):
            out[f"{name}_{col}"] = float(np.abs(o[col].to_numpy() - r[col].to_numpy()).max())
        out[f"{name}_p_equal"] = int((o.p_value.to_numpy() == r.p_value.to_numpy()).sum())
        out[f"{name}_groups"] = len(o)
    return out


def _md_table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v).replace("|", "\\|") for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(plate, *, null_size: int = 10000, seed: int = 0, with_alignment: bool = True) -> dict:
    """Every benchmark of the module docstring on one plate -> dict of tables and numbers."""
    t0 = time.perf_counter()
    x, meta = load_plate(plate)
    act = activity(x, meta, null_size=null_size, seed=seed)
    trend = dose_trend(act["hierarchical"])
    res = {
        "plate": pathlib.Path(plate).name,
        "shape": x.shape,
        "n_dmso": int((meta[CPD] == CONTROL).sum()),
        "n_compounds": int(meta.loc[meta[CPD] != CONTROL, CPD].nunique()),
        "moa_of": dict(zip(meta[CPD], meta[MOA].fillna("-"))),
        "activity": act,
        "trend": trend,
        "trend_nap": dose_trend(act["hierarchical"], "mean_normalized_average_precision"),
        "consistency": consistency(x, meta, null_size=null_size, seed=seed),
        "parity": copairs_parity(x, meta, act, null_size=null_size, seed=seed),
    }
    if with_alignment:
        res["alignment"] = alignments(x, meta, null_size=null_size, seed=seed)
    res["seconds"] = time.perf_counter() - t0
    return res


def render(res: dict, *, command: str, null_size: int, seed: int) -> str:
    """Markdown for the `lincs` section of docs/real-data.md."""
    act, trend = res["activity"], res["trend"]
    flat, hier, per_cpd = act["flat"], act["hierarchical"], act["per_compound"]
    n, d = res["shape"]
    load = os.getloadavg()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    by_rank = hier.assign(rank=hier.groupby("compound").dose.rank(ascending=False, method="first").astype(int))
    by_rank = by_rank[by_rank.groupby("compound").dose.transform("size") >= 3]
    dose_tab = (
        by_rank.groupby("rank")
        .agg(
            n=("group", "size"),
            median_dose_uM=("dose", "median"),
            mean_mAP=("mean_average_precision", "mean"),
            mean_nAP=("mean_normalized_average_precision", "mean"),
            retrieved_hier=("below_corrected_p", "mean"),
        )
        .reset_index()
        .rename(columns={"rank": "dose rank (1 = highest)"})
    )
    dose_tab["n"] = dose_tab["n"].astype(int)
    rho = trend.spearman_rho.dropna()
    rho_n = res["trend_nap"].spearman_rho.dropna()
    top = per_cpd.sort_values("mean_average_precision", ascending=False).head(8)
    top = top[["group", "mean_average_precision", "mean_normalized_average_precision", "p_value", "corrected_p_value"]]
    top = top.rename(columns={"group": "compound", "mean_average_precision": "mAP", "p_value": "p"})
    top.insert(1, "MoA", [res.get("moa_of", {}).get(c, "-") for c in top.compound])
    top = top.rename(columns={"mean_normalized_average_precision": "mean nAP", "corrected_p_value": "BH p"})
    lines = [
        "## LINCS Cell Painting plate: profile benchmarks",
        "",
        f"Command: `{command}` (null size {null_size}, seed {seed}). Ran {when} on {host()['cpu']}, "
        f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min), "
        f"{res['seconds']:.0f} s.",
        "",
        f"Plate `{res['plate']}` (cpg0004, A549, CellProfiler profiles as published, normalised and feature-selected "
        f"by their producers): {n} wells x {d} features, {res['n_compounds']} compounds, {res['n_dmso']} DMSO wells. "
        "Cosine similarity throughout; mAP, p-values and corrections equal copairs 0.5.5 (below).",
        "",
        "### Phenotypic activity against DMSO",
        "",
        "Each compound well is a query; its positives are the same compound's wells at the other doses, its "
        "negatives the DMSO wells. This plate has one well per compound x dose, so the mAP of a compound x dose is "
        "the AP of that well; the null is matched on (#positives, #total). A well scores high when its profile is "
        "closer to the compound's other doses than the DMSO wells are, so a dose whose phenotype differs from the "
        "compound's other doses (e.g. a toxic top dose) scores lower than its strength alone would suggest.",
        "",
        f"- compound x dose tests: {len(flat)}; fraction retrieved (corrected p < {THRESHOLD}): "
        f"**{flat.below_corrected_p.mean():.3f}** with BH over all tests, "
        f"**{hier.below_corrected_p.mean():.3f}** with the hierarchical correction (compound over doses; "
        f"{hier.drop_duplicates('compound').stage1_significant.mean():.3f} of compounds pass stage 1); "
        f"uncorrected p < {THRESHOLD}: {flat.below_p.mean():.3f}.",
        f"- per compound (all doses pooled, {len(per_cpd)} tests): fraction retrieved "
        f"**{per_cpd.below_corrected_p.mean():.3f}**, mean mAP {per_cpd.mean_average_precision.mean():.3f}, "
        f"mean normalised AP {per_cpd.mean_normalized_average_precision.mean():.3f}.",
        "",
        _md_table(dose_tab),
        "",
        "Most active compounds (pooled over doses):",
        "",
        _md_table(top.reset_index(drop=True), "{:.4g}"),
        "",
        "### Dose trend",
        "",
        f"Spearman rho of the per-dose mAP with dose, per compound with >= 3 doses ({len(trend)} compounds; "
        f"{len(trend) - len(rho)} with constant mAP left out): median rho **{rho.median():.3f}**, mean "
        f"{rho.mean():.3f}; positive for **{(rho > 0).mean():.3f}** of compounds ({int((rho > 0).sum())} of "
        f"{len(rho)}); negative for {(rho < 0).mean():.3f}. On the normalised AP: positive for "
        f"{(rho_n > 0).mean():.3f}. Mean mAP at each compound's top dose {trend.map_top_dose.mean():.3f}, at its "
        f"lowest {trend.map_low_dose.mean():.3f}.",
        "",
        "### Consistency by MoA and by target",
        "",
    ]
    cons = res["consistency"]
    lines.append(
        f"Compound profiles: mean of each compound's wells at its highest dose ({cons['n_compounds']} compounds). "
        "Multilabel mAP: for each label, the compounds holding it are queries, positives are the other holders, "
        "negatives the compounds sharing no label with the query (labels joined by `|` count separately)."
    )
    lines.append("")
    rows = []
    for name in ("moa", "target"):
        c = cons[name]
        t = c["table"]
        rows.append(
            {
                "annotation": name,
                "annotated compounds": c["n_annotated"],
                "multi-label compounds": c["n_multi"],
                "labels": c["n_labels"],
                "labels with >= 2 compounds": len(t),
                "mean mAP": float(t.mean_average_precision.mean()),
                "mean nAP": float(t.mean_normalized_average_precision.mean()),
                "p < 0.05": int(t.below_p.sum()),
                "BH p < 0.05": int(t.below_corrected_p.sum()),
            }
        )
    lines.append(_md_table(pd.DataFrame(rows)))
    lines.append("")
    for name in ("moa", "target"):
        t = cons[name]["table"].sort_values("p_value").head(5)
        best = ", ".join(
            f"{a} (n={k}, mAP {m:.2f}, p {p:.3g})"
            for a, k, m, p in zip(t.annotation, t.n_profiles, t.mean_average_precision, t.p_value)
        )
        lines.append(f"- {name}: lowest p-values: {best}.")
    lines.append("")
    lines.append(
        "Few labels are shared by two or more compounds on one plate, so these are small tests with coarse nulls; "
        "they show that the multilabel benchmark runs on real annotations, not that MoAs are or are not retrieved "
        "in general."
    )
    if "alignment" in res:
        lines += [
            "",
            "### Alignment fitted on the DMSO wells",
            "",
            "Activity as above after each alignment (statistics fitted on the 24 DMSO wells only):",
            "",
            _md_table(res["alignment"]),
            "",
            "What this shows: on one plate there is one batch, so TVN's per-batch CORAL step reduces to a scalar "
            "(cosines unchanged), and TVN amounts to whitening in the principal axes of the DMSO wells. With "
            f"{res['n_dmso']} DMSO wells those axes span at most {res['n_dmso'] - 1} dimensions, so TVN also projects "
            f"the {d} features onto them; the table measures how much compound activity survives that projection "
            "and the rescaling. What it does not show: the batch correction TVN and PCA + centre-scale are for "
            "(plate-to-plate and batch-to-batch effects) needs several plates.",
        ]
    p = res["parity"]
    lines += ["", "### Parity with copairs 0.5.5 on this plate", ""]
    if p is None:
        lines.append("copairs is not installed here; the parity figures were not computed.")
    else:
        lines.append(
            f"Largest absolute differences, ours vs copairs 0.5.5 (same null size and seed): AP {p['ap']:.1e}, "
            f"normalised AP {p['nap']:.1e}; compound x dose mAP {p['flat_mean_average_precision']:.1e}, "
            f"p-value {p['flat_p_value']:.1e} ({p['flat_p_equal']} of {p['flat_groups']} equal), BH p "
            f"{p['flat_corrected_p_value']:.1e}, hierarchical corrected p {p['hier_corrected_p_value']:.1e}, "
            f"mean normalised AP {p['flat_mean_normalized_average_precision']:.1e}. Test: "
            "`tests/test_lincs_plate.py`."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plate", default=str(DEFAULT_PLATE), help="plate CSV (.csv or .csv.gz)")
    ap.add_argument("--null-size", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-doc", action="store_true", help="print the section instead of writing docs/real-data.md")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.plate, null_size=args.null_size, seed=args.seed)
    plate = pathlib.Path(args.plate)
    try:
        shown = os.path.relpath(plate, ROOT)
    except ValueError:
        shown = str(plate)
    command = f"python tools/real/lincs_plate.py --plate {shown}"
    if args.null_size != 10000:
        command += f" --null-size {args.null_size}"
    body = render(res, command=command, null_size=args.null_size, seed=args.seed)
    if args.no_doc:
        print(body)
        return 0
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from _doc import write_section

    print(write_section("lincs", body))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
