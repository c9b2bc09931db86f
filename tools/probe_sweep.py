"""Block search: linear probes on every block of an encoder, b*, and the encoder trimmed to b*.

    python tools/probe_sweep.py --encoder runs/g8/encoder --store screen/ --out sweep/ --trim sweep/encoder_b_star

Embeds the screen with the encoder and with the baselines (a random-init encoder of the same architecture;
image statistics) into `OUT/embeddings/<source>` (resumable), averages per well, fits standardised L2 logistic
regression probes on every block for two tasks (perturbation identity across held-out experiments; functional
gene groups from CORUM complexes, cross-validated over genes), and writes `OUT/sweep.csv`, `OUT/sweep.json`
(table, b* per task and overall) and `OUT/sweep.png`. `--trim PATH` exports the encoder cut to the overall b*
(final norm kept) for `vitally_jax.load_encoder`, with its readout: block b* and the `--pooling` of the sweep.
"""

from __future__ import annotations

import argparse
import sys

from vitally_jax.cli import run_cli
from vitally_jax.embedding.blocks import DEFAULT_PROBE_POOLING, POOLINGS
from vitally_jax.errors import ConfigError


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", required=True, help="encoder export folder (vitally_jax.load_encoder)")
    p.add_argument("--store", required=True, help="image store folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--pooling",
        default=DEFAULT_PROBE_POOLING,
        choices=POOLINGS,
        help=f"the pooling probed, and recorded in the --trim export's readout (default {DEFAULT_PROBE_POOLING})",
    )
    p.add_argument("--tasks", default="perturbation,gene_groups")
    p.add_argument("--baselines", default="random_init,image_stats", help="comma-separated, or 'none'")
    p.add_argument("--backend", default="jax", choices=["jax", "sklearn"], help="logistic-regression backend")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (scikit-learn's C)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="held-out share of experiments")
    p.add_argument("--group-min-size", type=int, default=5)
    p.add_argument("--group-max-size", type=int, default=20)
    p.add_argument("--max-groups", type=int, default=40)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="random-init baseline and fold seed")
    p.add_argument("--trim", default=None, metavar="PATH", help="export the encoder trimmed to the overall b*")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished sweep at --out (built beside it, swapped in when done) and an encoder "
        "export at --trim; nothing that vitally_jax did not write is replaced",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)

    def work():
        from vitally_jax.cli import setup_compilation_cache

        setup_compilation_cache()
        from flax import nnx

        from vitally_jax.checkpoint import EXPORT_KIND, export_encoder, load_encoder
        from vitally_jax.fileio import check_output
        from vitally_jax.probes.linear import make_probe
        from vitally_jax.probes.sweep import check_sweep_folder as start_sweep_folder_check
        from vitally_jax.probes.sweep import sweep_screen

        baselines = [] if args.baselines == "none" else [b for b in args.baselines.split(",") if b]
        tasks = [t for t in args.tasks.split(",") if t]
        if not tasks:
            raise ConfigError("--tasks: give at least one of perturbation, gene_groups")
        inputs = [args.encoder, args.store]
        # refused before any work: outputs that are not ours, or that lie inside an input
        start_sweep_folder_check(args.out, overwrite=args.overwrite, inputs=inputs)
        if args.trim:
            check_output(args.trim, EXPORT_KIND, overwrite=args.overwrite, inputs=inputs + [args.out])
        enc, cfg, _ = load_encoder(args.encoder)
        options = {
            "perturbation": {"test_fraction": args.test_fraction},
            "gene_groups": {
                "min_size": args.group_min_size,
                "max_size": args.group_max_size,
                "max_groups": args.max_groups,
                "n_splits": args.folds,
                "seed": args.seed,
            },
        }
        table, b_star = sweep_screen(
            enc,
            args.store,
            args.out,
            pooling=args.pooling,
            baselines=baselines,
            tasks=tasks,
            probe=make_probe(args.backend, C=args.C),
            task_options=options,
            crop=args.crop,
            batch_size=args.batch_size,
            chunk_images=args.chunk_images,
            seed=args.seed,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
        best = table.loc[table.groupby(["source", "task"])["score"].idxmax()]
        print(best.rename(columns={"block": "best_block", "score": "balanced_accuracy"}).to_string(index=False))
        print("b*: " + ", ".join(f"{k}={v}" for k, v in b_star.items()) + f" (of {cfg.depth} blocks)")
        print(f"wrote {args.out}/sweep.csv, sweep.json, sweep.png")
        if args.trim:
            readout = {"blocks": [b_star["overall"]], "pooling": [args.pooling]}
            path = export_encoder(
                args.trim,
                nnx.state(enc),
                cfg,
                num_blocks=b_star["overall"],
                readout=readout,
                overwrite=args.overwrite,
                inputs=inputs + [args.out],
            )
            print(
                f"wrote {path}: encoder trimmed to {b_star['overall']} blocks, read out at block "
                f"{b_star['overall']} with {args.pooling} pooling"
            )
        return 0

    return run_cli(work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
