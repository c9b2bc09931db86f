"""Build an image store: generate the synthetic screen, or import an RxRx1 / RxRx3-core / JUMP cpg0016 layout.

  python tools/make_store.py synthetic OUT [--preset tiny|demo|full] [--seed 0] [--set n_genes=100 ...]
  python tools/make_store.py rxrx METADATA_CSV IMAGE_ROOT OUT [--template T] [--concentration-unit uM] [--limit N]
  python tools/make_store.py jump LOAD_DATA_CSV OUT [--image-root DIR] [--perturbations CSV]
                                 [--perturbation-type compound|gene] [--limit N]

Every command accepts `--montage PNG` (a grid of RGB composites of the first wells) and `--debug`.
Outputs are never written over someone else's files: an output path that holds anything but an image store is
refused, and an existing image store is replaced only with `--overwrite` (see docs/errors.md).
Exit codes: 0 ok, 3 bad configuration, 4 bad data, 8 unwritable output, 10 output refused
(see vitally_jax/errors.py).
"""

from __future__ import annotations

import argparse
import ast
import sys
import time

import numpy as np


def _parse_set(items) -> dict:
    from vitally_jax.errors import ConfigError

    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv=None) -> int:
    from vitally_jax.data import importers, synthetic
    from vitally_jax.data.render import MONTAGE_KIND, save_montage
    from vitally_jax.data.store import ImageStore
    from vitally_jax.fileio import check_output

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthetic", help="generate the synthetic Cell Painting screen")
    s.add_argument("out")
    s.add_argument("--preset", default="tiny", choices=sorted(synthetic.PRESETS))
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override SyntheticConfig fields")
    r = sub.add_parser("rxrx", help="import an RxRx1 or RxRx3(-core) folder")
    r.add_argument("metadata_csv")
    r.add_argument("image_root")
    r.add_argument("out")
    r.add_argument("--template", default=None, help="path template under IMAGE_ROOT (see importers.py)")
    r.add_argument("--concentration-unit", default="uM", choices=["uM", "nM"])
    r.add_argument("--limit", type=int, default=None)
    j = sub.add_parser("jump", help="import a JUMP cpg0016 load_data CSV and its TIFFs")
    j.add_argument("load_data_csv")
    j.add_argument("out")
    j.add_argument("--image-root", default=None)
    j.add_argument("--perturbations", default=None, help="CSV: Metadata_Plate, Metadata_Well, perturbation, ...")
    j.add_argument("--perturbation-type", default="compound", choices=["compound", "gene"])
    j.add_argument("--limit", type=int, default=None)
    for p in (s, r, j):
        p.add_argument("--montage", default=None, help="write a PNG montage of the first 16 wells")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace an image store (and montage) already at the output path; nothing else is ever replaced",
        )
    args = ap.parse_args(argv)

    if args.montage:  # refused before any work, like the store itself
        check_output(
            args.montage,
            MONTAGE_KIND,
            overwrite=args.overwrite,
            inputs=[
                p
                for p in (
                    getattr(args, "image_root", None),
                    getattr(args, "metadata_csv", None),
                    getattr(args, "load_data_csv", None),
                    args.out,
                )
                if p
            ],
        )
    t0 = time.perf_counter()
    if args.cmd == "synthetic":
        over = _parse_set(args.set)
        if args.seed is not None:
            over["seed"] = args.seed
        path = synthetic.generate_screen(args.out, synthetic.preset(args.preset, **over), overwrite=args.overwrite)
    elif args.cmd == "rxrx":
        path = importers.import_rxrx(
            args.metadata_csv,
            args.image_root,
            args.out,
            path_template=args.template,
            concentration_unit=args.concentration_unit,
            limit=args.limit,
            overwrite=args.overwrite,
        )
    else:
        path = importers.import_jump(
            args.load_data_csv,
            args.out,
            image_root=args.image_root,
            perturbations=args.perturbations,
            perturbation_type=args.perturbation_type,
            limit=args.limit,
            overwrite=args.overwrite,
        )
    st = ImageStore.open(path)
    m = st.metadata
    print(
        f"{path}: {st.shape[0]} images of {st.shape[1]}x{st.shape[2]}x{st.shape[3]} "
        f"({', '.join(st.channel_names)}), {m.plate.nunique()} plates, {m.experiment.nunique()} experiments, "
        f"{int(m.is_control.sum())} control wells, {m.perturbation[~m.is_control].nunique()} perturbations "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    if args.montage:
        order = np.argsort(m.is_control.to_numpy(), kind="stable")[:16]
        imgs = np.stack([st.read(int(i)) for i in order])
        save_montage(
            imgs,
            args.montage,
            labels=[f"{m.experiment[i]} {m.perturbation[i]}" for i in order],
            overwrite=args.overwrite,
        )
        print(f"montage: {args.montage}")
    return 0


if __name__ == "__main__":
    from vitally_jax.cli import run_cli

    sys.exit(run_cli(main))
