"""Acceptance E: 2 local CPU processes (4 fake devices each) train together over loopback; the checkpoint they
write restores in 1 process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import wait_all

from vitally_jax import checkpoint as ckpt
from vitally_jax import config_lib, sharding, train

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    from vitally_jax.data.synthetic import generate_screen

    tmp = tmp_path_factory.mktemp("mh")
    store = generate_screen(tmp / "store", "tiny")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("VITALLY_JAX_TEST_CACHE", str(pathlib.Path.home() / ".cache" / "vitally_jax" / "jax_cc"))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "mh_worker.py"),
                str(i),
                "2",
                str(port),
                str(tmp / "work"),
                str(store),
                str(tmp / f"out{i}.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    wait_all(procs, timeout=600)
    outs = [json.loads((tmp / f"out{i}.json").read_text()) for i in range(2)]
    return tmp, outs


def test_two_processes_agree(two_process_run):
    tmp, (a, b) = two_process_run
    assert (a["devices"], a["local_devices"], b["devices"], b["local_devices"]) == (8, 4, 8, 4)
    assert a["step"] == b["step"] == 6
    for k in ("loss", "loss_rec", "loss_fourier", "grad_norm", "lr", "b1"):
        assert a["metrics"][k] == b["metrics"][k], k  # bitwise, not approximately
    assert np.isfinite(a["metrics"]["loss"])
    assert a["digest"] == b["digest"]
    rows = [json.loads(line) for line in (tmp / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4, 6] and rows[-1]["loss"] == a["metrics"]["loss"]


def test_checkpoint_of_two_processes_restores_in_one(two_process_run):
    tmp, _ = two_process_run
    c = config_lib.load("tiny")
    c.total_steps = 20
    mesh = sharding.make_mesh((1, 8, 1))  # one process, 8 devices, a different mesh shape too
    _, abs_state, state_sh, _, _ = train.build_abstract(c, train.model_config(c), mesh)
    mngr = ckpt.make_manager(tmp / "work" / "checkpoints", keep=3)
    assert mngr.latest_step() == 6
    model, _, meta = ckpt.restore(
        mngr,
        6,
        ckpt.abstract_like(abs_state[0], state_sh[0]),
        ckpt.abstract_like(abs_state[1], state_sh[1]),
        data_iterator=None,
    )
    mngr.close()
    assert meta["process_count"] == 2 and meta["step"] == 6 and not meta["data_restored"]
    want = dict(np.load(tmp / "out0.npz"))
    got = ckpt.state_to_numpy(model)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k
