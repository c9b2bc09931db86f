"""Training survives the cluster: SIGKILL at a random step, SIGTERM (preemption), a damaged latest checkpoint.

The jobs that get killed are real `python -m vitally_jax.main` processes; the reruns and the uninterrupted
reference run in this process (the same code `main` calls, with the same 8 CPU devices and compile cache).
Final parameters are compared bitwise (CPU, deterministic pipeline: batches and randomness depend only on
(seed, step)).
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vitally_jax import checkpoint as ckpt
from vitally_jax import config_lib
from vitally_jax.cli import run_cli
from vitally_jax.errors import CheckpointError
from vitally_jax.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 40  # the tiny config's length: the compiled step is shared with tests/test_train.py
EVERY = 5


def config(store):
    c = config_lib.load("tiny")
    c.input.store = str(store)
    c.input.synthetic = None
    c.total_steps = STEPS
    c.checkpoint.every_steps = EVERY
    c.checkpoint.keep = 2
    c.log.tensorboard = False
    c.log.peak_flops_per_device = 1e12  # skip the matmul measurement (only the logged MFU uses it)
    return c


def start_training(store, workdir: pathlib.Path) -> subprocess.Popen:
    """The training entry point as a separate process (logs to WORKDIR.log)."""
    argv = [
        sys.executable,
        "-m",
        "vitally_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.input.store={store}",
        f"--config.total_steps={STEPS}",
        f"--config.checkpoint.every_steps={EVERY}",
        "--config.checkpoint.keep=2",
        "--config.log.tensorboard=false",
    ]
    log = open(f"{workdir}.log", "w")
    import jax

    # XLA_FLAGS (8 devices) come from conftest's environment; share this process's persistent compilation cache
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def steps_on_disk(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def wait_for(pred, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def flat(state) -> dict:
    return ckpt.state_to_numpy(state)


def assert_bitwise(a, b) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.array_equal(fa[k], fb[k]), k


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    from vitally_jax.data.synthetic import generate_screen

    return generate_screen(tmp_path_factory.mktemp("screen") / "store", "tiny")


@pytest.fixture(scope="module")
def reference(screen, tmp_path_factory):
    """The uninterrupted run (in this process), kept with its checkpoints."""
    wd = tmp_path_factory.mktemp("reference") / "wd"
    out = train_and_evaluate(config(screen), wd)
    assert out["step"] == STEPS and out["stopped"] == "done"
    return wd, out


@pytest.fixture(scope="module")
def jobs(screen, tmp_path_factory, request):
    """Start the SIGKILL and SIGTERM victims together, after the reference run has filled the compilation cache."""
    request.getfixturevalue("reference")
    root = tmp_path_factory.mktemp("jobs")
    killed, termed = root / "killed", root / "termed"
    p_kill, p_term = start_training(screen, killed), start_training(screen, termed)
    try:
        # SIGKILL at a random moment after the first checkpoint is on disk
        wait_for(lambda: steps_on_disk(killed), p_kill)
        time.sleep(float(np.random.default_rng().uniform(0.0, 0.25)))
        alive_at_kill = p_kill.poll() is None
        p_kill.send_signal(signal.SIGKILL)
        p_kill.wait(60)
        # SIGTERM once the first metrics line is written (training is under way)
        wait_for(lambda: (termed / "metrics.jsonl").exists(), p_term)
        p_term.send_signal(signal.SIGTERM)
        term_rc = p_term.wait(300)
    finally:
        for p in (p_kill, p_term):
            if p.poll() is None:
                p.kill()
                p.wait()
    return dict(killed=killed, termed=termed, alive_at_kill=alive_at_kill, term_rc=term_rc)


def test_sigkill_at_a_random_step_resumes_bitwise(jobs, reference, screen):
    """A: killed with SIGKILL mid-run; the rerun resumes from the last checkpoint and ends bitwise equal."""
    killed = jobs["killed"]
    assert jobs["alive_at_kill"], "the job finished before it could be killed"
    saved = steps_on_disk(killed)
    assert saved and max(saved) < STEPS, saved
    rerun = train_and_evaluate(config(screen), killed)
    assert rerun["step"] == STEPS and rerun["stopped"] == "done"
    log = (killed / "metrics.jsonl").read_text().splitlines()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in log]
    assert max(saved) + 1 in steps  # the rerun started right after the last checkpoint
    assert steps == sorted(set(steps))  # metrics rewound to the checkpoint: no step logged twice
    assert_bitwise(rerun["state"], reference[1]["state"])


def test_sigterm_checkpoints_exits_zero_and_resumes(jobs, reference, screen):
    """B: SIGTERM (preemption notice): a checkpoint of the current step, exit code 0; the rerun resumes."""
    termed = jobs["termed"]
    assert jobs["term_rc"] == 0, termed.with_suffix(".log").read_text()[-3000:]
    saved = steps_on_disk(termed)
    assert saved and max(saved) < STEPS
    last = max(saved)
    assert (termed / "checkpoints" / str(last) / "commit_success.txt").exists() or (
        termed / "checkpoints" / str(last) / "meta"
    ).is_dir()
    assert f"stopped at step {last} (signal)" in termed.with_suffix(".log").read_text()
    rerun = train_and_evaluate(config(screen), termed)
    assert rerun["step"] == STEPS
    assert_bitwise(rerun["state"], reference[1]["state"])


def _damage(step_dir: pathlib.Path, how: str) -> None:
    """Truncate (or overwrite with garbage) every file of the model item of one checkpoint."""
    files = [f for f in (step_dir / "model").rglob("*") if f.is_file()]
    assert files
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 3] if how == "truncate" else os.urandom(max(len(data), 16)))


def test_damaged_latest_checkpoint_falls_back_to_previous(reference, screen, tmp_path, caplog):
    """C: the newest checkpoint is damaged: restore the previous one with a warning and finish bitwise equal."""
    wd = tmp_path / "wd"
    shutil.copytree(reference[0] / "checkpoints", wd / "checkpoints")
    shutil.copy(reference[0] / "metrics.jsonl", wd / "metrics.jsonl")
    assert steps_on_disk(wd) == [STEPS - EVERY, STEPS]
    _damage(wd / "checkpoints" / str(STEPS), "truncate")  # model item cut short ...
    for f in (wd / "checkpoints" / str(STEPS) / "opt").rglob("*"):  # ... and the optimizer item overwritten
        if f.is_file():
            f.write_bytes(os.urandom(max(f.stat().st_size, 16)))
    with caplog.at_level(logging.WARNING):
        rerun = train_and_evaluate(config(screen), wd)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(STEPS) in m and ("unusable" in m or "damaged" in m or "corrupt" in m) for m in warned), warned
    assert rerun["step"] == STEPS
    assert_bitwise(rerun["state"], reference[1]["state"])
    assert STEPS in steps_on_disk(wd)  # step 40 written again, from the previous good one


def test_no_usable_checkpoint_is_a_clear_error(reference, screen, tmp_path, capsys):
    """C: every checkpoint damaged: one-line CheckpointError (exit 5) naming the folder; nothing overwritten."""
    wd = tmp_path / "wd"
    shutil.copytree(reference[0] / "checkpoints", wd / "checkpoints")
    for s in steps_on_disk(wd):
        _damage(wd / "checkpoints" / str(s), "truncate")
    before = {p: p.stat().st_size for p in (wd / "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError):
        train_and_evaluate(config(screen), wd)
    capsys.readouterr()
    rc = run_cli(lambda: train_and_evaluate(config(screen), wd) and None, debug=False)
    err = capsys.readouterr().err.strip()
    assert rc == CheckpointError.exit_code == 5
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "checkpoints" in err, err
    assert "usable" in err, err
    after = {p: p.stat().st_size for p in (wd / "checkpoints").rglob("*") if p.is_file()}
    assert after == before  # the damaged checkpoints are left for inspection, not overwritten
