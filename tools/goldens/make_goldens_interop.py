"""Write the PyTorch goldens for the weight importers: tests/goldens/interop_*.npz.

Never run by CI (CI does not import torch); the committed .npz files are what the tests read.

What it builds, all at tiny size with every parameter moved off its init (LayerScale ~U(0.3, 0.7), LayerNorm
scales 1 +- 0.1, biases and tokens ~N(0, 0.1..0.5), weights ~N(0, 1/fan_in)) and every value rounded to a
float16-representable number (stored as float16 to keep the files small; exact in float32):

- `interop_dinov2_inputs.npz`: the NHWC input batches shared by the DINOv2 goldens: 42x42 (the training grid
  3x3), 56x70 (position table up-sampled to 4x5) and 28x42 (down-sampled to 2x3).
- `interop_dinov2_mlp.npz`: timm's `vit_small_patch14_dinov2` architecture (width 16, depth 2, 2 heads, patch 14,
  42 px training grid 3x3, `dynamic_img_size=True`): per-block tokens and `forward_features` for each input;
  plus timm's `resample_abs_pos_embed` of the position table to several grids, with and without antialiasing.
- `interop_dinov2_swiglu.npz`: `vit_giant_patch14_dinov2` architecture (packed SwiGLU MLP), width 24.
- `interop_dinov2_reg4.npz`: `vit_small_patch14_reg4_dinov2` (4 register tokens, no_embed_class).
- `interop_openphenom.npz`: an OpenPhenom-shaped channel-agnostic MAE with the EXACT key layout of Recursion's
  checkpoint (`encoder.vit_backbone.*` incl. `fc_norm` and an 11-channel `pos_embed`, `decoder.*` with 6 per-channel
  decoder stacks, 8-head cross-attention and LayerNorm eps 1e-5 (not OpenPhenom's 1e-6: the tests pass it
  explicitly; `openphenom_masked_fourier.npz` of make_goldens.py has the released defaults),
  `encoder_decoder_proj.*`, `decoder_pred.*`). The model is built and run by the torch restatement of the OpenPhenom
  MAE in `tools/goldens/make_goldens.py` (imported, not duplicated; its encoder is timm 0.9.7's VisionTransformer
  with ParallelScalingBlock, legacy mlp_bias semantics) at the OpenPhenom geometry scaled down (24 px, patch 8,
  width 32, depth 2). Saved: uint8 pixels, noise, per-block readouts (CLS, CLS+fc_norm, mean, mean+fc_norm) for the
  6-channel image and for its first 3 channels (channel-agnostic inference on fewer channels), the masked latent,
  mask, ids_restore, reconstruction and losses.

Environment (outside the repo; never the system python), and the two runs:

    python -m venv /work/interop-venv
    /work/interop-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy safetensors
    /work/interop-venv/bin/pip install --no-deps timm==1.0.31
    /work/interop-venv/bin/pip install pyyaml huggingface_hub
    /work/interop-venv/bin/pip install --no-deps --target /work/interop-timm097 timm==0.9.7
    /work/interop-venv/bin/python tools/goldens/make_goldens_interop.py --part dinov2         # timm >= 1.0 (DINOv2)
    PYTHONPATH=/work/interop-timm097 /work/interop-venv/bin/python tools/goldens/make_goldens_interop.py \
        --part openphenom

Export check (our ViT -> timm), not a golden: write `DIR/vit.safetensors` with
`vitally_jax.interop.export_timm_vit` and `DIR/expected.npz` (x, tokens, cls_norm from our encoder), then
    PYTHONPATH=/work/interop-timm097 /work/interop-venv/bin/python tools/goldens/make_goldens_interop.py \
        --part export-check --dir DIR

The OpenPhenom part needs timm <= 1.0.24 (the legacy mlp_bias semantics Recursion trained with); the DINOv2
architectures with `dynamic_img_size` need timm >= 1.0; hence two runs.

Why this torch: every timm 1.0.x imports torchvision when `timm` is imported (`timm.layers.create_norm` imports
`torchvision.ops.misc.FrozenBatchNorm2d`). The PyPI torchvision wheels are linked against the CUDA build of torch
(`libtorch_cuda.so`); next to the `+cpu` torch wheel their operators cannot load and `import torchvision` fails
with "operator torchvision::nms does not exist". The matching PyPI pair (torch 2.14.1 and torchvision 0.29.1,
CUDA builds) runs on a CPU-only machine, so the DINOv2 goldens use it: nothing is patched or stubbed. The
OpenPhenom run imports `tools/goldens/make_goldens.py`, which puts its own import-time torchvision placeholder in
front (explained there); nothing from torchvision is called by either. Numerics on CPU in float32 do not depend on the
torch version at the tolerances tested (1e-5).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import numpy as np
import torch
import torch.nn as nn

if "--part=openphenom" in sys.argv or "openphenom" in sys.argv:
    import make_goldens as models_goldens  # the torch restatement of the OpenPhenom MAE (installs its own
    # torchvision placeholder before importing timm)
try:
    import timm
except ImportError as e:  # pragma: no cover - environment problem, explained in the docstring
    sys.exit(f"error: timm is not importable ({e}); see the environment notes in this script's docstring")


def timm_version() -> tuple[int, ...]:
    return tuple(int(v) for v in timm.__version__.split(".")[:3])


ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
SEED = 20250711


def fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16-representable value, kept as float32."""
    return t.to(torch.float16).to(torch.float32)


def perturb_(model: nn.Module, gen: torch.Generator) -> None:
    """Move EVERY parameter and buffer away from its init, deterministically, then round to float16 values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            if name.endswith("gamma"):
                v = 0.3 + 0.4 * torch.rand(shape, generator=gen)
            elif p.ndim == 1 and ("norm" in name) and name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif name.endswith("bias") or p.ndim == 1:
                v = 0.1 * torch.randn(shape, generator=gen)
            elif any(t in name for t in ("cls_token", "reg_token", "pos_embed", "mask_token", "modality", "token")):
                v = 0.5 * torch.randn(shape, generator=gen)
            else:
                fan_in = int(np.prod(shape[1:]))
                v = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
            p.copy_(fp16_exact(v))


def state_arrays(model: nn.Module, prefix: str = "sd/") -> dict:
    """Parameters as float16 arrays (exact, see fp16_exact) under `prefix`."""
    return {prefix + k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}


def image(gen: torch.Generator, b: int, h: int, w: int, c: int) -> torch.Tensor:
    """A float16-exact NHWC test image batch."""
    return fp16_exact(torch.randn((b, h, w, c), generator=gen))


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 (timm)
# ----------------------------------------------------------------------------------------------------------------


def dinov2_outputs(model, x_nhwc: torch.Tensor) -> dict:
    """Per-block tokens (nb, B, T, D) and forward_features (B, T, D) for one NHWC batch."""
    x = x_nhwc.permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        t = model.patch_embed(x)
        t = model._pos_embed(t)
        t = model.norm_pre(t)
        per_block = []
        for blk in model.blocks:
            t = blk(t)
            per_block.append(t)
        feats = model.forward_features(x)
        assert torch.allclose(model.norm(t), feats)
    return {"tokens": to_np(torch.stack(per_block)), "features": to_np(feats)}


DINOV2_INPUTS = {"native": (2, 42, 42), "up": (1, 56, 70), "down": (1, 28, 42)}  # (B, H, W); grid 3x3, 4x5, 2x3


def make_dinov2(
    name: str, arch: str, width: int, inputs: dict, gen: torch.Generator, out: pathlib.Path, *, resample: bool
) -> None:
    model = timm.create_model(
        arch, pretrained=False, img_size=42, embed_dim=width, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    model.eval()
    perturb_(model, gen)
    arrays = state_arrays(model)
    arrays["meta/arch"] = np.array(arch)
    arrays["meta/num_heads"] = np.array(2)
    for key, x in inputs.items():
        for k, v in dinov2_outputs(model, x).items():
            arrays[f"out/{key}/{k}"] = v
    if resample:
        from timm.layers import resample_abs_pos_embed

        pos = model.pos_embed.detach()
        for size in [(5, 4), (2, 3), (7, 7)]:
            for aa in (True, False):
                r = resample_abs_pos_embed(pos, new_size=list(size), old_size=[3, 3], num_prefix_tokens=1, antialias=aa)
                arrays[f"resample/{size[0]}x{size[1]}/{'aa' if aa else 'plain'}"] = to_np(r)
    np.savez_compressed(out / f"interop_dinov2_{name}.npz", **arrays)


# ----------------------------------------------------------------------------------------------------------------
# OpenPhenom (timm 0.9.7 + the restatement in tools/goldens/make_goldens.py)
# ----------------------------------------------------------------------------------------------------------------

OPENPHENOM_GEOM = dict(
    img=24,
    patch=8,
    chans=6,
    width=32,
    depth=2,
    heads=2,
    mlp_ratio=4,
    dec_width=16,
    dec_depth=1,
    dec_heads=2,
    ca_max_chans=11,
    ca_dec_depth=1,
    ca_cross_heads=8,
    batch=2,
    mask_ratio=0.75,
    fourier_weight=0.01,
)


def readouts(vit, x: torch.Tensor) -> dict:
    """Per-block CLS / mean-of-patches readouts, raw and through fc_norm, (B, nb, D) each, for NCHW x."""
    mg = models_goldens
    with torch.no_grad():
        t = vit.norm_pre(mg.encoder_tokens(vit, x, True))
        cls, mean = [], []
        for blk in vit.blocks:
            t = blk(t)
            cls.append(t[:, 0])
            mean.append(t[:, 1:].mean(1))
        cls, mean = torch.stack(cls, 1), torch.stack(mean, 1)
        return {
            "cls": to_np(cls),
            "cls_norm": to_np(vit.fc_norm(cls)),
            "mean": to_np(mean),
            "mean_norm": to_np(vit.fc_norm(mean)),
            "tokens": to_np(t),
        }


def make_openphenom(out: pathlib.Path) -> None:
    if timm_version() > (1, 0, 24):
        sys.exit(f"error: the OpenPhenom golden needs timm <= 1.0.24 (legacy mlp_bias); found {timm.__version__}")
    mg, geom = models_goldens, OPENPHENOM_GEOM
    gen = torch.Generator().manual_seed(SEED + 1)
    mae = mg.build(True, geom)
    mg.perturb(mae, gen)
    with torch.no_grad():
        for prm in mae.parameters():
            if prm.requires_grad:
                prm.copy_(fp16_exact(prm))
    b, c, s = geom["batch"], geom["chans"], geom["img"]
    pixels = (torch.rand(b, c, s, s, generator=gen) * 200 + torch.arange(c).view(1, c, 1, 1) * 8).to(torch.uint8)
    x = mg.self_standardize(pixels)
    g = s // geom["patch"]
    noise = torch.rand(b, c * g * g, generator=gen)
    with torch.no_grad():
        res = mg.run(mae, x, noise, True, geom)
    fixed = ("encoder.vit_backbone.pos_embed", "decoder.pos_embeddings", "decoder.placeholder")
    arrays = {
        f"sd/{k}": v.detach().numpy().astype(np.float32 if k in fixed else np.float16)
        for k, v in mae.state_dict().items()
    }
    arrays["pixels"] = pixels.permute(0, 2, 3, 1).numpy()  # NHWC uint8
    arrays["noise"] = noise.numpy()
    for k in ("latent", "mask", "ids_restore", "pred", "loss_rec", "loss_fourier_reference", "loss_reference"):
        arrays[f"masked/{k}"] = res[k].detach().numpy()
    vit = mae.encoder.vit_backbone
    for name, xc in (("six", x), ("three", x[:, :3])):
        for k, v in readouts(vit, xc).items():
            arrays[f"embed/{name}/{k}"] = v
    np.testing.assert_allclose(arrays["embed/six/cls"], res["cls"].numpy(), atol=1e-6)
    arrays["meta/geom"] = np.array(repr(geom))
    np.savez_compressed(out / "interop_openphenom.npz", **arrays)


# ----------------------------------------------------------------------------------------------------------------
# Export check: a file written by vitally_jax.interop.export_timm_vit loads into timm and gives our numbers
# ----------------------------------------------------------------------------------------------------------------


def check_export(folder: pathlib.Path) -> None:
    """folder/vit.safetensors (export_timm_vit) + folder/expected.npz (x NHWC, tokens = our last-block tokens,
    cls_norm = our final-block CLS embedding). Builds timm's VisionTransformer from the file's metadata, loads the
    state dict strictly and compares."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file
    from timm.models import vision_transformer as tv

    with safe_open(str(folder / "vit.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["vitally_jax"])
    kw = dict(meta["timm_kwargs"])
    kw["block_fn"] = getattr(tv, kw["block_fn"])
    model = tv.VisionTransformer(**kw).eval()
    missing, unexpected = model.load_state_dict(load_file(str(folder / "vit.safetensors")), strict=True)
    exp = np.load(folder / "expected.npz")
    x = torch.from_numpy(exp["x"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        t = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x))))
        emb = model.forward_head(model.norm(t), pre_logits=True)
    d_tok = float((t - torch.from_numpy(exp["tokens"])).abs().max())
    d_emb = float((emb - torch.from_numpy(exp["cls_norm"])).abs().max())
    print(
        f"timm {timm.__version__} ({meta['mlp_bias']} mlp_bias): max |tokens diff| {d_tok:.2e}, "
        f"max |embedding diff| {d_emb:.2e}"
    )
    if max(d_tok, d_emb) > 1e-5:
        sys.exit("error: the exported weights do not reproduce our outputs in timm")


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "goldens"))
    ap.add_argument("--part", choices=("dinov2", "openphenom", "export-check"), required=True)
    ap.add_argument("--dir", default=None, help="export-check: folder with vit.safetensors and expected.npz")
    args = ap.parse_args(argv)
    if args.part == "export-check":
        check_export(pathlib.Path(args.dir))
        return 0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(SEED)
    print(f"torch {torch.__version__}, timm {timm.__version__}")
    if args.part == "openphenom":
        make_openphenom(out)
        return 0
    if timm_version() < (1, 0, 0):
        sys.exit(f"error: the DINOv2 goldens need timm >= 1.0 (found {timm.__version__})")
    inputs = {k: image(gen, b, h, w, 3) for k, (b, h, w) in DINOV2_INPUTS.items()}
    np.savez_compressed(
        out / "interop_dinov2_inputs.npz", **{k: v.numpy().astype(np.float16) for k, v in inputs.items()}
    )
    make_dinov2("mlp", "vit_small_patch14_dinov2", 16, inputs, gen, out, resample=True)
    make_dinov2("swiglu", "vit_giant_patch14_dinov2", 24, inputs, gen, out, resample=False)  # hidden 2 x 64
    make_dinov2("reg4", "vit_small_patch14_reg4_dinov2", 16, inputs, gen, out, resample=False)
    for f in sorted(out.glob("interop_*.npz")):
        print(f"{f.name}: {f.stat().st_size / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
