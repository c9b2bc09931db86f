"""Convert public PyTorch weights to our formats and back.

    # OpenPhenom (Recursion's CA-MAE-S/16) -> Orbax encoder export that `vitally_jax.load_encoder` reads
    python tools/convert_weights.py openphenom.safetensors --layout openphenom --to orbax out/openphenom_encoder
    # ... trimmed to the first 8 blocks (the paper's block search result b*)
    python tools/convert_weights.py openphenom.safetensors --layout openphenom --to orbax out/enc8 --num-blocks 8
    # a Recursion-style timm ViT (mlp_bias semantics of timm <= 1.0.24 by default)
    python tools/convert_weights.py vit.pth --layout timm-vit --to orbax out/vit
    # DINOv2 (timm or Meta layout; Meta's .pth needs torch) -> timm-layout safetensors
    python tools/convert_weights.py dinov2_vitl14.pth --layout dinov2 --to safetensors out/dinov2_l14.safetensors
    # our Orbax encoder export -> timm safetensors for PyTorch users (the file's metadata has the timm kwargs)
    python tools/convert_weights.py out/vit --layout export --to safetensors vit_timm.safetensors

Layouts of the input: `timm-vit` (bare timm ViT, Recursion settings; `--prefix` selects a sub-model),
`openphenom` (whole maes_microscopy MAE: `encoder.vit_backbone.*`, `decoder.*`, ...), `dinov2` (timm or Meta),
`export` (an Orbax encoder export written by this package). Outputs: `orbax` (encoder export; ViT encoders only)
or `safetensors` (timm layout; OpenPhenom files are re-written whole in their own layout unless
`--encoder-only`; DINOv2 in `--dinov2-layout`).

An existing output is replaced only with `--overwrite`, and only if it is of the same kind and was written by
vitally_jax; an output equal to or inside the input is refused.

Exit codes: 0 ok, 6 weight file problems (missing/unexpected/wrongly shaped keys, unreadable file), 3 bad options,
5 checkpoint problems, 8 unwritable output, 10 output refused. `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import sys

LAYOUTS = ("timm-vit", "openphenom", "dinov2", "export")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Convert public PyTorch weights (OpenPhenom, timm ViT, DINOv2) to "
        "Orbax encoder exports or timm-compatible safetensors, and back."
    )
    ap.add_argument("input", help="weight file (.safetensors, .pth/.pt/.bin/.ckpt, .npz) or Orbax export folder")
    ap.add_argument("--layout", required=True, choices=LAYOUTS, help="layout of the input")
    ap.add_argument("--to", required=True, choices=("orbax", "safetensors"), help="output format")
    ap.add_argument("output", help="output folder (orbax) or .safetensors file")
    ap.add_argument(
        "--mlp-bias",
        default="legacy",
        choices=("legacy", "new"),
        help="mlp_bias semantics of the input: legacy = timm <= 1.0.24 (Recursion), new = timm >= 1.0.25",
    )
    ap.add_argument(
        "--out-mlp-bias",
        default=None,
        choices=("legacy", "new"),
        help="mlp_bias semantics of a safetensors output (default: same as --mlp-bias)",
    )
    ap.add_argument("--prefix", default="", help="timm-vit: key prefix of the encoder inside the file")
    ap.add_argument("--variant", default=None, help="check the geometry, e.g. 'CA-S/16', 'L/8', 'L/14' (DINOv2)")
    ap.add_argument("--num-blocks", type=int, default=None, help="orbax: keep only the first N blocks (b*)")
    ap.add_argument("--encoder-only", action="store_true", help="openphenom -> safetensors: timm encoder only")
    ap.add_argument(
        "--decoder-heads",
        type=int,
        default=None,
        help="openphenom: decoder block heads (default: the file's metadata or the config.json beside it, else 16)",
    )
    ap.add_argument("--dinov2-layout", default="timm", choices=("timm", "meta"), help="dinov2 safetensors layout")
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output of the same kind written by vitally_jax (nothing else is replaced)",
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def convert(args) -> int:
    from flax import nnx

    from vitally_jax import interop as export  # export_timm_vit, export_openphenom, export_dinov2
    from vitally_jax.errors import ConfigError
    from vitally_jax.fileio import check_output
    from vitally_jax.interop import dinov2 as dino
    from vitally_jax.interop import openphenom, timm_vit
    from vitally_jax.interop.readers import SAFETENSORS_KIND

    out_bias = args.out_mlp_bias or args.mlp_bias
    if args.num_blocks is not None and args.to != "orbax":
        raise ConfigError("--num-blocks: only with --to orbax")
    if args.to == "safetensors" and not args.output.endswith(".safetensors"):
        raise ConfigError(f"{args.output}: a safetensors output must end with .safetensors")
    kind = "encoder export" if args.to == "orbax" else SAFETENSORS_KIND
    check_output(args.output, kind, overwrite=args.overwrite, inputs=[args.input])
    ow = {"overwrite": args.overwrite, "inputs": [args.input]}

    if args.layout == "dinov2":
        if args.to == "orbax":
            raise ConfigError(
                "--layout dinov2: Orbax encoder exports hold our ViT encoders; write DINOv2 models "
                "with --to safetensors"
            )
        model = dino.load_dinov2(args.input, variant=args.variant)
        path = export.export_dinov2(args.output, model, layout=args.dinov2_layout, overwrite=args.overwrite)
        return _report(path, model)

    if args.layout == "openphenom" and args.to == "safetensors" and not args.encoder_only:
        heads = {} if args.decoder_heads is None else {"decoder_heads": args.decoder_heads}
        mae = openphenom.load_openphenom(args.input, mlp_bias=args.mlp_bias, **heads)
        if args.variant is not None:
            timm_vit.load_timm_vit(args.input, prefix=openphenom.ENC, variant=args.variant, mlp_bias=args.mlp_bias)
        path = export.export_openphenom(args.output, mae, mlp_bias=out_bias, overwrite=args.overwrite)
        return _report(path, mae)

    if args.layout == "export":
        from vitally_jax.checkpoint import load_encoder

        encoder, _, _ = load_encoder(args.input)
    else:
        prefix = openphenom.ENC if args.layout == "openphenom" else args.prefix
        encoder = timm_vit.load_timm_vit(args.input, mlp_bias=args.mlp_bias, prefix=prefix, variant=args.variant)

    if args.to == "orbax":
        from vitally_jax.checkpoint import export_encoder

        path = export_encoder(args.output, nnx.state(encoder), encoder.cfg, num_blocks=args.num_blocks, **ow)
    else:
        path = export.export_timm_vit(args.output, encoder, mlp_bias=out_bias, overwrite=args.overwrite)
    return _report(path, encoder)


def _report(path, model) -> int:
    import jax
    from flax import nnx

    n = sum(int(a.size) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    cfg = getattr(model, "cfg", None)
    name = type(model).__name__
    print(f"wrote {path}: {name}, {n:,} parameters")
    if cfg is not None:
        print(f"config: {cfg}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from vitally_jax.cli import run_cli

    return run_cli(lambda: convert(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
