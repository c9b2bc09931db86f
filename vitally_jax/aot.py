"""Ahead-of-time compilation of the MAE train step from abstract inputs, and pod memory plans built on it.

`analyse` lowers and compiles `vitally_jax.train`'s update step (the same builders the trainer uses) against
abstract inputs (ShapeDtypeStructs carrying the real shardings) and returns XLA's per-device memory analysis:
arguments (parameters + optimiser state + batch), outputs, temporaries (activations, gradients) and the peak.
Nothing is allocated, so G/8 plans run on a CPU host with fake devices (`tools/perf/aot_memory.py`).

The pod plan (`tools/perf/pod_plan.py`, `docs/pod_plan.md`) compiles each configuration at two reduced encoder
depths d1 < d2 with the full decoder. The encoder blocks are one scanned stack, so every per-device quantity
is affine in depth: per_block = (m(d2) - m(d1)) / (d2 - d1), m(D) = m(d1) + (D - d1) per_block (`extrapolate`).
`validate` checks this against a compile at a third depth.

Attention memory models (`ATTENTION_MODELS`): 'xla' materialises every (T, T) score matrix (the upper bound);
'chunked' compiles flash attention written in JAX, which keeps no score matrix for the backward pass, as fused
kernels (TPU splash, GPU cuDNN) do.

CPU memory analysis is the XLA:CPU view of the same SPMD program; on TPU/GPU the compiler fuses differently
(temporaries usually smaller), so treat the numbers as an upper-bound plan and confirm on one real host.
"""

from __future__ import annotations

import functools
import math
import pathlib
import time

# model name -> config name in configs/
CONFIGS = {"L/8": "vitl8", "G/8": "vitg8", "S/16": "vits16", "CA-S/16": "vits16", "tiny": "tiny"}
PAPER_BATCH = {"L/8": 16384, "G/8": 8192, "tiny": 64}
FULL_DEPTH = {"L/8": 24, "G/8": 48, "tiny": None}
TARGETS_GIB = (16, 32, 80, 141)
KEYS = ("argument_bytes", "temp_bytes", "peak_bytes")
# attention memory models of the plan: the implementation compiled for each
ATTENTION_MODELS = {
    "xla": "materialised scores (XLA attention; upper bound)",
    "chunked": "fused: no score matrices (flash attention in JAX, 128-key tiles)",
}


def load_config(name: str, arg: str = ""):
    """The training config of model `name` ('L/8', 'G/8', 'S/16', 'tiny') or of a config name / path."""
    from vitally_jax import config_lib

    return config_lib.load(CONFIGS.get(name, name), arg)


def accelerator_attention(config, attention: str = "xla") -> None:
    """Plan with an attention memory model instead of the CPU's default head groups: 'xla' (one
    jax.nn.dot_product_attention op, every (T, T) score matrix materialised, the upper bound) or 'chunked' (flash
    attention in JAX: only q, k, v, output and row log-sum-exp kept for the backward pass, as the fused TPU splash
    and GPU cuDNN kernels do; its transient score tiles are (T, 128) per head, larger than those kernels' on-chip
    tiles, so still a conservative estimate)."""
    if attention not in ATTENTION_MODELS:
        raise ValueError(f"attention memory model {attention!r}; expected one of {list(ATTENTION_MODELS)}")
    if config.model.attention_impl is None:
        config.model.attention_impl = attention


def mae_overrides(mae_cfg) -> dict:
    """The `mae_config` keyword arguments that rebuild `mae_cfg` (all but the encoder depth)."""
    e = mae_cfg.encoder
    return dict(
        img_size=e.img_size,
        in_chans=e.in_chans,
        dtype=e.dtype,
        remat=e.remat,
        attention_impl=e.attention_impl,
        mask_ratio=mae_cfg.mask_ratio,
        drop_path_rate=e.drop_path_rate,
        fourier_weight=mae_cfg.fourier_weight,
        fourier=mae_cfg.fourier,
        decoder_depth=mae_cfg.decoder_depth,
        decoder_width=mae_cfg.decoder_width,
        decoder_heads=mae_cfg.decoder_heads,
    )


def analyse(config, mesh, mae_cfg=None) -> dict:
    """Compile the train step of `config` on `mesh` from abstract inputs; per-device bytes and timings.

    `mae_cfg` defaults to `train.model_config(config)` (pass one to plan a modified model, e.g. a cut encoder)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from vitally_jax import checkpoint as ckpt
    from vitally_jax import sharding, train

    t0 = time.perf_counter()
    if mae_cfg is None:
        mae_cfg = train.model_config(config)
    graphdef, abs_state, state_sh, schedules, _ = train.build_abstract(config, mae_cfg, mesh)
    state = ckpt.abstract_like(abs_state, state_sh)
    c = config.input.crop
    batch = {
        "image": jax.ShapeDtypeStruct(
            (config.input.global_batch, c, c, mae_cfg.encoder.in_chans),
            jnp.uint8,
            sharding=sharding.batch_sharding(mesh),
        )
    }
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
    step = train.jit_train_step(
        train.make_train_step(graphdef, mae_cfg, schedules, use_drop_path=mae_cfg.encoder.drop_path_rate > 0),
        state_sh,
        mesh,
    )
    with jax.set_mesh(mesh):
        lowered = step.lower(state, batch, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    n_params = sum(int(x.size) for x in jax.tree.leaves(abs_state[0]))
    state_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(abs_state))
    out = {
        "variant": config.model.variant,
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "global_batch": config.input.global_batch,
        "dtype": config.model.dtype,
        "remat": config.model.remat,
        "params": n_params,
        "state_bytes_total": state_bytes,
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
        "lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
    }
    # donated state aliases its output buffers: peak = arguments + outputs - aliased + temporaries
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# pod plan: per block, linear in depth
# ----------------------------------------------------------------------------------------------------------------


def compile_at_depth(
    name: str,
    depth: int,
    mesh_shape: tuple[int, int],
    global_batch: int,
    dtype: str,
    remat: str,
    attention: str = "xla",
) -> dict:
    """`analyse` of model `name` with the encoder cut to `depth` blocks on a (data, fsdp, 1) mesh."""
    import jax

    from vitally_jax import sharding, train
    from vitally_jax.models.mae import mae_config

    config = load_config(name)
    config.input.global_batch = global_batch
    config.model.dtype = dtype
    config.model.remat = remat
    accelerator_attention(config, attention)
    n = mesh_shape[0] * mesh_shape[1]
    mesh = sharding.make_mesh((mesh_shape[0], mesh_shape[1], 1), devices=jax.devices()[:n])
    full = train.model_config(config)
    cut = mae_config(config.model.variant, **mae_overrides(full), depth=depth)
    row = analyse(config, mesh, cut)
    row.update(name=name, depth=depth, full_depth=FULL_DEPTH.get(name) or full.encoder.depth, attention=attention)
    return row


def extrapolate(r1: dict, r2: dict, depth: int) -> dict:
    """Affine-in-depth estimate at `depth` from two compiled rows at depths r1['depth'] < r2['depth']."""
    d1, d2 = r1["depth"], r2["depth"]
    out = {}
    for k in KEYS:
        per = (r2[k] - r1[k]) / (d2 - d1)
        out[k] = r1[k] + (depth - d1) * per
        out[k.replace("_bytes", "_per_block")] = per
    return out


@functools.cache
def _param_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(state path, shape) of every trainable parameter of model `name` (abstract, built once per model)."""
    import jax
    from flax import nnx

    from vitally_jax import sharding, train
    from vitally_jax.models.mae import MAE

    config = load_config(name)
    abstract = nnx.state(nnx.eval_shape(lambda: MAE(train.model_config(config), rngs=nnx.Rngs(0))), nnx.Param)
    return tuple(
        (sharding._path_str(path), tuple(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)
    )


def state_bytes_per_device(name: str, mesh_shape: tuple[int, int]) -> float:
    """Per-device bytes of the float32 parameters + Lion state under the default sharding rules (no compile)."""
    from vitally_jax import sharding

    sizes = {"data": mesh_shape[0], "fsdp": mesh_shape[1], "model": 1}
    mesh = type("ShapeOnly", (), {"shape": sizes})()
    total = 0.0
    for path, shape in _param_shapes(name):
        split = 1
        for ax in sharding.spec_for(path, shape, mesh):
            for a in () if ax is None else (ax,) if isinstance(ax, str) else ax:
                split *= sizes[a]
        total += 2 * math.prod(shape) * 4 / split  # parameter + Lion moment, float32
    return total


def choose_mesh(name: str, n: int) -> tuple[int, int]:
    """(data, fsdp) for n devices: the fsdp size (a divisor of n) that leaves the least training state per device,
    the largest such. Pure fsdp over n unless some weight dimension does not divide by n (G/8's width 1664 = 13 x
    128: over 256 devices its fused projections would stay whole on every device, so data=2 x fsdp=128 wins)."""
    best = None
    for f in sorted((f for f in range(1, n + 1) if n % f == 0), reverse=True):
        b = state_bytes_per_device(name, (n // f, f))
        if best is None or b < best[0] * 0.999:
            best = (b, (n // f, f))
        if f <= n // 16:
            break
    return best[1]


def plan(models, device_counts, remats, depths, dtype, log=print, attentions=("xla",)) -> list[dict]:
    """One extrapolated row per (model, device count, remat, attention memory model), at the paper global batch
    (rounded up to divide)."""
    rows = []
    for name in models:
        for n in device_counts:
            gb = PAPER_BATCH[name]
            if gb % n:
                gb = (gb // n + 1) * n
            mesh = choose_mesh(name, n)  # the batch is split over data x fsdp
            for remat, attention in [(r, a) for r in remats for a in attentions]:
                t = time.perf_counter()
                r1, r2 = (compile_at_depth(name, d, mesh, gb, dtype, remat, attention) for d in depths)
                full = r1["full_depth"]
                est = extrapolate(r1, r2, full)
                rows.append(
                    {
                        "model": name,
                        "devices": n,
                        "mesh": {"data": mesh[0], "fsdp": mesh[1]},
                        "global_batch": gb,
                        "per_device_batch": gb // n,
                        "remat": remat,
                        "attention": attention,
                        "dtype": dtype,
                        "depth": full,
                        "depths_compiled": list(depths),
                        "params": None,
                        **est,
                        "compile_s": round(time.perf_counter() - t, 1),
                    }
                )
                log(
                    f"{name} {n} devices remat={remat} attention={attention}: peak {est['peak_bytes'] / 2**30:.2f} GiB "
                    f"({rows[-1]['compile_s']} s)"
                )
    return rows


def validate(name, n, remat, depths, check_depth, dtype) -> dict:
    """The extrapolation from `depths` against a compile at `check_depth` (pure fsdp over n devices)."""
    gb = PAPER_BATCH[name]
    r1, r2 = (compile_at_depth(name, d, (1, n), gb, dtype, remat) for d in depths)
    real = compile_at_depth(name, check_depth, (1, n), gb, dtype, remat)
    est = extrapolate(r1, r2, check_depth)
    return {
        "model": name,
        "devices": n,
        "remat": remat,
        "depths": list(depths),
        "check_depth": check_depth,
        "estimated_peak": est["peak_bytes"],
        "compiled_peak": real["peak_bytes"],
        "rel_err": abs(est["peak_bytes"] - real["peak_bytes"]) / max(real["peak_bytes"], 1),
    }


def recommend(rows: list[dict]) -> list[str]:
    """Per target: the smallest device count (then lightest remat) whose per-device peak fits with 10% headroom."""
    order = {"none": 0, "dots_saveable": 1, "full": 2}
    lines = []
    attentions = list(dict.fromkeys(r.get("attention", "xla") for r in rows))
    for name, attention in [(n, a) for n in sorted({r["model"] for r in rows}) for a in attentions]:
        if len(attentions) > 1:
            lines.append(f"- **{name}, {ATTENTION_MODELS.get(attention, attention)}:**")
        for gib in TARGETS_GIB:
            fit = [
                r
                for r in rows
                if r["model"] == name
                and r.get("attention", "xla") == attention
                and r["peak_per_block"] >= 0
                and r["peak_bytes"] <= 0.9 * gib * 2**30
            ]
            if not fit:
                lines.append(
                    f"- {name} on {gib} GiB devices: nothing planned fits at the paper batch; use more "
                    f"devices or gradient accumulation (peak scales ~linearly with per-device batch)."
                )
                continue
            best = min(fit, key=lambda r: (r["devices"], order.get(r["remat"], 3)))
            mesh = best.get("mesh", {"data": 1, "fsdp": best["devices"]})
            lines.append(
                f"- {name} on {gib} GiB devices: {best['devices']} devices, mesh data={mesh['data']} x "
                f"fsdp={mesh['fsdp']}, remat `{best['remat']}` ({best['per_device_batch']} crops/device, "
                f"peak {best['peak_bytes'] / 2**30:.1f} GiB)"
            )
    return lines


def write_doc(path: pathlib.Path, rows, check, argv_line: str, load: str) -> None:
    """The pod-plan markdown: method, validation, the table and the recommendations."""
    from vitally_jax.fileio import atomic_path

    g = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = [
        "# Pod plan: per-device memory of the MAE train step",
        "",
        f"Regenerate: `{argv_line}` (CPU only, fake devices; one to fifteen minutes per configuration on 2 cores, "
        "depending on load and the compilation cache).",
        "",
        "Per-device memory from XLA's memory analysis of the real train step (`vitally_jax.train` builders via "
        "`vitally_jax.aot`), bf16 compute, float32 parameters and Lion state sharded over 'fsdp', batch "
        "split over all devices, paper global batches (L/8: 16,384; G/8: 8,192). The data x fsdp mesh per "
        "device count is the one that leaves the least training state per device (`choose_mesh`; G/8's width "
        "1,664 = 13 x 128 does not split 256 ways, so G/8 on 256 devices uses data=2 x fsdp=128).",
        "",
        "**Method: measured per block and extrapolated linearly in depth.** Each configuration is compiled at "
        "two reduced encoder depths (full decoder); the encoder is one scanned block stack, so arguments, "
        "temporaries and peak are affine in depth and are extrapolated to 24 (L/8) / 48 (G/8) blocks.",
        "",
    ]
    if check:
        lines += [
            f"Validation: {check['model']} on {check['devices']} devices, remat `{check['remat']}`, depths "
            f"{check['depths']} extrapolated to {check['check_depth']} blocks: {g(check['estimated_peak'])} "
            f"GiB vs {g(check['compiled_peak'])} GiB compiled at that depth (error "
            f"{100 * check['rel_err']:.1f}%).",
            "",
        ]
    lines += [
        "Two attention memory models, each compiled: **materialised** (`attention=xla`: one "
        "jax.nn.dot_product_attention op, every (T, T) score matrix of the decoder's 1,025 tokens in memory; the "
        "upper bound, what XLA:CPU does) and **fused** (`attention=chunked`: flash attention written in JAX, "
        "which keeps only q, k, v, the output and the row log-sum-exp for the backward pass, as TPU splash and "
        "GPU cuDNN attention do; its transient score tiles are (T, 128) per head, larger than those kernels' "
        "on-chip tiles, so the fused figures are still conservative).",
        "",
        "XLA:CPU fuses less than XLA:GPU/TPU, so temporaries here are an upper-bound plan; confirm on one "
        f"real host. Measured under machine load {load}.",
        "",
        "| model | devices | mesh (data x fsdp) | crops/device | remat | attention | arguments GiB | "
        "temporaries GiB | peak GiB | peak per block GiB | fits 16 / 32 / 80 / 141 GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fits = " / ".join("yes" if r["peak_bytes"] <= 0.9 * t * 2**30 else "no" for t in TARGETS_GIB)
        if r["peak_per_block"] < 0:  # XLA's buffer assignment was not monotonic between the two depths
            fits = "INVALID: peak fell with depth; compile at depths further apart"
        mesh = r.get("mesh", {"data": 1, "fsdp": r["devices"]})
        lines.append(
            f"| {r['model']} | {r['devices']} | {mesh['data']} x {mesh['fsdp']} | {r['per_device_batch']} | "
            f"{r['remat']} | {'fused' if r.get('attention') == 'chunked' else 'materialised'} | "
            f"{g(r['argument_bytes'])} | {g(r['temp_bytes'])} | {g(r['peak_bytes'])} | "
            f"{g(r['peak_per_block'])} | {fits} |"
        )
    lines += (
        [
            "",
            "'fits' keeps 10% headroom. Recommended mesh and remat per target (fewest devices, then the "
            "lightest remat that fits):",
            "",
        ]
        + recommend(rows)
        + [""]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pathlib.Path(tmp).write_text("\n".join(lines))
