"""Goodput next to MFU: productive step time over wall time, with compile, checkpoint save / restore and input
stalls reported separately, in metrics.jsonl and in TensorBoard (read back with the project's own reader)."""

from __future__ import annotations

import numpy as np
import pytest

from vitally_jax import config_lib
from vitally_jax.metrics import Goodput, read_metrics, read_tensorboard_scalars
from vitally_jax.train import train_and_evaluate

PHASE_KEYS = (
    "time_productive_s",
    "time_compile_s",
    "time_checkpoint_save_s",
    "time_checkpoint_restore_s",
    "time_input_wait_s",
    "time_other_s",
)


class Clock:
    """A clock that reads the times it is given (seconds)."""

    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_goodput_accounts_every_second_of_wall_time():
    # t0 = 0; compile 0 -> 3; input 3 -> 3.5; productive 3.5 -> 7.5; checkpoint 7.5 -> 8.5; read at 10
    gp = Goodput(clock=Clock(0.0, 0.0, 3.0, 3.0, 3.5, 3.5, 7.5, 7.5, 8.5, 10.0))
    for name in ("compile", "input", "productive", "checkpoint_save"):
        with gp.phase(name):
            pass
    s = gp.scalars()
    assert s["time_wall_s"] == 10.0
    assert (s["time_compile_s"], s["time_input_wait_s"], s["time_productive_s"]) == (3.0, 0.5, 4.0)
    assert (s["time_checkpoint_save_s"], s["time_checkpoint_restore_s"]) == (1.0, 0.0)
    assert s["time_other_s"] == pytest.approx(1.5, abs=1e-12)
    assert s["goodput"] == pytest.approx(0.4, abs=1e-12)
    with pytest.raises(ValueError, match="goodput phase 'eval'"):
        gp.phase("eval")


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    from vitally_jax.data.synthetic import generate_screen

    return generate_screen(tmp_path_factory.mktemp("screen") / "store", "tiny")


def _config(screen, **top):
    c = config_lib.load("tiny")
    c.input.store = str(screen)
    c.input.synthetic = None
    c.total_steps = 6
    c.optax.pct_start = 0.5  # a warm-up of more than one step
    c.log.every_steps = 2
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False  # (the first asynchronous save compiles helper programs: slower here)
    for k, v in top.items():
        c[k] = v
    return c


def _check_rows(rows):
    for r in rows:
        parts = sum(r[k] for k in PHASE_KEYS)
        assert all(r[k] >= 0 for k in PHASE_KEYS), r
        # other = wall - the measured phases, so the parts add up to the wall time (float64 rounding)
        assert parts == pytest.approx(r["time_wall_s"], rel=1e-9), r
        assert 0 < r["goodput"] < 1 and r["goodput"] == pytest.approx(r["time_productive_s"] / r["time_wall_s"])
        assert r["time_productive_s"] > 0 and r["time_compile_s"] > 0  # the first step compiles
    walls = [r["time_wall_s"] for r in rows]
    assert walls == sorted(walls)  # cumulative since the job started


def test_goodput_in_metrics_jsonl_and_tensorboard(screen, tmp_path):
    first = train_and_evaluate(_config(screen, stop_after_steps=4), tmp_path)
    assert first["stopped"] == "budget" and first["step"] == 4
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 4]
    _check_rows(rows)
    assert all(r["time_checkpoint_restore_s"] == 0 for r in rows)
    assert rows[0]["time_checkpoint_save_s"] == 0 and rows[-1]["time_checkpoint_save_s"] > 0  # saved at step 2
    assert "mfu" in rows[-1]  # next to MFU
    end = first["goodput"]
    assert end["time_checkpoint_save_s"] >= rows[-1]["time_checkpoint_save_s"] and end["time_wall_s"] > 0

    second = train_and_evaluate(_config(screen), tmp_path)  # resumes from step 4
    assert second["step"] == 6
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 4, 5, 6]
    _check_rows(rows[3:])
    assert all(r["time_checkpoint_restore_s"] > 0 for r in rows[3:])

    tb = read_tensorboard_scalars(tmp_path / "tb")
    for key in ("goodput", "mfu", *PHASE_KEYS):
        logged = {r["step"]: r[key] for r in rows if key in r}
        steps = [s for s, _ in tb[key]]
        # the resumed run appends a second event file: the steps of both runs, each once
        assert sorted(steps) == sorted(logged), key
        got = dict(tb[key])
        # TensorBoard stores float32: relative error <= 2^-24
        np.testing.assert_allclose([got[s] for s in logged], list(logged.values()), rtol=2**-23, err_msg=key)
