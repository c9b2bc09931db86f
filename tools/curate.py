"""Curate a screen for pretraining: image store + embedding sets -> curated index Parquet + report.

    python tools/curate.py --store screen/ --embeddings mae=emb_mae.npy --image-statistics \\
        --out curated/index.parquet

Writes `index.parquet` (column image_id plus the store's metadata of the kept images; point the training
config's `data.index` at it), `index.report.json` / `.md` (counts after each step) and
`index.report.perturbations.parquet` (combined p-value per perturbation and embedding set).
Embedding files: `.npy` / `.npz` (N, D) in store row order, or Parquet with `image_id` (see
`vitally_jax.curation.load_embeddings`). `--image-statistics` adds per-image statistics as one more set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vitally_jax.cli import run_cli
from vitally_jax.errors import ConfigError


def _parse(argv):
    d = __import__("vitally_jax.curation.core", fromlist=["CurationConfig"]).CurationConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True, help="image store folder")
    p.add_argument(
        "--embeddings",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an embedding set aligned with the store's images (repeatable)",
    )
    p.add_argument("--image-statistics", action="store_true", help="add per-image statistics as an embedding set")
    p.add_argument("--out", required=True, help="curated index Parquet to write")
    p.add_argument("--report", default=None, help="report path prefix (default: <out without .parquet>.report)")
    p.add_argument("--overwrite", action="store_true", help="replace curation outputs already at --out/--report")
    p.add_argument("--no-quality", action="store_true", help="skip the image-quality filters")
    p.add_argument("--batch-size", type=int, default=32, help="images read at a time for quality measures")
    p.add_argument("--min-experiments", type=int, default=d.min_experiments)
    p.add_argument("--min-wells", type=int, default=d.min_wells)
    p.add_argument(
        "--positive-controls",
        type=float,
        default=d.keep_positive_controls,
        help="fraction of positive-control wells kept",
    )
    p.add_argument(
        "--negative-controls",
        type=float,
        default=d.keep_negative_controls,
        help="fraction of negative-control wells kept",
    )
    p.add_argument("--permutations", type=int, default=d.n_permutations)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--normalize", default=d.normalize, choices=["plate", "experiment", "none"])
    p.add_argument(
        "--whiten",
        default=d.whiten,
        choices=["controls", "none"],
        help="whiten well embeddings on the negative controls of the other experiments",
    )
    p.add_argument(
        "--null-pool",
        default=d.null_pool,
        choices=["controls", "all"],
        help="wells the permutation null is drawn from (controls: calibrated; all: the paper's random wells)",
    )
    p.add_argument("--blank-max-contrast", type=float, default=d.blank_max_contrast)
    p.add_argument("--saturated-max-fraction", type=float, default=d.saturated_max_fraction)
    p.add_argument("--focus-min-ratio", type=float, default=d.focus_min_ratio)
    p.add_argument("--focus-min", type=float, default=d.focus_min)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)

    def work():
        from vitally_jax.curation import core as curation
        from vitally_jax.data.store import ImageStore

        cfg = curation.CurationConfig(
            min_experiments=args.min_experiments,
            min_wells=args.min_wells,
            keep_positive_controls=args.positive_controls,
            keep_negative_controls=args.negative_controls,
            n_permutations=args.permutations,
            alpha=args.alpha,
            seed=args.seed,
            normalize=args.normalize,
            whiten=args.whiten,
            null_pool=args.null_pool,
            blank_max_contrast=args.blank_max_contrast,
            saturated_max_fraction=args.saturated_max_fraction,
            focus_min_ratio=args.focus_min_ratio,
            focus_min=args.focus_min,
        )
        sets = {}
        for item in args.embeddings:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--embeddings {item!r}: expected NAME=PATH")
            if name in sets:
                raise ConfigError(f"--embeddings: the name {name!r} is given twice")
            sets[name] = path
        inputs = [args.store] + [p for p in sets.values()]
        curation.check_curation_outputs(args.out, args.report, overwrite=args.overwrite, inputs=inputs)
        t0 = time.perf_counter()
        store = ImageStore.open(args.store)
        if args.image_statistics:
            from vitally_jax.embedding.image_stats import store_image_statistics

            sets["image_statistics"] = store_image_statistics(store)
        if not sets:
            print("warning: no embedding sets given; the consistency step is skipped", file=sys.stderr)
        result = curation.curate_store(store, sets, cfg, quality=not args.no_quality, batch_size=args.batch_size)
        curation.write_curation(result, args.out, args.report, overwrite=args.overwrite, inputs=inputs)
        report = args.report or os.path.splitext(args.out)[0] + ".report"
        print(curation.report_markdown(result.report))
        print(
            f"wrote {args.out} ({len(result.index)} images) and {report}.json/.md in {time.perf_counter() - t0:.1f} s"
        )
        return 0

    return run_cli(work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
