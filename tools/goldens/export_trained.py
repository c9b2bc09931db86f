"""Train tiny MAEs for a few real optimiser steps with the default config, export them to timm and OpenPhenom.

The JAX half of the export check (the PyTorch half is `tools/goldens/check_export_torch.py`):

    python tools/goldens/export_trained.py --out DIR
    /work/goldens-venv/bin/python tools/goldens/check_export_torch.py --dir DIR    # writes
                                                                # tests/goldens/export_trained.npz

Two models, both from `configs/tiny.py` (Lion + one-cycle, weight decay on weight matrices, `model.bias`
'legacy', i.e. timm 0.9.7's one `mlp_bias` per block) at a smaller width, trained for `STEPS` steps of
`vitally_jax.train`'s own jitted update on random uint8 images (the biases then move off zero):

- `mae` (standard MAE, CLS pooling): its encoder is written by `export_timm_vit` to `DIR/vit.safetensors`;
- `ca_mae` (channel-agnostic, OpenPhenom-shaped): the whole MAE is written by `export_openphenom` to
  `DIR/openphenom.safetensors`.

`DIR/expected.npz` holds the inputs and our outputs of the trained models (not of the files): for the timm file
the last block's tokens and the `global_pool='token'` embedding; for the OpenPhenom file every block's mean
(`predict()`) and `fc_norm` embeddings, the last block's tokens, and the masked latent and reconstruction for
fixed noise. `tests/test_export_trained.py` imports `train_few_steps` and `export_models` from here.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np
from flax import nnx

from vitally_jax import config_lib, sharding, train
from vitally_jax.interop import export_openphenom, export_timm_vit

STEPS = 3
BATCH = 8
# smaller than configs/tiny.py's mu/8 so that the committed golden stays small
SIZES = dict(width=32, depth=2, num_heads=2, mlp_dim=128, decoder_width=16, decoder_depth=1, decoder_heads=2)


def tiny_config(variant: str, **model):
    """configs/tiny.py with the default optimiser and `model.bias`, a smaller model, `variant` ('mu/8' or 'CA-mu/8')."""
    c = config_lib.load("tiny")
    c.model.variant = variant
    c.input.global_batch = BATCH
    for k, v in {**SIZES, **model}.items():
        c.model[k] = v
    return c


def train_few_steps(config, steps: int = STEPS, seed: int = 0):
    """`steps` real updates of `vitally_jax.train`'s jitted train step (the trainer's own model, optimiser, shardings)
    on random uint8 images, on one device; returns the trained `MAE` (no store, no checkpoints)."""
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    mae_cfg = train.model_config(config)
    graphdef, _, state_sh, schedules, create = train.build_abstract(config, mae_cfg, mesh)
    step_fn = train.jit_train_step(
        train.make_train_step(graphdef, mae_cfg, schedules, use_drop_path=mae_cfg.encoder.drop_path_rate > 0),
        state_sh,
        mesh,
    )
    rng = np.random.default_rng(seed)
    crop, chans = config.input.crop, config.model.in_chans
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(create())[1], out_shardings=state_sh)()
        key = jax.random.key(config.seed)
        for _ in range(steps):
            images = rng.integers(0, 256, (config.input.global_batch, crop, crop, chans), dtype=np.uint8)
            batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh))}
            state, metrics = step_fn(state, batch, key)
        if not bool(metrics["finite"]):
            raise RuntimeError(f"training diverged: {jax.device_get(metrics)}")
    state = jax.device_get(state)
    model, _ = nnx.merge(graphdef, state)
    return model


def inputs(cfg, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A self-standardised float32 NHWC batch of 2 images and U[0,1) masking noise for `cfg` (an MAEConfig)."""
    from vitally_jax.models.preprocess import self_standardize

    enc = cfg.encoder
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (2, enc.img_size, enc.img_size, enc.in_chans), dtype=np.uint8)
    x = np.asarray(self_standardize(pixels))
    return x, rng.random((2, enc.num_patches), dtype=np.float32)


def our_outputs(model, x: np.ndarray, noise: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Encoder readouts (and, with noise, the masked latent and reconstruction) of an `MAE` or `ViTEncoder`."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, noise):
        m = nnx.merge(graphdef, state)
        enc = m.encoder if noise is not None else m
        out = enc(x)
        res = {"tokens": out["tokens"], **{k: v for k, v in out["blocks"].items()}}
        if noise is not None:
            o = m(x, noise=noise)
            res.update(latent=o["latent"], pred=o["pred"], mask=o["mask"])
        return res

    return {k: np.asarray(v) for k, v in run(state, x, noise).items()}


def export_models(folder: pathlib.Path, *, steps: int = STEPS) -> dict:
    """Train both models, write `vit.safetensors`, `openphenom.safetensors` and `expected.npz` into `folder`;
    returns {'mae': model, 'ca_mae': model, 'expected': arrays}."""
    folder.mkdir(parents=True, exist_ok=True)
    mae = train_few_steps(tiny_config("mu/8"), steps)
    ca = train_few_steps(tiny_config("CA-mu/8"), steps, seed=1)
    export_timm_vit(folder / "vit.safetensors", mae.encoder, overwrite=True)
    export_openphenom(folder / "openphenom.safetensors", ca, overwrite=True)
    x, _ = inputs(mae.cfg, seed=2)
    xc, noise = inputs(ca.cfg, seed=3)
    ours = our_outputs(mae.encoder, x)
    ours_ca = our_outputs(ca, xc, noise)
    expected = {"timm/x": x, "timm/tokens": ours["tokens"], "timm/cls_norm": ours["cls_norm"][:, -1]}
    expected.update({"op/x": xc, "op/noise": noise})
    expected.update({f"op/{k}": ours_ca[k] for k in ("tokens", "mean", "mean_norm", "latent", "pred", "mask")})
    expected["meta"] = np.array(json.dumps({"steps": steps, "sizes": SIZES}))
    tmp = folder / "expected.tmp.npz"
    np.savez(tmp, **expected)
    tmp.replace(folder / "expected.npz")
    return {"mae": mae, "ca_mae": ca, "expected": expected}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for vit.safetensors, openphenom.safetensors, expected.npz")
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args(argv)
    res = export_models(pathlib.Path(args.out), steps=args.steps)
    for name in ("mae", "ca_mae"):
        b = np.abs(np.asarray(res[name].encoder.blocks.mlp_bias[...])).max()
        print(f"{name}: {res[name].cfg.encoder.bias} biases after {args.steps} steps, max |mlp_bias| {b:.2e}")
    print(f"wrote {args.out}/vit.safetensors, openphenom.safetensors, expected.npz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
