"""Regenerate the PyTorch reference outputs ("goldens") that the JAX models are tested against.

Runs ONLY in an optional environment with torch and timm; CI never imports torch (the tests read the committed
`tests/goldens/*.npz`). Environments used (see tools/goldens/requirements.txt):

    python -m venv /work/goldens-venv
    /work/goldens-venv/bin/pip install torch==2.13.0 numpy pyyaml huggingface_hub safetensors pillow
    /work/goldens-venv/bin/pip install --no-deps timm==0.9.7          # legacy mlp_bias semantics
    /work/goldens-venv/bin/python tools/goldens/make_goldens.py   # *_legacy.npz, openphenom_masked_fourier.npz

    python -m venv /work/goldens-venv-timm1                            # same, but 'timm>=1.0.25'
    /work/goldens-venv-timm1/bin/python tools/goldens/make_goldens.py          # writes vit_new.npz

torchvision: timm 0.9.7 imports torchvision while importing itself (`timm.layers.norm_act` takes
FrozenBatchNorm2d from it; `timm.data` takes transforms), yet no ViT code path uses it. The PyPI torchvision
wheel is a CUDA build whose compiled ops cannot register against the CPU torch wheel (`operator torchvision::nms
does not exist`), so `import timm` fails with it installed. timm is therefore installed with `--no-deps` and this
script registers an import-time placeholder package named `torchvision` BEFORE importing timm: importing its
names works, but calling or instantiating anything from it raises. The script checks at the end that nothing
from torchvision was used. Nothing of torchvision or timm is copied.

What is built, at tiny geometry (24x24 images, patch 8, width 32, depth 3, 2 heads, MLP 128):
1. timm VisionTransformer with Recursion's settings (ParallelScalingBlock, qkv_bias=False, qk_norm=True,
   init_values=1e-4, class token, fixed 2-D sin-cos positions, global_pool='token').
2. The MAE around it, written in torch below from the spec (timm has no MAE): masking with injected noise,
   standard decoder of timm Blocks, masked MSE + Fourier loss in both modes.
3. (legacy environment only) The channel-agnostic path, which has no timm model either: CA patch embedding,
   the timm encoder with global_pool='avg', and the OpenPhenom channel-agnostic decoder, restated in torch below.
4. (legacy environment only) `openphenom_masked_fourier.npz`: the channel-agnostic MAE with OpenPhenom's released
   decoder defaults (CAMAEDecoder: 16-head blocks, 8-head cross-attention, LayerNorm eps 1e-6, as in the public
   phenom_beta config) and its default loss, the masked Fourier term (`mask_fourier_loss=True`; see `losses`).
   Only the weights, inputs, mask, latent, reconstruction and losses are kept. `--only NAME` writes one golden,
   `--out DIR` writes elsewhere (e.g. to compare a regeneration with the committed files).
Every parameter is moved away from its initial value (LayerScale ~0.5, LayerNorm scales 1 +- 0.1, every bias
incl. mlp_bias ~N(0, 0.1), weights ~N(0, 1/fan_in)). State dicts use the OpenPhenom key layout.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import math
import pathlib
import sys
import types


# ---------------------------------------------------------------------------------------------------------------
# torchvision placeholder (see the module docstring)
# ---------------------------------------------------------------------------------------------------------------
class _NotAvailable:
    used: list[str] = []

    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        _NotAvailable.used.append(self._name)
        raise RuntimeError(f"torchvision is not installed here: {self._name} was called")

    def __getattr__(self, key):
        return _NotAvailable(f"{self._name}.{key}")

    def __mro_entries__(self, bases):
        return (object,)


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, key):
        if key.startswith("__"):
            raise AttributeError(key)
        return _NotAvailable(f"{self.__name__}.{key}")


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _PlaceholderModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


sys.meta_path.insert(0, _PlaceholderFinder())

from functools import partial  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.models.vision_transformer import Block, Mlp, ParallelScalingBlock, VisionTransformer  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent.parent.parent / "tests" / "goldens"
GEOM = dict(
    img=24,
    patch=8,
    chans=3,
    width=32,
    depth=3,
    heads=2,
    mlp_ratio=4,
    dec_width=16,
    dec_depth=2,
    dec_heads=2,
    ca_max_chans=4,
    ca_dec_depth=1,
    ca_cross_heads=2,
    batch=2,
    mask_ratio=0.75,
    fourier_weight=0.01,
)


# ---------------------------------------------------------------------------------------------------------------
# Spec functions restated in torch
# ---------------------------------------------------------------------------------------------------------------
def sincos_table(dim, grid, cls_row=True, repeat=1):
    """(1, cls + repeat*grid^2, dim): [sin(i w), cos(i w), sin(j w), cos(j w)], w_k = 10000^(-k/(dim/4))."""
    d4 = dim // 4
    w = 1.0 / (10000.0 ** (torch.arange(d4, dtype=torch.float64) / d4))
    ii, jj = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    a, b = ii.reshape(-1, 1) * w, jj.reshape(-1, 1) * w
    t = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1).float().repeat(repeat, 1)
    if cls_row:
        t = torch.cat([torch.zeros(1, dim), t], dim=0)
    return t[None]


def self_standardize(pixels_nchw_uint8):
    x = pixels_nchw_uint8.float() / 255.0
    return nn.InstanceNorm2d(x.shape[1], affine=False, track_running_stats=False, eps=1e-5)(x)


def random_masking(x, ratio, noise):
    n, length, d = x.shape
    keep = int(length * (1 - ratio))
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    kept = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, restore), restore


def patchify(x, p):
    n, c, h, w = x.shape
    t = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return t.reshape(n, (h // p) * (w // p), p * p * c)


def patchify_channels(x, p):
    n, c, h, w = x.shape
    t = x.reshape(n, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5)
    return t.reshape(n, c * (h // p) * (w // p), p * p)


def unpatchify(t, p, c, g):
    n = t.shape[0]
    return t.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)


def unpatchify_channels(t, p, c, g):
    n = t.shape[0]
    return t.reshape(n, c, g, g, p, p).permute(0, 1, 2, 4, 3, 5).reshape(n, c, g * p, g * p)


def losses(pred, target, mask, pred_img, target_img, modalities, weight, masked=False):
    """masked=True adds OpenPhenom's masked Fourier loss (`mask_fourier_loss=True`, its default): the FourierLoss
    element-wise tensor (B, K*M, s, s) reshaped back to tokens (B, H_W*M, C) = (B, L, K), `.mean(dim=-1)`, then
    `(floss * mask).sum() / mask.sum()`, as in OpenPhenom's `compute_MAE_loss`. (The released `loss.py` gates that
    reshape on `not self.num_bins` / `not self.num_modalities`; with either the masked branch cannot run, so the
    reshape the loss's own comment describes is what is restated here.)"""
    rec = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    b, n, k = pred.shape
    s = int(math.isqrt(n // modalities))
    shape = (b, k * modalities, s, s)
    per_elem = (torch.fft.fft2(pred.reshape(shape)).abs() - torch.fft.fft2(target.reshape(shape)).abs()).abs()
    ref = per_elem.mean()
    img = (torch.fft.fft2(pred_img).abs() - torch.fft.fft2(target_img).abs()).abs().mean()
    out = {
        "loss_rec": rec,
        "loss_fourier_reference": ref,
        "loss_fourier_image": img,
        "loss_reference": (1 - weight) * rec + weight * ref,
        "loss_image": (1 - weight) * rec + weight * img,
    }
    if masked:
        msk = (per_elem.reshape(b, n, k).mean(dim=-1) * mask).sum() / mask.sum()
        out.update(loss_fourier_masked=msk, loss_masked=(1 - weight) * rec + weight * msk)
    return out


class ChannelAgnosticPatchEmbed(nn.Module):
    """One Conv2d(1 -> D, p, p) shared by all channels; tokens channel-major (c, row, col)."""

    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        per_channel = [self.proj(x[:, c : c + 1]).flatten(2).transpose(1, 2) for c in range(x.shape[1])]
        return torch.cat(per_channel, dim=1)


class CrossAttention(nn.Module):
    """Multi-head attention of queries x over context; q/kv projections without bias, output with bias."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx):
        b, t, d = x.shape
        s, hd = ctx.shape[1], d // self.heads
        q = self.q(x).reshape(b, t, self.heads, hd).transpose(1, 2)
        kv = self.kv(ctx).reshape(b, s, 2, self.heads, hd)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class StandardDecoder(nn.Module):
    def __init__(self, dim, depth, heads, grid):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.pos_embeddings = nn.Parameter(sincos_table(dim, grid), requires_grad=False)

    def forward(self, x):
        return self.norm(self.blocks(x + self.pos_embeddings))


class ChannelAgnosticDecoder(nn.Module):
    """OpenPhenom-style decoder: modality tokens, shared cross-attention + MLP, one block stack per channel."""

    def __init__(self, dim, depth, heads, cross_heads, channels, grid, eps=1e-5):
        super().__init__()
        self.channels, self.tokens = channels, grid * grid
        norm = partial(nn.LayerNorm, eps=eps)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.placeholder = nn.Parameter(torch.zeros(1, 1, dim), requires_grad=False)
        self.modality_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, 1, dim)) for _ in range(channels)])
        self.cross_attention = CrossAttention(dim, cross_heads)
        self.mlp = Mlp(dim, hidden_features=4 * dim)
        self.decoders = nn.ModuleList(
            [
                nn.Sequential(*[Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
                for _ in range(channels)
            ]
        )
        self.context_norm, self.query_norm, self.out_norm = norm(dim), norm(dim), norm(dim)
        self.pos_embeddings = nn.Parameter(sincos_table(dim, grid, repeat=channels), requires_grad=False)

    def forward(self, x):
        mods = torch.cat([self.placeholder] + [m.expand(-1, self.tokens, -1) for m in self.modality_tokens], dim=1)
        x = x + self.pos_embeddings + mods
        patches = x[:, 1:]
        ctx = self.context_norm(patches)
        outs = []
        for c, stack in enumerate(self.decoders):
            z = patches[:, c * self.tokens : (c + 1) * self.tokens]
            z = self.cross_attention(self.query_norm(z), ctx)
            z = z + self.mlp(self.out_norm(z))
            outs.append(stack(z))
        return torch.cat([x[:, :1]] + outs, dim=1)


class MAE(nn.Module):
    """Encoder (timm ViT under encoder.vit_backbone), projection, decoder, prediction head."""

    def __init__(self, vit, decoder, dec_width, pred_dim):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.vit_backbone = vit
        self.decoder = decoder
        self.encoder_decoder_proj = nn.Linear(vit.embed_dim, dec_width)
        self.decoder_pred = nn.Linear(dec_width, pred_dim)


def encoder_tokens(vit, x, channel_agnostic):
    """Patch tokens + CLS + fixed positions, exactly as the reference adds them (before the blocks)."""
    t = vit.patch_embed(x)
    t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
    return t + vit.pos_embed[:, : t.shape[1]]


def run(mae, x, noise, channel_agnostic, geom):
    vit = mae.encoder.vit_backbone
    out = {}
    # every block's tokens and readouts in one pass
    t = vit.norm_pre(encoder_tokens(vit, x, channel_agnostic))
    per_block = []
    for blk in vit.blocks:
        t = blk(t)
        per_block.append(t)
    if not channel_agnostic:
        assert torch.allclose(t, vit.blocks(vit.norm_pre(encoder_tokens(vit, x, False)))), "manual loop != timm"
        ref = vit.forward_features(x)
        assert torch.allclose(vit.norm(t), ref, atol=1e-6), "encoder tokens != timm forward_features"
    final_norm = vit.norm if vit.global_pool == "token" else vit.fc_norm
    out["block_tokens"] = torch.stack(per_block)  # (nb, B, N, D)
    out["cls"] = torch.stack([b[:, 0] for b in per_block], 1)
    out["cls_norm"] = torch.stack([final_norm(b[:, 0]) for b in per_block], 1)
    out["mean"] = torch.stack([b[:, 1:].mean(1) for b in per_block], 1)
    out["mean_norm"] = torch.stack([final_norm(b[:, 1:].mean(1)) for b in per_block], 1)
    if vit.global_pool == "token":
        out["timm_embedding"] = vit.forward_head(vit.forward_features(x), pre_logits=True)
    else:
        out["timm_embedding"] = vit.forward_head(t, pre_logits=True)
    # MAE
    t = encoder_tokens(vit, x, channel_agnostic)
    kept, mask, restore = random_masking(t[:, 1:], geom["mask_ratio"], noise)
    t = vit.blocks(vit.norm_pre(torch.cat([t[:, :1], kept], dim=1)))
    latent = vit.norm(t)  # Identity for global_pool='avg'
    y = mae.encoder_decoder_proj(latent)
    n_mask = restore.shape[1] + 1 - y.shape[1]
    body = torch.cat([y[:, 1:], mae.decoder.mask_token.expand(y.shape[0], n_mask, -1)], dim=1)
    body = torch.gather(body, 1, restore[..., None].expand(-1, -1, y.shape[2]))
    y = mae.decoder(torch.cat([y[:, :1], body], dim=1))
    pred = mae.decoder_pred(y)[:, 1:]
    p, c, g = geom["patch"], x.shape[1], geom["img"] // geom["patch"]
    if channel_agnostic:
        target, pred_img, m = patchify_channels(x, p), unpatchify_channels(pred, p, c, g), c
    else:
        target, pred_img, m = patchify(x, p), unpatchify(pred, p, c, g), 1
    out.update(latent=latent, mask=mask, ids_restore=restore, pred=pred, target=target)
    out.update(losses(pred, target, mask, pred_img, x, m, geom["fourier_weight"], masked=geom.get("masked", False)))
    return out


def perturb(model, gen):
    """Move every trainable parameter away from its initial value."""
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if not prm.requires_grad:
                continue
            leaf = name.split(".")[-1]
            parent = name.rsplit(".", 1)[0]
            module = model.get_submodule(parent) if "." in name else model
            if leaf == "gamma":
                prm.copy_(0.5 + 0.1 * torch.randn(prm.shape, generator=gen))
            elif isinstance(module, nn.LayerNorm) and leaf == "weight":
                prm.copy_(1.0 + 0.1 * (2 * torch.rand(prm.shape, generator=gen) - 1))
            elif leaf in ("bias", "mlp_bias"):
                prm.copy_(0.1 * torch.randn(prm.shape, generator=gen))
            elif prm.ndim >= 2 and leaf == "weight":
                fan_in = prm[0].numel()
                prm.copy_(torch.randn(prm.shape, generator=gen) / math.sqrt(fan_in))
            else:  # cls/mask/modality tokens
                prm.copy_(0.5 * torch.randn(prm.shape, generator=gen))


def build(channel_agnostic, geom):
    g = geom["img"] // geom["patch"]
    vit = VisionTransformer(
        img_size=geom["img"],
        patch_size=geom["patch"],
        in_chans=geom["chans"],
        num_classes=0,
        embed_dim=geom["width"],
        depth=geom["depth"],
        num_heads=geom["heads"],
        mlp_ratio=geom["mlp_ratio"],
        qkv_bias=False,
        qk_norm=True,
        init_values=1e-4,
        block_fn=ParallelScalingBlock,
        class_token=True,
        fc_norm=None,
        drop_path_rate=0.0,
        global_pool="avg" if channel_agnostic else "token",
    )
    if channel_agnostic:
        vit.patch_embed = ChannelAgnosticPatchEmbed(geom["patch"], geom["width"])
        vit.pos_embed = nn.Parameter(sincos_table(geom["width"], g, repeat=geom["ca_max_chans"]), requires_grad=False)
        dec = ChannelAgnosticDecoder(
            geom["dec_width"],
            geom["ca_dec_depth"],
            geom["dec_heads"],
            geom["ca_cross_heads"],
            geom["chans"],
            g,
            eps=geom.get("dec_eps", 1e-5),
        )
        pred_dim = geom["patch"] ** 2
    else:
        vit.pos_embed = nn.Parameter(sincos_table(geom["width"], g), requires_grad=False)
        dec = StandardDecoder(geom["dec_width"], geom["dec_depth"], geom["dec_heads"], g)
        pred_dim = geom["patch"] ** 2 * geom["chans"]
    return MAE(vit, dec, geom["dec_width"], pred_dim).eval()


# OpenPhenom as released: CAMAEDecoder's defaults (LayerNorm eps 1e-6 as in the public phenom_beta config, 16-head
# decoder blocks, 8-head cross-attention) and its default loss, the masked Fourier term (mask_fourier_loss=True).
# Encoder depth 2 and decoder width 16 (head dims 1 and 2) keep the file small.
OPENPHENOM_GEOM = dict(GEOM, depth=2, dec_width=16, dec_heads=16, ca_cross_heads=8, dec_eps=1e-6, masked=True)
# what the masked-loss golden keeps (the encoder readouts are covered by ca_mae_legacy.npz)
MASKED_KEYS = ("latent", "mask", "pred", "target", "loss_rec", "loss_fourier_reference", "loss_reference")
MASKED_KEYS += ("loss_fourier_masked", "loss_masked")


def make(name, channel_agnostic, seed, geom=GEOM, keep=None, out_dir=None):
    """Build, perturb and run one model; write `name`.npz (keep: only these outputs, besides weights and inputs)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mae = build(channel_agnostic, geom)
    perturb(mae, gen)
    b, c, s = geom["batch"], geom["chans"], geom["img"]
    pixels = (torch.rand(b, c, s, s, generator=gen) * 200 + torch.arange(c).view(1, c, 1, 1) * 20).to(torch.uint8)
    x = self_standardize(pixels)
    g = s // geom["patch"]
    n_tokens = g * g * (c if channel_agnostic else 1)
    noise = torch.rand(b, n_tokens, generator=gen)
    with torch.no_grad():
        out = run(mae, x, noise, channel_agnostic, geom)
    arrays = {f"sd/{k}": v.detach().numpy().astype(np.float32) for k, v in mae.state_dict().items()}
    arrays["pixels"] = pixels.permute(0, 2, 3, 1).numpy()  # NHWC uint8
    arrays["x"] = x.permute(0, 2, 3, 1).numpy()  # NHWC float32
    arrays["noise"] = noise.numpy()
    for k, v in out.items():
        if keep is None or k in keep:
            arrays[k] = v.detach().numpy()
    meta = dict(geom, channel_agnostic=channel_agnostic, timm=timm.__version__, torch=torch.__version__, seed=seed)
    arrays["meta"] = np.array(json.dumps(meta))
    out_dir = pathlib.Path(out_dir or OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.npz"
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="regenerate tests/goldens/{mae,ca_mae}_*.npz")
    ap.add_argument("--only", action="append", help="write only this golden (repeatable), e.g. mae_legacy")
    ap.add_argument("--out", default=None, help="folder to write to (default tests/goldens)")
    args = ap.parse_args(argv)
    legacy = tuple(int(v) for v in timm.__version__.split(".")[:3]) <= (1, 0, 24)
    if legacy:
        jobs = {
            "mae_legacy": dict(channel_agnostic=False, seed=0),
            "ca_mae_legacy": dict(channel_agnostic=True, seed=1),
            # OpenPhenom's default loss with the masked Fourier term, on its decoder defaults
            "openphenom_masked_fourier": dict(channel_agnostic=True, seed=2, geom=OPENPHENOM_GEOM, keep=MASKED_KEYS),
        }
    else:
        jobs = {"mae_new": dict(channel_agnostic=False, seed=0)}
    unknown = sorted(set(args.only or ()) - set(jobs))
    if unknown:
        raise SystemExit(f"--only: {unknown} not written by this timm {timm.__version__}; choose from {sorted(jobs)}")
    for name, kw in jobs.items():
        if not args.only or name in args.only:
            make(name, out_dir=args.out, **kw)
    if _NotAvailable.used:
        raise SystemExit(f"torchvision placeholder was used: {_NotAvailable.used}")


if __name__ == "__main__":
    main()
