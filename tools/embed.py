"""Embed a whole screen with every block of an encoder: a resumable per-block embedding store.

    python tools/embed.py --encoder runs/g8/encoder --store screen/ --out emb/ --crop 256
    python tools/embed.py --encoder runs/g8/encoder --store screen/ --out emb/ --process-index 1 --process-count 4
    python tools/embed.py --out emb/ --export-block 38 --parquet b38.parquet --h5ad b38.h5ad   # export only

Every image is tiled into non-overlapping crops, every crop embedded in one pass over all blocks, and the crop
embeddings averaged per image (wells are averaged at export, `--level well`). A rerun with the same settings
skips finished chunks; processes started with `--process-index i --process-count n` share one run.
`--random-init` embeds with random weights of the encoder's architecture (a baseline).
"""

from __future__ import annotations

import argparse
import sys

from vitally_jax.cli import run_cli
from vitally_jax.embedding.blocks import DEFAULT_POOLING, DEFAULT_PROBE_POOLING, POOLINGS
from vitally_jax.errors import ConfigError


def _ints(text: str | None):
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from None


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", help="encoder export folder (vitally_jax.load_encoder)")
    p.add_argument("--store", help="image store folder")
    p.add_argument("--out", required=True, help="embedding store folder (created or resumed)")
    p.add_argument("--blocks", default=None, help="comma-separated 1-based blocks (default: all)")
    p.add_argument(
        "--pooling",
        default=",".join(DEFAULT_POOLING),
        help=f"comma-separated: {', '.join(POOLINGS)} (default {','.join(DEFAULT_POOLING)})",
    )
    p.add_argument("--crop", type=int, default=256, help="tile side in pixels")
    p.add_argument("--batch-size", type=int, default=64, help="crops per forward pass")
    p.add_argument("--chunk-images", type=int, default=64, help="images per resumable chunk")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--mesh", default=None, help="data,fsdp,model mesh shape, e.g. -1,1,1 (default: one device)")
    p.add_argument("--process-index", type=int, default=0)
    p.add_argument("--process-count", type=int, default=1)
    p.add_argument(
        "--random-init",
        type=int,
        default=None,
        metavar="SEED",
        help="use random weights of the encoder's architecture (baseline)",
    )
    p.add_argument("--export-block", type=int, default=None, help="export this block after embedding")
    p.add_argument("--export-pooling", default=DEFAULT_PROBE_POOLING, choices=POOLINGS)
    p.add_argument("--level", default="well", choices=["well", "image"])
    p.add_argument("--parquet", default=None, help="Parquet file for --export-block")
    p.add_argument("--h5ad", default=None, help="AnnData .h5ad file for --export-block")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start --out afresh although an embedding store is there (swapped in when complete), and "
        "replace export files written earlier; nothing that vitally_jax did not write is replaced",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _setup_jax():
    from vitally_jax.cli import setup_compilation_cache

    setup_compilation_cache()


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)

    def work():
        from vitally_jax.embedding.screen import ANNDATA_KIND, KIND, TABLE_KIND, export_anndata, export_parquet
        from vitally_jax.fileio import check_output

        inputs = [p for p in (args.encoder, args.store) if p]
        embedding = bool(args.encoder or args.store)
        # refused before any work: outputs that are not ours, or that lie inside an input
        check_output(
            args.out,
            KIND,
            overwrite=args.overwrite and embedding,
            resume=not args.overwrite or not embedding,
            inputs=inputs,
        )
        for path, kind in ((args.parquet, TABLE_KIND), (args.h5ad, ANNDATA_KIND)):
            if path:
                check_output(path, kind, overwrite=args.overwrite, inputs=inputs + [args.out])

        if args.encoder or args.store:
            if not (args.encoder and args.store):
                raise ConfigError("--encoder and --store are both needed to embed (or give neither to export only)")
            _setup_jax()
            from flax import nnx

            from vitally_jax.checkpoint import load_encoder
            from vitally_jax.embedding.screen import embed_screen
            from vitally_jax.sharding import make_mesh

            enc, cfg, _ = load_encoder(args.encoder)
            if args.random_init is not None:
                enc = type(enc)(cfg, rngs=nnx.Rngs(args.random_init))
            mesh = make_mesh(tuple(_ints(args.mesh))) if args.mesh else None
            result = embed_screen(
                enc,
                args.store,
                args.out,
                blocks=_ints(args.blocks),
                pooling=[s for s in args.pooling.split(",") if s],
                crop=args.crop,
                batch_size=args.batch_size,
                chunk_images=args.chunk_images,
                dtype=args.dtype,
                mesh=mesh,
                process_index=args.process_index,
                process_count=args.process_count,
                progress=not args.no_progress,
                overwrite=args.overwrite,
            )
            state = "complete" if result["complete"] else "incomplete (other processes or a rerun finish it)"
            print(
                f"{args.out}: computed {len(result['computed'])} chunks, skipped {len(result['skipped'])} "
                f"finished ones in {result['seconds']:.1f} s; store {state}"
            )
        if args.export_block is not None:
            if not (args.parquet or args.h5ad):
                raise ConfigError("--export-block needs --parquet and/or --h5ad")
            for path, fn in ((args.parquet, export_parquet), (args.h5ad, export_anndata)):
                if path:
                    fn(
                        args.out,
                        path,
                        block=args.export_block,
                        pooling=args.export_pooling,
                        level=args.level,
                        overwrite=args.overwrite,
                    )
                    print(f"wrote {path} (block {args.export_block}, {args.export_pooling}, per {args.level})")
        elif args.parquet or args.h5ad:
            raise ConfigError("--parquet/--h5ad need --export-block")
        return 0

    return run_cli(work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
