"""Load the files `tools/goldens/export_trained.py` wrote into real timm 0.9.7 / the OpenPhenom torch restatement,
compare with our outputs, and save the torch outputs as `tests/goldens/export_trained.npz`.

Runs ONLY in the goldens environment (torch + timm 0.9.7, see tools/goldens/requirements.txt); CI never imports
torch (`tests/test_export_trained.py` reads the committed npz):

    python tools/goldens/export_trained.py --out DIR
    /work/goldens-venv/bin/python tools/goldens/check_export_torch.py --dir DIR   # [--golden PATH]

- `DIR/vit.safetensors` (`export_timm_vit` of a trained encoder): timm's `VisionTransformer` is built from the
  file's `timm_kwargs` metadata (ParallelScalingBlock, legacy mlp_bias semantics of timm <= 1.0.24) and loads
  the state dict strictly; compared: the last block's tokens and `forward_head(forward_features(x),
  pre_logits=True)`, timm's own embedding.
- `DIR/openphenom.safetensors` (`export_openphenom` of a trained channel-agnostic MAE): the OpenPhenom MAE
  restated in torch (`tools/goldens/make_goldens.py`: timm 0.9.7 encoder + channel-agnostic patch embedding +
  the OpenPhenom decoder), sized and configured (decoder heads, cross-attention heads, LayerNorm eps) from the
  file's metadata, loads the state dict strictly; compared: every block's mean-pooled (`predict()`) and
  `fc_norm` embeddings, the last block's tokens, and the masked latent, mask and reconstruction.

Exits non-zero if any difference exceeds 1e-5. The golden holds the exported state dicts (as read from the
files), the inputs and the torch outputs, plus the measured differences.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import make_goldens as mg  # noqa: I001  (first: registers the torchvision placeholder, imports timm and torch)
import numpy as np
import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models import vision_transformer as tv

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
ATOL = 1e-5


def _meta(path: pathlib.Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["vitally_jax"])


def check_timm(folder: pathlib.Path, exp) -> tuple[dict, dict]:
    path = folder / "vit.safetensors"
    meta = _meta(path)
    kw = dict(meta["timm_kwargs"])
    kw["block_fn"] = getattr(tv, kw["block_fn"])
    model = tv.VisionTransformer(**kw).eval()
    sd = load_file(str(path))
    model.load_state_dict(sd, strict=True)
    x = torch.from_numpy(exp["timm/x"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        t = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x))))
        emb = model.forward_head(model.forward_features(x), pre_logits=True)
    out = {"timm/torch_tokens": t.numpy(), "timm/torch_embedding": emb.numpy()}
    diffs = {
        "timm tokens": float(np.abs(out["timm/torch_tokens"] - exp["timm/tokens"]).max()),
        "timm embedding": float(np.abs(out["timm/torch_embedding"] - exp["timm/cls_norm"]).max()),
    }
    out.update({f"timm/sd/{k}": v.numpy() for k, v in sd.items()})
    out["timm/x"] = exp["timm/x"]
    return out, {"mlp_bias": meta["mlp_bias"], "diffs": diffs}


def check_openphenom(folder: pathlib.Path, exp) -> tuple[dict, dict]:
    path = folder / "openphenom.safetensors"
    meta = _meta(path)
    kw, dec = meta["timm_kwargs"], meta["decoder"]
    xn = exp["op/x"]
    sd = load_file(str(path))
    grid = kw["img_size"] // kw["patch_size"]
    pos_rows = sd["encoder.vit_backbone.pos_embed"].shape[1] - 1  # max_in_chans grids
    geom = dict(
        img=kw["img_size"],
        patch=kw["patch_size"],
        chans=dec["channels"],
        width=kw["embed_dim"],
        depth=kw["depth"],
        heads=kw["num_heads"],
        mlp_ratio=kw["mlp_ratio"],
        dec_width=dec["width"],
        dec_heads=dec["heads"],
        ca_max_chans=pos_rows // grid**2,
        ca_dec_depth=dec["depth"],
        ca_cross_heads=dec["cross_attn_heads"],
        dec_eps=dec["eps"],
        mask_ratio=0.75,
        fourier_weight=0.01,
    )
    assert dec["kind"] == "channel_agnostic" and pos_rows == geom["ca_max_chans"] * grid**2
    mae = mg.build(True, geom)
    for m in mae.decoder.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = dec["eps"]
    mae.load_state_dict(sd, strict=True)
    x = torch.from_numpy(xn).permute(0, 3, 1, 2)
    with torch.no_grad():
        res = mg.run(mae, x, torch.from_numpy(exp["op/noise"]), True, geom)
    out = {
        "op/torch_tokens": res["block_tokens"][-1].numpy(),
        "op/torch_mean": res["mean"].numpy(),
        "op/torch_mean_norm": res["mean_norm"].numpy(),
        "op/torch_latent": res["latent"].numpy(),
        "op/torch_mask": res["mask"].numpy(),
        "op/torch_pred": res["pred"].numpy(),
    }
    diffs = {
        f"openphenom {k}": float(np.abs(out[f"op/torch_{k}"] - exp[f"op/{k}"]).max())
        for k in ("tokens", "mean", "mean_norm", "latent", "mask", "pred")
    }
    out.update({f"op/sd/{k}": v.numpy() for k, v in sd.items()})
    out["op/x"], out["op/noise"] = xn, exp["op/noise"]
    return out, {"mlp_bias": meta["mlp_bias"], "decoder": dec, "diffs": diffs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="folder written by tools/goldens/export_trained.py")
    ap.add_argument("--golden", default=str(ROOT / "tests" / "goldens" / "export_trained.npz"))
    args = ap.parse_args(argv)
    if tuple(int(v) for v in timm.__version__.split(".")[:3]) > (1, 0, 24):
        sys.exit(f"error: the legacy mlp_bias check needs timm <= 1.0.24; found {timm.__version__}")
    folder = pathlib.Path(args.dir)
    torch.set_num_threads(1)
    exp = dict(np.load(folder / "expected.npz"))
    a, meta_a = check_timm(folder, exp)
    b, meta_b = check_openphenom(folder, exp)
    diffs = {**meta_a["diffs"], **meta_b["diffs"]}
    for k, v in diffs.items():
        print(f"{k}: max |torch - ours| {v:.2e}")
    meta = {
        "timm": timm.__version__,
        "torch": torch.__version__,
        "trained": json.loads(str(exp["meta"])),
        "timm_file": meta_a,
        "openphenom_file": meta_b,
    }
    arrays = {**a, **b, "meta": np.array(json.dumps(meta))}
    out = pathlib.Path(args.golden)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    if mg._NotAvailable.used:
        sys.exit(f"torchvision placeholder was used: {mg._NotAvailable.used}")
    if max(diffs.values()) > ATOL:
        sys.exit(f"error: the exported weights do not reproduce our outputs in torch (max {max(diffs.values()):.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
