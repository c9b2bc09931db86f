"""Config values: non-finite or out-of-range numbers are config errors (exit 3) naming the key, raised before the
workdir is created or anything is compiled; a run that diverges despite valid numbers says whether a checkpoint
is left. The cases are listed in `docs/errors.md` ("Config values").

`python -m vitally_jax.main` is run as real subprocesses (started together, so their start-ups overlap); the
checks behind it (`vitally_jax.config_checks`) are also called in-process for every key.
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from vitally_jax import config_checks, config_lib
from vitally_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAN, INF = float("nan"), float("inf")


def with_value(config, key: str, value):
    *parents, last = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[last] = value
    return config


def one_error_line(stderr: str) -> str:
    """Exactly one stderr line starts with `error: `, it is the last one, and there is no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errs) == 1 and lines[-1] == errs[0], stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    return errs[0]


# ------------------------------------------------------------------------------------------------------------
# python -m vitally_jax.main (subprocesses, started together)
# ------------------------------------------------------------------------------------------------------------

# name: (extra arguments, the error line expected; "{store}" is the small store written by the fixture)
MAIN_CASES = {
    "peak lr nan": (["--config.optax.peak_lr=nan"], "error: config.optax.peak_lr: nan; expected a finite number > 0"),
    "weight decay negative": (
        ["--config.optax.weight_decay=-0.1"],
        "error: config.optax.weight_decay: -0.1; expected a finite number >= 0",
    ),
    "warm-up under 2 steps": (
        ["--config.optax.pct_start=0.01"],
        "error: config.optax.pct_start: 0.01; with config.total_steps 40 the warm-up is 0.4 "
        "steps, expected more than 1 (pct_start * total_steps > 1)",
    ),
    "grad clip nan": (
        ["--config.optax.grad_clip_norm=nan"],
        "error: config.optax.grad_clip_norm: nan; expected None or a finite number > 0",
    ),
    "mask ratio leaves no token": (
        ["--config.model.mask_ratio=0.95"],
        "error: config.model.mask_ratio: 0.95; expected a ratio that leaves at least one "
        "of the 16 patch tokens visible and masks at least one (this one leaves 0 "
        "visible)",
    ),
    "fourier weight inf": (
        ["--config.model.fourier_weight=inf"],
        "error: config.model.fourier_weight: inf; expected a finite number in [0, 1]",
    ),
    "drop path 1": (
        ["--config.model.drop_path_rate=1.0"],
        "error: config.model.drop_path_rate: 1.0; expected a finite number in [0, 1)",
    ),
    "total steps 0": (["--config.total_steps=0"], "error: config.total_steps: 0; expected a positive integer"),
    "checkpoint interval 0": (
        ["--config.checkpoint.every_steps=0"],
        "error: config.checkpoint.every_steps: 0; expected a positive integer",
    ),
    "crop not a multiple of the patch": (
        ["--config.input.crop=36"],
        "error: config.input.crop: 36; expected a multiple of the patch size 8 (model.variant 'mu/8')",
    ),
    "crop larger than the store's images": (
        ["--config.input.store={store}", "--config.input.crop=40"],
        "error: config.input.crop: 40; expected at most the image size of the store {store} (32x32)",
    ),
    "crop larger than the synthetic screen": (
        ["--config.input.crop=72"],
        "error: config.input.crop: 72; expected at most the image size of the synthetic screen 'tiny' (64x64)",
    ),
    "batch not divisible by devices": (
        ["--config.input.global_batch=12"],
        "error: input.global_batch 12: must be divisible by the mesh's data x fsdp = 8 devices",
    ),
    "demo trainer peak lr": (
        ["--config=configs/demo.py:ci", "--config.train.optax.peak_lr=-1.0"],
        "error: config.train.optax.peak_lr: -1.0; expected a finite number > 0",
    ),
}
PREEXISTING = "peak lr nan"  # this case also runs in a workdir that exists (empty) beforehand


def _main(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vitally_jax.main", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from vitally_jax.data.store import metadata_frame, write_store

    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 6), dtype=np.uint8)
    return write_store(
        tmp_path_factory.mktemp("store") / "store",
        images,
        metadata_frame([f"i{k}" for k in range(4)]),
        [f"c{k}" for k in range(6)],
    )


@pytest.fixture(scope="module")
def main_runs(tmp_path_factory, small_store):
    tmp = tmp_path_factory.mktemp("config_values")
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA_FLAGS from conftest: 8 devices
    procs, workdirs = {}, {}
    for k, (name, (extra, _)) in enumerate(MAIN_CASES.items()):
        extra = [a.replace("{store}", str(small_store)) for a in extra]
        config = [a for a in extra if a.startswith("--config=")] or ["--config=configs/tiny.py"]
        workdirs[name] = tmp / f"wd{k}"
        procs[name] = _main(
            [*config, *[a for a in extra if not a.startswith("--config=")], f"--workdir={workdirs[name]}"], env
        )
    empty = tmp / "empty"
    empty.mkdir()
    procs["preexisting"] = _main(["--config=configs/tiny.py", *MAIN_CASES[PREEXISTING][0], f"--workdir={empty}"], env)
    out = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=240)
        out[name] = (p.returncode, err)
    return tmp, workdirs, empty, out


@pytest.mark.parametrize("name", list(MAIN_CASES))
def test_main_rejects_bad_config_value(main_runs, small_store, name):
    tmp, workdirs, _, out = main_runs
    rc, err = out[name]
    assert rc == 3, (rc, err[-2000:])
    assert one_error_line(err) == MAIN_CASES[name][1].replace("{store}", str(small_store))
    assert not workdirs[name].exists()  # checked before the workdir is created
    assert not list(tmp.rglob("events.out.tfevents*")) and not list(tmp.rglob("metrics.jsonl"))


def test_main_leaves_an_existing_empty_workdir_empty(main_runs):
    _, _, empty, out = main_runs
    rc, err = out["preexisting"]
    assert rc == 3 and one_error_line(err) == MAIN_CASES[PREEXISTING][1]
    assert empty.is_dir() and not list(empty.iterdir())


def test_divergence_before_any_checkpoint_says_nothing_to_resume(tmp_path):
    """Valid but absurd numbers (peak lr 1e30): the loss becomes NaN within the first logging interval (5 steps),
    long before the first checkpoint (step 20): exit 9, and the message says no checkpoint exists."""
    import jax

    env = dict(
        os.environ, JAX_PLATFORMS="cpu", VITALLY_JAX_COMPILATION_CACHE=str(jax.config.jax_compilation_cache_dir or "")
    )
    wd = tmp_path / "wd"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitally_jax.main",
            "--config=configs/tiny.py",
            f"--workdir={wd}",
            "--config.optax.peak_lr=1e30",
            "--config.log.tensorboard=false",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 9, (r.returncode, r.stderr[-3000:])
    line = one_error_line(r.stderr)
    assert line.startswith("error: non-finite loss or gradient by step ")
    assert f"no checkpoint has been written yet in {wd / 'checkpoints'}; nothing to resume from" in line
    assert "config.optax.peak_lr (1e+30)" in line
    assert "intact" not in line and "None" not in line
    assert not [p for p in (wd / "checkpoints").iterdir() if p.name.isdigit()]  # indeed none was written


# ------------------------------------------------------------------------------------------------------------
# The checks in-process: every key
# ------------------------------------------------------------------------------------------------------------

REJECTED = [  # (key, value, expected message)
    ("optax.peak_lr", NAN, "config.optax.peak_lr: nan; expected a finite number > 0"),
    ("optax.peak_lr", 0.0, "config.optax.peak_lr: 0.0; expected a finite number > 0"),
    ("optax.peak_lr", -INF, "config.optax.peak_lr: -inf; expected a finite number > 0"),
    ("optax.div_factor", 0.0, "config.optax.div_factor: 0.0; expected a finite number > 0"),
    ("optax.final_div_factor", INF, "config.optax.final_div_factor: inf; expected a finite number > 0"),
    ("optax.pct_start", 1.0, "config.optax.pct_start: 1.0; expected a finite number in (0, 1)"),
    ("optax.pct_start", NAN, "config.optax.pct_start: nan; expected a finite number in (0, 1)"),
    ("optax.weight_decay", NAN, "config.optax.weight_decay: nan; expected a finite number >= 0"),
    ("optax.weight_decay", -1e-3, "config.optax.weight_decay: -0.001; expected a finite number >= 0"),
    ("optax.b1", 1.0, "config.optax.b1: 1.0; expected a finite number in [0, 1)"),
    ("optax.b2", -0.1, "config.optax.b2: -0.1; expected a finite number in [0, 1)"),
    ("optax.base_momentum", 1.5, "config.optax.base_momentum: 1.5; expected a finite number in [0, 1)"),
    ("optax.max_momentum", NAN, "config.optax.max_momentum: nan; expected a finite number in [0, 1)"),
    ("optax.grad_clip_norm", 0.0, "config.optax.grad_clip_norm: 0.0; expected None or a finite number > 0"),
    ("optax.grad_clip_norm", INF, "config.optax.grad_clip_norm: inf; expected None or a finite number > 0"),
    ("model.mask_ratio", 0.0, "config.model.mask_ratio: 0.0; expected a finite number in (0, 1)"),
    ("model.mask_ratio", 1.0, "config.model.mask_ratio: 1.0; expected a finite number in (0, 1)"),
    ("model.mask_ratio", NAN, "config.model.mask_ratio: nan; expected a finite number in (0, 1)"),
    (
        "model.mask_ratio",
        1e-17,
        "config.model.mask_ratio: 1e-17; expected a ratio that leaves at least one of the "
        "16 patch tokens visible and masks at least one (this one leaves 16 visible)",
    ),
    ("model.fourier_weight", -0.01, "config.model.fourier_weight: -0.01; expected a finite number in [0, 1]"),
    ("model.fourier_weight", 1.01, "config.model.fourier_weight: 1.01; expected a finite number in [0, 1]"),
    ("model.drop_path_rate", -0.1, "config.model.drop_path_rate: -0.1; expected a finite number in [0, 1)"),
    ("model.drop_path_rate", NAN, "config.model.drop_path_rate: nan; expected a finite number in [0, 1)"),
    ("model.init_values", NAN, "config.model.init_values: nan; expected None or a finite number"),
    ("model.decoder_width", 0, "config.model.decoder_width: 0; expected None or a positive integer"),
    ("model.in_chans", 0, "config.model.in_chans: 0; expected a positive integer"),
    ("total_steps", -3, "config.total_steps: -3; expected a positive integer"),
    ("total_steps", 1, "config.total_steps: 1; expected at least 2 (the one-cycle schedule warms up, then decays)"),
    ("stop_after_steps", 0, "config.stop_after_steps: 0; expected None or a positive integer"),
    ("input.crop", 0, "config.input.crop: 0; expected a positive integer"),
    ("input.global_batch", 0, "config.input.global_batch: 0; expected a positive integer"),
    ("checkpoint.keep", 0, "config.checkpoint.keep: 0; expected a positive integer"),
    ("log.every_steps", -5, "config.log.every_steps: -5; expected a positive integer"),
    ("log.recon_every_steps", 0, "config.log.recon_every_steps: 0; expected None or a positive integer"),
    ("log.recon_images", 0, "config.log.recon_images: 0; expected a positive integer"),
    ("log.peak_flops_per_device", NAN, "config.log.peak_flops_per_device: nan; expected None or a finite number > 0"),
]


@pytest.mark.parametrize("key,value,message", REJECTED, ids=[f"{k}={v}" for k, v, _ in REJECTED])
def test_check_values_rejects(key, value, message):
    config = with_value(config_lib.load("tiny"), key, value)
    with pytest.raises(ConfigError) as e:
        config_checks.check_values(config)
    assert str(e.value) == message


ACCEPTED = [
    ("model.fourier_weight", 0.0),
    ("model.fourier_weight", 1.0),
    ("model.drop_path_rate", 0.0),
    ("optax.weight_decay", 0.0),
    ("optax.b1", 0.0),
    ("optax.grad_clip_norm", None),
    ("model.mask_ratio", 0.9),  # int(16 * 0.1) = 1 token stays visible
    ("optax.pct_start", 0.05),  # a warm-up of 2 steps of 40
    ("stop_after_steps", None),
    ("log.recon_every_steps", None),
    ("optax.peak_lr", 1e30),
]


@pytest.mark.parametrize("key,value", ACCEPTED, ids=[f"{k}={v}" for k, v in ACCEPTED])
def test_check_values_accepts_valid_edges(key, value):
    config_checks.check_values(with_value(config_lib.load("tiny"), key, value))


def test_every_shipped_config_passes():
    for name, arg in (("tiny", ""), ("vitg8", ""), ("vitl8", ""), ("vits16", ""), ("vitg8", "runlocal")):
        config_checks.check_values(config_lib.load(name, arg))
    config_checks.check_values(config_lib.load("demo").train, prefix="config.train.")
    config_checks.check_values(config_lib.load("demo", "ci").train, prefix="config.train.")


def test_mask_ratio_counts_channel_agnostic_tokens():
    """A channel-agnostic encoder has a token per channel and patch: 6 x 16 = 96, so 0.95 still leaves 4."""
    config_checks.check_values(
        with_value(with_value(config_lib.load("tiny"), "model.variant", "CA-mu/8"), "model.mask_ratio", 0.95)
    )
    with pytest.raises(ConfigError, match=r"^config.model.mask_ratio: 0.99; .* of the 96 patch tokens .*leaves 0 "):
        config_checks.check_values(
            with_value(with_value(config_lib.load("tiny"), "model.variant", "CA-mu/8"), "model.mask_ratio", 0.99)
        )


def test_check_mesh_global_batch_vs_devices():
    from vitally_jax import sharding

    config = with_value(config_lib.load("tiny"), "input.global_batch", 12)
    with pytest.raises(ConfigError, match=r"^input.global_batch 12: must be divisible by the mesh's data x fsdp = 8"):
        config_checks.check_mesh(config, sharding.make_mesh((-1, 1, 1)))
    config_checks.check_mesh(config, sharding.make_mesh((2, 2, 2)))  # data x fsdp = 4 divides 12


def test_check_crop_vs_image_size():
    config = with_value(config_lib.load("tiny"), "input.crop", 48)
    with pytest.raises(ConfigError, match=r"^config.input.crop: 48; expected at most the image size of here \(48x40\)"):
        config_checks.check_crop(config, (48, 40), "here")
    config_checks.check_crop(config, (48, 48), "here")


def test_library_call_rejects_before_writing(tmp_path):
    """`train_and_evaluate` runs the same checks first: nothing is created for a bad value."""
    from vitally_jax.train import train_and_evaluate

    config = with_value(config_lib.load("tiny"), "optax.peak_lr", NAN)
    wd = tmp_path / "wd"
    with pytest.raises(ConfigError, match=r"^config.optax.peak_lr: nan; expected a finite number > 0$"):
        train_and_evaluate(config, wd)
    assert not wd.exists()
    assert math.isnan(config.optax.peak_lr)  # the config itself is left as given
