"""OpenPhenom / maes_microscopy MAE checkpoints <-> our `MAE` (and its `ViTEncoder`).

Key layout of Recursion's checkpoint (channel-agnostic CA-MAE-S/16):

- `encoder.vit_backbone.*`: timm ViT with ParallelScalingBlock, 1-channel patch conv, `fc_norm` (global_pool
  'avg'; the timm `norm` is the identity, so the masked latent is not normed), `pos_embed` = fixed sin-cos table
  for `max_in_chans` (11) channel grids.
- `encoder_decoder_proj.{weight,bias}`: encoder width -> decoder width.
- `decoder.*`: `mask_token`, `placeholder` (constant zeros added to the decoder CLS token; no effect on any
  output), `modality_tokens.{c}` (1, 1, Dd) per decoder channel, `pos_embeddings` (fixed sin-cos),
  `cross_attention.{q,kv,proj}` (8 heads, fixed in CAMAEDecoder), `mlp.{fc1,fc2}`, `query_norm`, `context_norm`,
  `out_norm`, `decoders.{c}.{i}.*` (timm Blocks, 16 heads, one stack per channel); every decoder LayerNorm has
  eps 1e-6 (CAMAEDecoder's default and the public `phenom_beta` config).
- `decoder_pred.{weight,bias}`: decoder width -> p*p pixels of one channel.

A standard (non channel-agnostic) MAE in the same code base has `decoder.blocks.{i}.*` and `decoder.norm`.
This module holds both directions: the key mapping into our parameters (`mae_params_from_openphenom`,
`load_mae_weights`; the encoder part is `timm_vit`'s), reading files, inferring the geometry from the shapes,
building the model without random init, and the export back to this layout (`openphenom_state_dict`,
`export_openphenom`: safetensors with the encoder's `timm_kwargs` and the decoder settings in the metadata).
An MAE trained with the default `model.bias='legacy'` (one `mlp_bias` per block, timm 0.9.7's) exports exactly;
one trained with `model.bias='free'` is refused with a message naming the option to train with.

Head counts and the eps are not in the shapes: `load_openphenom` reads them from the file's metadata (our export)
or the `config.json` OpenPhenom's `save_pretrained` writes beside `model.safetensors` (a `torch.save` file under
that name, which `readers.read_state_dict` reads by content); failing both it uses the values above and says so
in one warning line. The loss defaults to OpenPhenom's masked Fourier term (`fourier='masked'`).

    mae = MAE(mae_config("CA-S/16"), rngs=nnx.Rngs(0))
    load_mae_weights(mae, openphenom_state_dict)          # encoder.vit_backbone., decoder., ...
    mae = load_openphenom("OpenPhenom/model.safetensors")  # + OpenPhenom/config.json when present
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from vitally_jax.errors import ConfigError, WeightsError
from vitally_jax.interop.params import _flatten, apply_params, flat_params, model_from_params
from vitally_jax.interop.readers import StateDict, export_metadata, read_safetensors_metadata, write_safetensors
from vitally_jax.interop.timm_vit import (
    _linear,
    _norm,
    _prenorm_block,
    _read_encoder,
    _Reader,
    _source_state,
    _stack,
    config_from_timm_state,
    export_mlp_bias,
    load_timm_vit,
    timm_kwargs,
    timm_vit_state_dict,
)
from vitally_jax.models.layers import sincos_2d
from vitally_jax.models.mae import MAE, MAEConfig
from vitally_jax.models.vit import ViTConfig, ViTEncoder

OPENPHENOM_ENCODER = "encoder.vit_backbone."
OPENPHENOM_DECODER = "decoder."
OPENPHENOM_PROJ = "encoder_decoder_proj."
OPENPHENOM_PRED = "decoder_pred."
ENC = OPENPHENOM_ENCODER
DEC = OPENPHENOM_DECODER
PROJ = OPENPHENOM_PROJ
PRED = OPENPHENOM_PRED
OPENPHENOM_DECODER_HEADS = 16
OPENPHENOM_CROSS_ATTN_HEADS = 8
OPENPHENOM_DECODER_EPS = 1e-6
log = logging.getLogger("vitally_jax.interop")


def mae_params_from_openphenom(
    sd: Mapping[str, np.ndarray], cfg, *, mlp_bias: str = "legacy", source: str = "state dict"
) -> dict:
    """OpenPhenom / maes_microscopy MAE state dict -> nested dict matching `nnx.state(MAE(cfg), nnx.Param)`."""
    r = _Reader(sd, source)
    enc = cfg.encoder
    dd, de = cfg.decoder_width, enc.width
    mlp = int(dd * cfg.decoder_mlp_ratio)
    p, g = enc.patch_size, enc.grid
    out = {"encoder": _read_encoder(r, enc, OPENPHENOM_ENCODER, mlp_bias)}
    out["decoder_embed"] = _linear(r, OPENPHENOM_PROJ[:-1], de, dd)
    out["mask_token"] = r.take(OPENPHENOM_DECODER + "mask_token", (1, 1, dd))
    D = OPENPHENOM_DECODER
    ignore: tuple[str, ...] = ()
    if cfg.decoder == "channel_agnostic":
        nc = cfg.decoder_channels
        out["decoder_pred"] = _linear(r, OPENPHENOM_PRED[:-1], dd, p * p)
        out["modality_tokens"] = np.concatenate(
            [r.take(f"{D}modality_tokens.{c}", (1, 1, dd))[0] for c in range(nc)], axis=0
        )
        for name in ("query_norm", "context_norm", "out_norm"):
            out[name] = _norm(r, D + name, dd)
        out["cross_attn"] = {
            "q": _linear(r, D + "cross_attention.q", dd, dd, bias=False),
            "kv": _linear(r, D + "cross_attention.kv", dd, 2 * dd, bias=False),
            "proj": _linear(r, D + "cross_attention.proj", dd, dd),
        }
        out["decoder_mlp"] = {"fc1": _linear(r, D + "mlp.fc1", dd, mlp), "fc2": _linear(r, D + "mlp.fc2", mlp, dd)}
        out["decoder_blocks"] = _stack(
            [
                _prenorm_block(r, f"{D}decoders.{c}.{i}", dd, cfg.decoder_heads, mlp)
                for c in range(nc)
                for i in range(cfg.decoder_depth)
            ]
        )
        r.check_table(D + "pos_embeddings", sincos_2d(g, g, dd, cls_row=True, repeat=nc))
        ignore = (D + "placeholder",)  # constant zeros added to the decoder CLS token, which predicts nothing
    else:
        out["decoder_pred"] = _linear(r, OPENPHENOM_PRED[:-1], dd, p * p * enc.in_chans)
        out["decoder_blocks"] = _stack(
            [_prenorm_block(r, f"{D}blocks.{i}", dd, cfg.decoder_heads, mlp) for i in range(cfg.decoder_depth)]
        )
        out["decoder_norm"] = _norm(r, D + "norm", dd)
        r.check_table(D + "pos_embeddings", sincos_2d(g, g, dd, cls_row=True))
    r.finish(ignore)
    return out


def load_mae_weights(
    mae, sd: Mapping[str, np.ndarray], *, mlp_bias: str = "legacy", source: str = "state dict"
) -> None:
    """Load an OpenPhenom-layout MAE state dict into an `MAE` in place (WeightsError on any mismatch)."""
    apply_params(mae, mae_params_from_openphenom(sd, mae.cfg, mlp_bias=mlp_bias, source=source), source)


# OpenPhenom as released (`mae_modules.CAMAEDecoder` / `MAEDecoder` defaults and the public `phenom_beta` config):
# 16-head decoder blocks, 8-head cross-attention (fixed in CAMAEDecoder), LayerNorm eps 1e-6, and the masked
# Fourier loss (`mask_fourier_loss=True`). Used for what neither the file nor a config.json beside it says.
OPENPHENOM_DEFAULTS = dict(
    decoder_heads=OPENPHENOM_DECODER_HEADS,
    cross_attn_heads=OPENPHENOM_CROSS_ATTN_HEADS,
    decoder_eps=OPENPHENOM_DECODER_EPS,
    fourier="masked",
)
_GEOMETRY = ("decoder_heads", "cross_attn_heads", "decoder_eps")  # not readable from the shapes


def _config_error(where: str, field: str, value, expected: str) -> ConfigError:
    return ConfigError(f"{where}: {field} {value!r}; expected {expected}")


def _settings_from_hf_config(doc, where: str) -> dict:
    """Settings from an OpenPhenom (Hugging Face `MAEConfig`) config.json document; {} if it is not one."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("decoder"), Mapping):
        return {}
    dec = doc["decoder"]
    target = str(dec.get("_target_", ""))
    if not target.endswith(("CAMAEDecoder", "MAEDecoder")) and doc.get("model_type") != "MAE":
        return {}
    out: dict = {}
    for key, field in (("num_heads", "decoder_heads"), ("depth", "decoder_depth"), ("embed_dim", "decoder_width")):
        if key in dec:
            v = dec[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _config_error(where, f"decoder.{key}", v, "a positive integer")
            out[field] = v
    if "num_modalities" in dec and target.endswith("CAMAEDecoder"):
        out["decoder_channels"] = dec["num_modalities"]
    norm = dec.get("norm_layer")
    if isinstance(norm, Mapping) and "eps" in norm:
        eps = norm["eps"]
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
            raise _config_error(where, "decoder.norm_layer.eps", eps, "a number in (0, 1)")
        out["decoder_eps"] = float(eps)
    elif target:  # the decoder class's own default (norm_layer = LayerNorm(eps=1e-6) in both decoders)
        out["decoder_eps"] = OPENPHENOM_DECODER_EPS
    if target.endswith("CAMAEDecoder"):
        out["cross_attn_heads"] = OPENPHENOM_CROSS_ATTN_HEADS  # CAMAEDecoder builds CrossAttention(embed_dim) only
    if "mask_fourier_loss" in doc:
        if not isinstance(doc["mask_fourier_loss"], bool):
            raise _config_error(where, "mask_fourier_loss", doc["mask_fourier_loss"], "true or false")
        out["fourier"] = "masked" if doc["mask_fourier_loss"] else "reference"
    return out


def _settings_from_export(path: pathlib.Path) -> dict:
    """Settings from the metadata `export_openphenom` writes into its safetensors files; {} if there is none."""
    try:
        meta = read_safetensors_metadata(path)
    except WeightsError:
        return {}  # not safetensors (e.g. a torch.save file): nothing stored
    try:
        doc = json.loads(meta.get("vitally_jax", "{}"))
    except json.JSONDecodeError:
        return {}
    dec = doc.get("decoder") if isinstance(doc, Mapping) else None
    if not isinstance(dec, Mapping):
        return {}
    names = dict(heads="decoder_heads", cross_attn_heads="cross_attn_heads", eps="decoder_eps")
    names.update(depth="decoder_depth", width="decoder_width", channels="decoder_channels")
    return {field: dec[key] for key, field in names.items() if dec.get(key) is not None}


def stored_settings(source=None, config=None) -> tuple[dict, str | None]:
    """The decoder settings stored with an OpenPhenom checkpoint, and where they were found (None: nowhere).

    source: the weight file (path); its safetensors metadata (written by `export_openphenom`) is read, else a
    `config.json` in the same folder (what OpenPhenom's `save_pretrained` writes next to `model.safetensors`).
    config: a config.json path or its parsed dict, which takes the place of the file beside the weights.
    Found settings: decoder_heads, decoder_eps, cross_attn_heads, fourier ('masked' if `mask_fourier_loss`), and
    decoder_depth / decoder_width / decoder_channels (checked against the weights' shapes)."""
    if config is not None:
        where = "config" if isinstance(config, Mapping) else str(config)
        if isinstance(config, Mapping):
            doc = config
        else:
            try:
                doc = json.loads(pathlib.Path(config).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(
                    f"{config}: not a readable OpenPhenom config.json ({' '.join(str(e).split())})"
                ) from None
        found = _settings_from_hf_config(doc, where)
        if not found:
            raise ConfigError(f"{where}: not an OpenPhenom config (expected a 'decoder' section naming CAMAEDecoder)")
        return found, where
    if source is None or isinstance(source, Mapping):
        return {}, None
    path = pathlib.Path(source)
    found = _settings_from_export(path)
    if found:
        return found, f"{path} (metadata)"
    beside = path.parent / "config.json"
    if beside.is_file():
        try:
            doc = json.loads(beside.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            doc = None  # some other program's file: not ours to judge
        found = _settings_from_hf_config(doc, str(beside))
        if found:
            return found, str(beside)
    return {}, None


def openphenom_config(
    state: Mapping[str, np.ndarray],
    *,
    source: str = "state dict",
    stored: Mapping | None = None,
    stored_in: str | None = None,
    **overrides,
) -> MAEConfig:
    """Infer an `MAEConfig` from an OpenPhenom-layout state dict.

    Width, depth, channels and MLP width come from the shapes. Head counts and the LayerNorm eps cannot: they come
    from `overrides`, else `stored` (`stored_settings`: the file's metadata or its config.json, named by
    `stored_in`), else OpenPhenom's defaults (`OPENPHENOM_DEFAULTS`: 16 block heads, 8 cross-attention heads,
    eps 1e-6, fourier='masked'), and a warning line says which defaults were used. Encoder fields in `overrides`
    go to the encoder; unknown names and invalid values are one-line `ConfigError`s, as in `mae_config`."""
    enc_fields = set(ViTConfig.__dataclass_fields__)
    mae_fields = set(MAEConfig.__dataclass_fields__) - {"encoder"}
    bad = sorted(set(overrides) - enc_fields - mae_fields)
    if bad:
        raise ConfigError(f"model: unknown MAE option(s) {bad}")
    enc = config_from_timm_state(
        state, prefix=ENC, source=source, **{k: v for k, v in overrides.items() if k in enc_fields}
    )
    mae_over = {k: v for k, v in overrides.items() if k in mae_fields}
    stored = dict(stored or {})
    try:
        dd, de = state[PROJ + "weight"].shape
        mlp = state[DEC + "mlp.fc1.weight"].shape[0] if DEC + "mlp.fc1.weight" in state else None
    except KeyError as e:
        raise WeightsError(f"{source}: not an OpenPhenom MAE state dict (missing {e})") from None
    ca = any(k.startswith(DEC + "modality_tokens.") for k in state)
    if ca:
        nc = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(DEC) + r"modality_tokens\.(\d+)$", k)))
        pat = re.escape(DEC) + r"decoders\.0\.(\d+)\."
        depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(pat, k))), default=-1)
        kw = dict(decoder="channel_agnostic", decoder_channels=nc)
    else:
        depth = 1 + max(
            (int(m.group(1)) for k in state if (m := re.match(re.escape(DEC) + r"blocks\.(\d+)\.", k))), default=-1
        )
        mlp = state.get(DEC + "blocks.0.mlp.fc1.weight", np.zeros((4 * dd, 0))).shape[0]
        kw = dict(decoder="standard")
        stored.pop("cross_attn_heads", None)
    if depth < 1 or mlp is None:
        raise WeightsError(f"{source}: no decoder blocks found under {DEC!r}")
    kw.update(decoder_width=dd, decoder_depth=depth, decoder_mlp_ratio=(mlp or 4 * dd) / dd)
    for field in ("decoder_depth", "decoder_width", "decoder_channels"):  # stored geometry must match the weights
        if field in stored and field in kw and stored[field] != kw[field]:
            raise WeightsError(
                f"{source}: {stored_in} says {field}={stored[field]}, but the weights have {field}={kw[field]}"
            )
    defaulted = []
    for field, default in OPENPHENOM_DEFAULTS.items():
        if field == "cross_attn_heads" and not ca:
            continue
        if field in mae_over:
            kw[field] = mae_over[field]
        elif field in stored:
            kw[field] = stored[field]
        else:
            kw[field] = default
            if field in _GEOMETRY:
                defaulted.append(f"{field}={default}")
    kw.update(mae_over)
    if defaulted:
        log.warning(
            "%s: %s not stored in the file%s; using OpenPhenom's defaults (CAMAEDecoder, phenom_beta); pass them "
            "to load_openphenom to override",
            source,
            ", ".join(defaulted),
            "" if stored_in else " nor in a config.json beside it",
        )
    try:
        return MAEConfig(encoder=enc, **kw)
    except TypeError as e:
        raise ConfigError(f"OpenPhenom model: {e}") from None
    except ConfigError as e:
        if defaulted:
            raise ConfigError(f"{source}: {e} (with {', '.join(defaulted)}: OpenPhenom's defaults)") from None
        raise


def load_openphenom(source, *, mlp_bias: str = "legacy", config=None, **overrides) -> MAE:
    """Load a full OpenPhenom-layout MAE (path or state dict) into our `MAE` (encoder + decoder).

    mlp_bias: 'legacy' (Recursion's timm 0.9.7, default) | 'new'. config: OpenPhenom's config.json (path or dict;
    default: the one beside the weight file, if any). overrides: encoder or MAE config fields (decoder_heads,
    cross_attn_heads, decoder_eps, fourier, mask_ratio, dtype, ...), validated like `mae_config`'s. Decoder
    head counts and eps come from overrides, the file's metadata or config.json, else OpenPhenom's defaults
    (`openphenom_config`); the loss defaults to OpenPhenom's masked Fourier term (fourier='masked').
    """
    name, state = _source_state(source, "")
    stored, stored_in = stored_settings(source, config)
    cfg = openphenom_config(
        state, source=name, stored=stored, stored_in=stored_in, **{"bias": mlp_bias, **overrides}
    )  # blocks as the file's
    nested = mae_params_from_openphenom(state, cfg, mlp_bias=mlp_bias, source=name)
    return model_from_params(lambda: MAE(cfg, rngs=nnx.Rngs(0)), _flatten(nested), source=name)


def load_openphenom_encoder(source, *, mlp_bias: str = "legacy", **overrides) -> ViTEncoder:
    """Only the encoder of an OpenPhenom checkpoint (`encoder.vit_backbone.*`; decoder keys are ignored)."""
    return load_timm_vit(source, mlp_bias=mlp_bias, prefix=ENC, **overrides)


def openphenom_state_dict(
    mae: MAE, *, mlp_bias: str | None = None, fixed: Mapping[str, np.ndarray] | None = None
) -> StateDict:
    """Our `MAE` -> a state dict in the OpenPhenom layout (float32 numpy, PyTorch shapes).

    mlp_bias: the encoder blocks' semantics to write (None = the model's own `bias`; OpenPhenom's code is timm
    0.9.7, 'legacy'). A model trained with `model.bias='free'` is refused (`timm_vit.encoder_to_timm`).

    The fixed tables (`encoder.vit_backbone.pos_embed`, `decoder.pos_embeddings`) are recomputed and
    `decoder.placeholder` is zeros, unless `fixed` supplies them (e.g. the arrays of the file a model was loaded
    from, so that a load/export round trip reproduces the file bit for bit); supplied tables must equal the
    recomputed ones within 1e-5.
    """
    cfg = mae.cfg
    enc = cfg.encoder
    p = {k: np.asarray(v, np.float32) for k, v in flat_params(mae).items()}
    out = timm_vit_state_dict(mae.encoder, mlp_bias=mlp_bias, prefix=ENC)
    t = lambda a: np.ascontiguousarray(a.T)  # noqa: E731

    def lin(ours: str, theirs: str, i: int | None = None, bias: bool = True):
        k = p[ours + ".kernel"] if i is None else p[ours + ".kernel"][i]
        out[theirs + ".weight"] = t(k)
        if bias:
            out[theirs + ".bias"] = p[ours + ".bias"] if i is None else p[ours + ".bias"][i]

    def norm(ours: str, theirs: str, i: int | None = None):
        out[theirs + ".weight"] = p[ours + ".scale"] if i is None else p[ours + ".scale"][i]
        out[theirs + ".bias"] = p[ours + ".bias"] if i is None else p[ours + ".bias"][i]

    def block(j: int, theirs: str):
        b = "decoder_blocks."
        norm(b + "norm1", theirs + ".norm1", j)
        lin(b + "qkv", theirs + ".attn.qkv", j)
        lin(b + "proj", theirs + ".attn.proj", j)
        norm(b + "norm2", theirs + ".norm2", j)
        lin(b + "fc1", theirs + ".mlp.fc1", j)
        lin(b + "fc2", theirs + ".mlp.fc2", j)

    lin("decoder_embed", PROJ[:-1])
    lin("decoder_pred", PRED[:-1])
    out[DEC + "mask_token"] = p["mask_token"]
    dd, g = cfg.decoder_width, enc.grid
    if cfg.decoder == "channel_agnostic":
        nc = cfg.decoder_channels
        for c in range(nc):
            out[f"{DEC}modality_tokens.{c}"] = p["modality_tokens"][c][None, None]
        for n in ("query_norm", "context_norm", "out_norm"):
            norm(n, DEC + n)
        lin("cross_attn.q", DEC + "cross_attention.q", bias=False)
        lin("cross_attn.kv", DEC + "cross_attention.kv", bias=False)
        lin("cross_attn.proj", DEC + "cross_attention.proj")
        lin("decoder_mlp.fc1", DEC + "mlp.fc1")
        lin("decoder_mlp.fc2", DEC + "mlp.fc2")
        for c in range(nc):
            for i in range(cfg.decoder_depth):
                block(c * cfg.decoder_depth + i, f"{DEC}decoders.{c}.{i}")
        out[DEC + "pos_embeddings"] = sincos_2d(g, g, dd, cls_row=True, repeat=nc)[None]
        out[DEC + "placeholder"] = np.zeros((1, 1, dd), np.float32)
    else:
        for i in range(cfg.decoder_depth):
            block(i, f"{DEC}blocks.{i}")
        norm("decoder_norm", DEC + "norm")
        out[DEC + "pos_embeddings"] = sincos_2d(g, g, dd, cls_row=True)[None]
    for key, arr in (fixed or {}).items():
        if key not in (ENC + "pos_embed", DEC + "pos_embeddings", DEC + "placeholder"):
            raise WeightsError(
                f"openphenom_state_dict: {key!r} is not a fixed table; only pos tables and the "
                "placeholder can be supplied"
            )
        if key in out and (np.shape(arr) != out[key].shape or not np.allclose(arr, out[key], atol=1e-5)):
            raise WeightsError(f"openphenom_state_dict: supplied {key} {np.shape(arr)} differs from the fixed table")
        out[key] = np.asarray(arr, np.float32)
    return out


FIXED_KEYS = (ENC + "pos_embed", DEC + "pos_embeddings", DEC + "placeholder")


def fixed_tables(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The non-trainable tables of an OpenPhenom state dict (to pass to `openphenom_state_dict(fixed=...)`)."""
    return {k: np.asarray(state[k]) for k in FIXED_KEYS if k in state}


def export_openphenom(
    path: str | os.PathLike,
    mae: MAE,
    *,
    mlp_bias: str | None = None,
    fixed: Mapping[str, np.ndarray] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a whole `MAE` in the OpenPhenom layout (safetensors); see `openphenom_state_dict`."""
    cfg = mae.cfg
    mlp_bias = export_mlp_bias(cfg.encoder, mlp_bias)
    state = openphenom_state_dict(mae, mlp_bias=mlp_bias, fixed=fixed)
    meta = export_metadata(
        "openphenom",
        mlp_bias=mlp_bias,
        timm_kwargs=timm_kwargs(cfg.encoder),
        decoder=dict(
            width=cfg.decoder_width,
            depth=cfg.decoder_depth,
            heads=cfg.decoder_heads,
            channels=cfg.decoder_channels,
            cross_attn_heads=cfg.cross_attn_heads,
            eps=cfg.decoder_eps,
            kind=cfg.decoder,
        ),
    )
    return write_safetensors(path, state, meta, overwrite=overwrite)
