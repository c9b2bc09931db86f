"""MAE pretraining: one linear `train_and_evaluate(config, workdir)`, read top to bottom.

Sections: logging, mesh, input, model, sharding, update step, checkpoint, loop. The update step is a functional
`jax.jit` over the split NNX state of (model, optimizer) with pinned in/out shardings and donation: it compiles
once. Randomness per step is `fold_in(seed_key, step)`, so a run resumed from a checkpoint continues exactly as
an uninterrupted one. The small builders above `train_and_evaluate` are shared with `vitally_jax.aot` (AOT
compilation), which compiles the same step ahead of time for pod-scale memory planning.
"""

from __future__ import annotations

import collections
import logging
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vitally_jax import checkpoint as ckpt
from vitally_jax import config_checks, fileio, optim, sharding
from vitally_jax import flops as flops_lib
from vitally_jax import metrics as metrics_lib
from vitally_jax.errors import ConfigError, TrainingDivergedError

log = logging.getLogger("vitally_jax.train")

# Compile counter: jax reports every lowering of a jitted function (cache misses only) with its name.
_LOWERINGS: collections.Counter = collections.Counter()


def _count_lowerings(event: str, duration: float, **kw) -> None:
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
        _LOWERINGS[kw.get("fun_name")] += 1


jax.monitoring.register_event_duration_secs_listener(_count_lowerings)


# ------------------------------------------------------------------------------------------------------------
# Builders (shared with vitally_jax.aot)
# ------------------------------------------------------------------------------------------------------------


def model_config(config):
    """`MAEConfig` from the config's `model` section (every key but `variant` is a `mae_config` override; None =
    the variant's value; `remat` "auto" is `auto_remat()`) and `input.crop` (the image size); a key `mae_config`
    does not know is refused there."""
    from vitally_jax.models.mae import mae_config

    overrides = {k: v for k, v in config.model.to_dict().items() if v is not None}
    variant = overrides.pop("variant")
    if overrides.get("remat") == "auto":
        overrides["remat"] = auto_remat()
    overrides["img_size"] = config.input.crop
    if variant.startswith("CA-"):
        overrides["decoder_channels"] = config.model.in_chans  # one decoder stack per training channel
    return mae_config(variant, **overrides)


def auto_remat(backend: str | None = None) -> str:
    """`model.remat` "auto": "dots_saveable" on a CPU backend, "none" elsewhere.

    On XLA:CPU, keeping only the matmul outputs for the backward pass and recomputing the elementwise ops (GELU,
    LayerNorm, softmax) is faster than storing every intermediate and reading it back: writing and re-reading the
    stored activations is memory traffic a CPU pays for. `python tools/perf/profile_train_step.py` times the step
    with "none" beside this default. Accelerators keep everything when it fits."""
    return "dots_saveable" if (backend or jax.default_backend()) == "cpu" else "none"


def build_abstract(config, mae_cfg, mesh):
    """Abstract (model, optimizer) -> (graphdef, abstract state, state shardings, schedules)."""
    from vitally_jax.models.mae import MAE

    tx, schedules = optim.make_optimizer(config.optax, config.total_steps)

    def create():
        model = MAE(mae_cfg, rngs=nnx.Rngs(config.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, abs_state = nnx.split(nnx.eval_shape(create))
    rules = None if config.mesh.rules is None else tuple((r, tuple(s)) for r, s in config.mesh.rules)
    state_sh = sharding.param_shardings(abs_state, mesh, rules)
    return graphdef, abs_state, state_sh, schedules, create


def num_tokens(mae_cfg) -> int:
    """Patch tokens per image (the masking noise length L)."""
    return mae_cfg.encoder.num_patches


def make_train_step(graphdef, mae_cfg, schedules, *, use_drop_path: bool, micro_batch: int = 0):
    """The pure update: (state, batch {'image': uint8 (B,H,W,C)}, seed_key) -> (state, metrics).

    micro_batch > 0 (a divisor of B): gradient accumulation inside the step. The batch (with its masking noise)
    is cut into B // micro_batch slices run one after another (`lax.scan`), and their gradients and losses are
    averaged. Every sample masks the same number of tokens, so that average is the whole-batch loss and gradient
    up to float rounding; one optimiser update follows, as without slicing.
    """
    from vitally_jax.models.preprocess import self_standardize

    n_tok = num_tokens(mae_cfg)

    def train_step(state, batch, seed_key):
        model, opt = nnx.merge(graphdef, state)
        step = opt.step[...]
        k_noise, k_drop = jax.random.split(jax.random.fold_in(seed_key, step))
        x = sharding.constrain_batch(self_standardize(batch["image"]))
        noise = jax.random.uniform(k_noise, (x.shape[0], n_tok), jnp.float32)

        if micro_batch and micro_batch < x.shape[0]:
            loss, aux, grads = _accumulated_grads(model, x, noise, k_drop if use_drop_path else None, micro_batch)
        else:

            def loss_fn(m):
                out = m(x, noise=noise, drop_key=k_drop if use_drop_path else None)
                return out["loss"], out

            (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        gnorm = optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "loss_rec": aux["loss_rec"],
            "loss_fourier": aux["loss_fourier"],
            "grad_norm": gnorm,
            "lr": schedules["lr"](step),
            "b1": schedules["b1"](step),
            "finite": jnp.isfinite(loss) & jnp.isfinite(gnorm),
        }
        return nnx.state((model, opt)), metrics

    return train_step


def _accumulated_grads(model, x, noise, drop_key, micro: int):
    """Mean loss, mean {'loss_rec', 'loss_fourier'} and mean parameter gradients over slices of `micro` samples."""
    gm, params, rest = nnx.split(model, nnx.Param, ...)
    k = x.shape[0] // micro
    xs = x.reshape((k, micro) + x.shape[1:])
    ns = noise.reshape((k, micro) + noise.shape[1:])
    keys = jax.random.split(drop_key, k) if drop_key is not None else None

    def loss_of(p, xb, nb, kb):
        out = nnx.merge(gm, p, rest)(xb, noise=nb, drop_key=kb)
        return out["loss"], {"loss_rec": out["loss_rec"], "loss_fourier": out["loss_fourier"]}

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def body(acc, inp):
        xb, nb, kb = inp
        (loss, aux), g = grad_fn(params, xb, nb, kb)
        return jax.tree.map(jnp.add, acc, (loss, aux, g)), None

    scalar = jnp.zeros((), jnp.float32)
    zero = (scalar, {"loss_rec": scalar, "loss_fourier": scalar}, jax.tree.map(jnp.zeros_like, params))
    (loss, aux, grads), _ = jax.lax.scan(body, zero, (xs, ns, keys))
    return jax.tree.map(lambda a: a / k, (loss, aux, grads))


def train_micro_batch(config, mae_cfg, mesh) -> int:
    """Samples per gradient-accumulation slice for `input.micro_batch` (None, 0 or a divisor of the per-step
    batch): None (auto) slices on a single-device CPU mesh by the embedding pass's cache rule (the decoder's tokens per
    sample), and runs the whole batch elsewhere. Slicing needs a mesh without data parallelism (ConfigError
    otherwise): on a pod every device already holds a small slice."""
    from vitally_jax.embedding.blocks import cpu_micro_batch

    m = config.input.get("micro_batch", None)
    b = int(config.input.global_batch)
    dp = sharding.data_parallel_size(mesh)
    if m is None:
        if dp > 1 or jax.default_backend() != "cpu":
            return 0
        return cpu_micro_batch(b, num_tokens(mae_cfg) + 1)
    m = int(m)
    if m and (b % m or dp > 1):
        raise ConfigError(
            f"config.input.micro_batch {m}: expected None (auto), 0 or a divisor of input.global_batch ({b}) on a "
            f"mesh without data parallelism (this one has {dp} data-parallel devices)"
        )
    return m


def jit_train_step(train_step, state_sh, mesh):
    """jit with pinned shardings: state as `state_sh`, batch over ('data','fsdp'), key and metrics replicated."""
    rep = NamedSharding(mesh, P())
    batch_sh = {"image": sharding.batch_sharding(mesh)}
    return jax.jit(train_step, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep), donate_argnums=0)


def _meta(config, step: int, mesh) -> dict:
    return {
        "step": int(step),
        "config": config.to_dict(),
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
        "versions": ckpt.versions(),
    }


def _split_state(state):
    return state[0], state[1]


def _join_state(abs_state, model_state, opt_state):
    state = jax.tree.map(lambda x: x, abs_state)  # a fresh container of the same structure
    state[0], state[1] = model_state, opt_state
    return state


# ------------------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
    """Train (or resume) the MAE described by `config` in `workdir`.

    Returns a summary: {'step', 'metrics' (last logged), 'compiles', 'goodput' (`metrics.Goodput.scalars` at the
    end, final checkpoint included), 'stopped' ('done'|'signal'|'budget')}.
    """
    workdir = pathlib.Path(workdir).absolute()
    config_checks.check_values(config)  # numbers and ranges, before anything is written or compiled
    goodput = metrics_lib.Goodput()  # productive step time over this job's wall time, and where the rest went
    # ---------------------------------------------------------------------------------------- logging -----
    is_main = jax.process_index() == 0
    # a workdir is ours (workdir.json) or new/empty; anything else, or a workdir inside an input, is refused
    fileio.check_output(workdir, WORKDIR_KIND, resume=True, inputs=[config.input.store, config.input.index])
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        if fileio.folder_kind(workdir) is None:
            fileio.write_marker(workdir, WORKDIR_KIND, created_by="vitally_jax.train")
    log.info("devices: %d (%d local), processes: %d", jax.device_count(), jax.local_device_count(), jax.process_count())

    # ---------------------------------------------------------------------------------------- mesh --------
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    log.info("mesh: %s", dict(mesh.shape))

    # ---------------------------------------------------------------------------------------- input -------
    from vitally_jax.data import pipeline

    config_checks.check_mesh(config, mesh)
    store = pipeline.ImageStore.open(_resolve_store(config, workdir))
    config_checks.check_crop(config, store.shape[1:3], f"the store {store.path}")
    dataset = pipeline.train_dataset(
        store,
        crop=config.input.crop,
        global_batch=config.input.global_batch,
        seed=config.seed,
        index=config.input.index,
        flips=config.input.flips,
        rot90=config.input.rot90,
        in_memory=bool(config.input.get("in_memory", False)),
    )
    data_iter = iter(pipeline.global_batches(dataset, mesh))
    channel_names = list(store.channel_names)

    # ---------------------------------------------------------------------------------------- model -------
    mae_cfg = model_config(config)
    graphdef, abs_state, state_sh, schedules, create = build_abstract(config, mae_cfg, mesh)
    flops_per_image = _train_flops(mae_cfg)

    # ---------------------------------------------------------------------------------------- sharding ----
    init_state = jax.jit(lambda: nnx.split(create())[1], out_shardings=state_sh)  # run only for a fresh start
    seed_key = jax.jit(lambda: jax.random.key(config.seed), out_shardings=NamedSharding(mesh, P()))()

    # ---------------------------------------------------------------------------------------- update step -
    micro = train_micro_batch(config, mae_cfg, mesh)
    if micro:
        log.info(
            "train step: gradients accumulated over %d slices of %d samples", config.input.global_batch // micro, micro
        )
    train_step = jit_train_step(
        make_train_step(
            graphdef, mae_cfg, schedules, use_drop_path=mae_cfg.encoder.drop_path_rate > 0, micro_batch=micro
        ),
        state_sh,
        mesh,
    )

    # metrics files appear only once the input and the model are known to be usable (no empty event files)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, tensorboard=config.log.tensorboard)
    progress = metrics_lib.Progress(config.total_steps)

    # ---------------------------------------------------------------------------------------- checkpoint --
    manager = ckpt.make_manager(
        workdir / "checkpoints", keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    restored = None
    if manager.latest_step() is not None:  # newest usable checkpoint; damaged newer ones are skipped with a warning
        abs_model = ckpt.abstract_like(abs_state[0], state_sh[0])
        abs_opt = ckpt.abstract_like(abs_state[1], state_sh[1])
        with jax.set_mesh(mesh), goodput.phase("checkpoint_restore"):
            restored = ckpt.restore_latest(manager, abs_model, abs_opt, data_iter)
    start = 0
    if restored is None:
        with jax.set_mesh(mesh):
            state = init_state()
    else:
        start, m_state, o_state, meta = restored
        state = _join_state(abs_state, m_state, o_state)
        if not meta["data_restored"]:
            log.warning("checkpoint of step %d has no data iterator state: data stream restarts from its seed", start)
        writer.truncate_after(start)
        log.info("resumed from step %d", start)
    stop_requested = {"flag": False}

    def _on_sigterm(signum, frame):
        stop_requested["flag"] = True

    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None

    # ---------------------------------------------------------------------------------------- loop --------
    peak = config.log.peak_flops_per_device or flops_lib.measure_matmul_flops()
    step, last, stopped = start, {}, "done"
    budget_end = (
        config.total_steps
        if config.stop_after_steps is None
        else min(config.total_steps, start + config.stop_after_steps)
    )
    finite_acc = jnp.asarray(True)
    recon_batch, recon_fn = None, None
    t_last, s_last = time.perf_counter(), start
    progress.start(start)
    lowerings_before = _LOWERINGS["jit(train_step)"]
    step_fn = None
    try:
        with jax.set_mesh(mesh):
            while step < budget_end:
                with goodput.phase("input"):
                    batch = next(data_iter)
                if recon_batch is None and config.log.recon_every_steps:
                    recon_batch = {"image": batch["image"][: config.log.recon_images]}
                if step_fn is None:  # compile once, then meet: processes start stepping together
                    with goodput.phase("compile"):
                        step_fn = train_step.lower(state, batch, seed_key).compile()
                        _barrier("train_step compiled")
                with goodput.phase("productive"):
                    state, metrics = step_fn(state, batch, seed_key)
                    finite_acc = finite_acc & metrics["finite"]
                step += 1
                due_log = step % config.log.every_steps == 0 or step in (start + 1, budget_end)
                due_ckpt = step % config.checkpoint.every_steps == 0 or step == budget_end
                if _preempted(stop_requested["flag"]):
                    due_ckpt, stopped = True, "signal"
                if due_log or due_ckpt:
                    with goodput.phase("productive"):  # waits for the step's results
                        host = {k: _local(v) for k, v in metrics.items()}
                    if not bool(_local(finite_acc)):
                        raise TrainingDivergedError(
                            _diverged_message(config, step, float(host["loss"]), workdir, manager.latest_step())
                        )
                if due_log:
                    last = {k: float(v) for k, v in host.items() if k != "finite"}
                    now = time.perf_counter()
                    if step > start + 1:  # the first step of a run includes compilation: no throughput for it
                        ips = (step - s_last) * config.input.global_batch / max(now - t_last, 1e-9)
                        last.update(
                            {
                                "images_per_s": ips,
                                "tokens_per_s": ips * num_tokens(mae_cfg),
                                "mfu": ips * flops_per_image / (peak * jax.device_count()),
                            }
                        )
                    else:
                        progress.start(step)
                    t_last, s_last = now, step
                    last.update(goodput.scalars())
                    writer.write(step, last)
                    if is_main:
                        progress.print(
                            step, {k: last[k] for k in ("loss", "lr", "grad_norm", "images_per_s") if k in last}
                        )
                if config.log.recon_every_steps and step % config.log.recon_every_steps == 0:
                    if recon_fn is None:
                        recon_fn = make_recon_fn(graphdef, mae_cfg, config.seed)
                    _reconstruction_png(recon_fn, state, recon_batch, mae_cfg, step, workdir, is_main, channel_names)
                if due_ckpt:
                    m_state, o_state = _split_state(state)
                    with goodput.phase("checkpoint_save"):
                        ckpt.save(manager, step, m_state, o_state, data_iter, _meta(config, step, mesh), force=True)
                if stopped == "signal":
                    break
        if stopped != "signal" and step < config.total_steps:
            stopped = "budget"
        with goodput.phase("checkpoint_save"):  # the asynchronous saves' remaining work
            manager.wait_until_finished()
        if config.checkpoint.export_encoder and step >= config.total_steps:
            model, _ = nnx.merge(graphdef, state)
            ckpt.export_encoder(
                workdir / "encoder", nnx.state(model.encoder), mae_cfg.encoder, overwrite=True
            )  # its own export inside its own workdir
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return {
        "step": step,
        "metrics": last,
        "compiles": _LOWERINGS["jit(train_step)"] - lowerings_before,
        "goodput": goodput.scalars(),
        "stopped": stopped,
        "state": state,
        "graphdef": graphdef,
        "mae_config": mae_cfg,
        "mesh": mesh,
    }


# ------------------------------------------------------------------------------------------------------------
# Helpers of the loop
# ------------------------------------------------------------------------------------------------------------


def _diverged_message(config, step: int, loss: float, workdir: pathlib.Path, last_good: int | None) -> str:
    """What a non-finite loss means for this workdir: which checkpoint is left to resume from, if any."""
    where = workdir / "checkpoints"
    if last_good is None:
        kept = f"no checkpoint has been written yet in {where}; nothing to resume from"
    else:
        kept = f"the last good checkpoint in {where} (step {last_good}) is intact"
    clip = config.optax.grad_clip_norm
    return (
        f"non-finite loss or gradient by step {step} (loss {loss}); {kept}: lower config.optax.peak_lr "
        f"({config.optax.peak_lr:g}) or {'set' if clip is None else 'lower'} config.optax.grad_clip_norm "
        f"({'None' if clip is None else format(clip, 'g')})"
    )


def _barrier(name: str, timeout_s: int = 3600) -> None:
    """All processes wait here (coordination-service barrier: no collectives, a long timeout).

    Gloo gives the first collective of a program only 30 s for every process to arrive; compile times differ
    between hosts by more than that, so processes meet here after compiling.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    _LOWERINGS["barrier:" + name] += 1  # barrier ids must be unique within a job
    distributed.global_state.client.wait_at_barrier(f"{name}#{_LOWERINGS['barrier:' + name]}", timeout_s * 1000)


def _local(x: jax.Array) -> np.ndarray:
    """Host value of a replicated (possibly multi-process) array."""
    return np.asarray(x.addressable_data(0))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _preempted(local_flag: bool) -> bool:
    """True on every process when any process got SIGTERM (one tiny all-gather per step when multi-process)."""
    if jax.process_count() == 1:
        return local_flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(local_flag))))


WORKDIR_KIND = "training workdir"


def _resolve_store(config, workdir: pathlib.Path) -> pathlib.Path:
    """The configured store, or a synthetic screen generated once into WORKDIR/synthetic."""
    if config.input.store is not None:
        return pathlib.Path(config.input.store)
    if config.input.synthetic is None:
        raise ConfigError("input.store: no image store configured (set input.store, or input.synthetic='tiny')")
    from jax.experimental import multihost_utils

    from vitally_jax.data import synthetic

    path = workdir / "synthetic"
    if jax.process_index() == 0 and not (path / "store.json").exists():
        log.info("generating the synthetic screen %r into %s", config.input.synthetic, path)
        synthetic.generate_screen(path, synthetic.preset(config.input.synthetic))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic store ready")
    return path


def _train_flops(mae_cfg) -> float:
    e = mae_cfg.encoder
    return flops_lib.mae_train_flops_per_image(
        num_patches=e.num_patches,
        mask_ratio=mae_cfg.mask_ratio,
        width=e.width,
        depth=e.depth,
        mlp=e.mlp_dim,
        patch=e.patch_size,
        in_chans=e.in_chans,
        dec_width=mae_cfg.decoder_width,
        dec_depth=mae_cfg.decoder_depth,
        dec_mlp=mae_cfg.decoder_width * 4,
        channel_agnostic=e.channel_agnostic,
    )


def make_recon_fn(graphdef, mae_cfg, seed: int):
    """Jitted (state, uint8 images) -> (standardised images, prediction, mask) with a fixed masking noise."""
    from vitally_jax.models.preprocess import self_standardize

    def recon(state, images):
        model, _ = nnx.merge(graphdef, state)
        x = self_standardize(images)
        noise = jax.random.uniform(jax.random.key(seed + 1), (x.shape[0], num_tokens(mae_cfg)))
        out = model(x, noise=noise)
        return x, out["pred"], out["mask"]

    return jax.jit(recon)


def _reconstruction_png(recon_fn, state, batch, mae_cfg, step, workdir, is_main, channel_names=None):
    """Original / masked / reconstruction per channel for a few fixed training crops."""
    from jax.experimental import multihost_utils

    from vitally_jax.models.layers import unpatchify

    x, pred, mask = recon_fn(state, batch["image"])
    x, pred, mask = (
        multihost_utils.process_allgather(a, tiled=True) if not a.is_fully_addressable else a for a in (x, pred, mask)
    )
    if not is_main:
        return
    x, pred, mask = np.asarray(x), np.asarray(pred), np.asarray(mask)
    e = mae_cfg.encoder
    b, h, w, c = x.shape
    g = (h // e.patch_size, w // e.patch_size)
    if e.channel_agnostic:
        rec = np.concatenate(
            [
                np.asarray(unpatchify(pred[:, i * g[0] * g[1] : (i + 1) * g[0] * g[1]], e.patch_size, g, 1))
                for i in range(c)
            ],
            axis=-1,
        )
        m = mask.reshape(b, c, g[0], g[1]).transpose(0, 2, 3, 1)
        m = np.repeat(np.repeat(m, e.patch_size, 1), e.patch_size, 2)
    else:
        rec = np.asarray(unpatchify(pred, e.patch_size, g, c))
        m = np.repeat(np.repeat(mask.reshape(b, g[0], g[1], 1), e.patch_size, 1), e.patch_size, 2)
    masked = np.where(m > 0, np.nan, x)
    filled = np.where(m > 0, rec, x)
    metrics_lib.save_reconstruction_png(
        workdir / "reconstructions" / f"step_{step:08d}.png", x, masked, filled, channel_names
    )
