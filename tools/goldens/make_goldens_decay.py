"""Write the PyTorch weight-decay parameter groups the reference recipe builds: tests/goldens/decay_groups.json.

Never run by CI (CI does not import torch); `tests/test_decay_mask.py` reads the committed JSON and checks our
optimiser's decay mask (`vitally_jax.optim.decay_mask`) against it leaf by leaf.

What it builds: the two reference models of `tools/goldens/make_goldens.py` (imported, not duplicated), at tiny
size (parameter names do not depend on the size, only the block indices' count does):

- `mae`: timm 0.9.7's VisionTransformer with ParallelScalingBlock (Recursion's settings) and the standard MAE
  decoder, in the OpenPhenom key layout;
- `ca_mae`: the OpenPhenom-shaped channel-agnostic MAE (1-channel patch conv, `fc_norm`, 11-channel position
  table, 6 per-channel decoder stacks, 8-head cross-attention).

The groups are timm's own: `timm.optim.create_optimizer_v2(model, "lion", weight_decay=0.05)` with
`filter_bias_and_bn=True`, i.e. `param_groups_weight_decay(model, wd, model.no_weight_decay())`: a trainable
parameter gets weight decay 0 when it has ndim <= 1, its name ends in `.bias`, or it is in `no_weight_decay()`.
The model's `no_weight_decay()` is the encoder's (timm `VisionTransformer.no_weight_decay()`: `pos_embed`,
`cls_token`, `dist_token`, under `encoder.vit_backbone.`) plus the decoder's tokens and tables, named the same
way timm names the encoder's: `decoder.mask_token`, `decoder.modality_tokens.{c}` (the channel embeddings),
`decoder.pos_embeddings`, `decoder.placeholder`. The fixed tables are not trainable (`requires_grad=False`) and
are in no group. Recorded per trainable parameter: its name -> whether its group has weight decay.

    /work/goldens-venv/bin/python tools/goldens/make_goldens_decay.py     # the timm 0.9.7 environment of
                                                                          # tools/goldens/requirements.txt
"""

from __future__ import annotations

import json
import pathlib
import sys

import make_goldens as mg  # noqa: I001  (first: registers the torchvision placeholder, imports timm and torch)
import timm
import torch
from timm.optim import create_optimizer_v2

OUT = pathlib.Path(__file__).resolve().parent.parent.parent / "tests" / "goldens" / "decay_groups.json"
WEIGHT_DECAY = 0.05
GEOMS = {
    "mae": dict(mg.GEOM),
    "ca_mae": dict(mg.GEOM, chans=6, ca_max_chans=11, ca_cross_heads=8, dec_width=16),
}


def no_weight_decay(mae) -> set[str]:
    """The reference MAE's `no_weight_decay()` names: the timm encoder's (prefixed) + the decoder's tokens/tables."""
    names = {"encoder.vit_backbone." + n for n in mae.encoder.vit_backbone.no_weight_decay()}
    dec = {n for n, _ in mae.decoder.named_parameters()}
    tokens = {
        n for n in dec if n in ("mask_token", "pos_embeddings", "placeholder") or n.startswith("modality_tokens.")
    }
    return names | {"decoder." + n for n in tokens}


def groups(channel_agnostic: bool, geom: dict) -> dict[str, bool]:
    torch.manual_seed(0)
    mae = mg.build(channel_agnostic, geom)
    mae.no_weight_decay = lambda: no_weight_decay(mae)  # what create_optimizer_v2 asks the model for
    opt = create_optimizer_v2(mae, "lion", lr=1e-4, weight_decay=WEIGHT_DECAY, filter_bias_and_bn=True)
    by_id = {id(p): n for n, p in mae.named_parameters()}
    out: dict[str, bool] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            out[by_id[id(p)]] = group["weight_decay"] > 0
    trainable = {n for n, p in mae.named_parameters() if p.requires_grad}
    assert set(out) == trainable, sorted(set(out) ^ trainable)
    return dict(sorted(out.items()))


def main() -> int:
    if tuple(int(v) for v in timm.__version__.split(".")[:2]) != (0, 9):
        sys.exit(f"error: the reference recipe is timm 0.9.7's; found timm {timm.__version__}")
    doc = {
        "about": "trainable parameter -> weight decay on (timm create_optimizer_v2 param groups); "
        "written by tools/goldens/make_goldens_decay.py",
        "timm": timm.__version__,
        "torch": torch.__version__,
        "weight_decay": WEIGHT_DECAY,
    }
    for name, geom in GEOMS.items():
        ca = name == "ca_mae"
        doc[name] = {"geom": geom, "channel_agnostic": ca, "decay": groups(ca, geom)}
    tmp = OUT.with_name(OUT.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(OUT)
    for name in GEOMS:
        d = doc[name]["decay"]
        print(f"{name}: {len(d)} trainable parameters, {sum(d.values())} with weight decay")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.1f} KiB)")
    if mg._NotAvailable.used:
        sys.exit(f"torchvision placeholder was used: {mg._NotAvailable.used}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
