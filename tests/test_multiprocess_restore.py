"""A checkpoint written by N processes, resumed by M: the data stream continues where it stopped.

Real processes: 1 process with 8 CPU devices (this one) and 2 processes with 4 devices each, joined over
loopback (this file run as a script is one of them, like tests/mh_worker.py). One workdir: the tiny model
trains steps 0-3 in 1 process, resumes to step 5 in 2 processes (1 -> 2), and to step 7 in 1 process again
(2 -> 1), checkpointing at the end of each run. The global batches that each checkpoint's restored iterator
yields are compared row by row (a digest of each row's pixels: image, crop and augmentation), gathered over
processes, with those of uninterrupted input pipelines of both layouts.

Usage as a worker: python tests/test_multiprocess_restore.py PROCESS_ID NUM_PROCESSES PORT ARGS_JSON
"""

import os
import sys

if __name__ == "__main__":  # one of the 2 worker processes: 4 fake devices, set before jax is imported
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import hashlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent

TOTAL = 40  # the tiny config's length: the compiled step is shared with the other training tests
FIRST = 3  # steps of the first run (1 process)
MORE = 2  # steps of each resumed run
ENDS = {1: FIRST + 2 * MORE, 2: FIRST + MORE}  # where the run of this many processes stops
STARTS = {1: FIRST + MORE, 2: FIRST}  # where the resumed run of this many processes starts
DRAW = FIRST + 2 * MORE + 2  # global batches of the uninterrupted reference pipelines


def tiny_config(store, stop_after: int):
    from vitally_jax import config_lib

    c = config_lib.load("tiny")
    c.input.store = str(store)
    c.input.synthetic = None
    c.total_steps = TOTAL
    c.stop_after_steps = stop_after
    c.checkpoint.every_steps = TOTAL  # a checkpoint at the end of each run only
    c.checkpoint.keep = 5
    c.log.tensorboard = False
    c.log.peak_flops_per_device = 1e12  # skip the matmul measurement (only the logged MFU uses it)
    return c


def global_batch_rows(c, n: int, workdir=None, step=None):
    """Row digests of the next `n` global batches of the trainer's input pipeline (built as `train_and_evaluate`
    builds it), fresh or restored from checkpoint `step` of `workdir`, gathered over processes.
    Returns (list of n lists of B digests, restore info)."""
    from jax.experimental import multihost_utils

    from vitally_jax import checkpoint as ckpt
    from vitally_jax import sharding, train
    from vitally_jax.data import pipeline

    mesh = sharding.make_mesh(tuple(c.mesh.shape))
    ds = pipeline.train_dataset(
        c.input.store,
        crop=c.input.crop,
        global_batch=c.input.global_batch,
        seed=c.seed,
        index=c.input.index,
        flips=c.input.flips,
        rot90=c.input.rot90,
        in_memory=bool(c.input.in_memory),
    )
    it = iter(pipeline.global_batches(ds, mesh))
    info = {}
    if workdir is not None:
        _, abs_state, state_sh, _, _ = train.build_abstract(c, train.model_config(c), mesh)
        mngr = ckpt.make_manager(pathlib.Path(workdir) / "checkpoints", keep=c.checkpoint.keep)
        with jax.set_mesh(mesh):
            _, _, meta = ckpt.restore(
                mngr,
                step,
                ckpt.abstract_like(abs_state[0], state_sh[0]),
                ckpt.abstract_like(abs_state[1], state_sh[1]),
                data_iterator=it,
            )
        mngr.close()
        info = {k: meta[k] for k in ("process_count", "data_restored", "data_remapped_from")}
    rows = []
    for _ in range(n):
        x = np.asarray(multihost_utils.process_allgather(next(it)["image"], tiled=True))
        assert x.shape[0] == c.input.global_batch
        rows.append([hashlib.sha1(r.tobytes()).hexdigest()[:16] for r in x])
    it.close()
    return rows, info


def saved_positions(workdir, step: int) -> dict:
    """{file name: saved iterator state} of the data item of checkpoint `step`."""
    d = pathlib.Path(workdir) / "checkpoints" / str(step) / "data"
    return {p.name: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}


def resume_and_read(store, workdir) -> dict:
    """Resume `workdir` for MORE steps with this process count; read the reference pipeline and the batches
    after the checkpoint it resumed from and after the one it wrote."""
    from vitally_jax.train import train_and_evaluate

    n = jax.process_count()
    resumed = train_and_evaluate(tiny_config(store, MORE), workdir)
    c = tiny_config(store, MORE)
    ref, _ = global_batch_rows(c, DRAW)
    from_start, info_start = global_batch_rows(c, MORE + 1, workdir, STARTS[n])
    from_end, info_end = global_batch_rows(c, 2, workdir, ENDS[n])
    return dict(
        step=resumed["step"],
        processes=n,
        ref=ref,
        from_start=from_start,
        info_start=info_start,
        from_end=from_end,
        info_end=info_end,
    )


def worker(pid: str, n: str, port: str, args_json: str) -> None:
    """2-process side: resume the workdir written by 1 process, read the pipelines."""
    args = json.loads(args_json)
    cache = os.environ.get("VITALLY_JAX_TEST_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(n), process_id=int(pid))
    out = resume_and_read(args["store"], args["workdir"])  # 1 -> 2
    if jax.process_index() == 0:
        pathlib.Path(args["out"]).write_text(json.dumps(out))
    jax.distributed.shutdown()


if __name__ == "__main__":
    worker(*sys.argv[1:5])
    sys.exit(0)


# ------------------------------------------------------------------------------------------------------------
# The tests (pytest side: 1 process, 8 devices from conftest)
# ------------------------------------------------------------------------------------------------------------

import pytest  # noqa: E402
from conftest import wait_all  # noqa: E402

from vitally_jax import checkpoint as ckpt  # noqa: E402
from vitally_jax.cli import run_cli  # noqa: E402
from vitally_jax.errors import CheckpointError  # noqa: E402
from vitally_jax.train import train_and_evaluate  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(args: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["VITALLY_JAX_TEST_CACHE"] = str(jax.config.jax_compilation_cache_dir)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(i), "2", str(port), json.dumps(args)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    wait_all(procs, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process trains steps 0..FIRST, 2 processes resume to FIRST + MORE, 1 process to FIRST + 2 MORE."""
    from vitally_jax.data.synthetic import generate_screen

    tmp = tmp_path_factory.mktemp("mpr")
    store = generate_screen(tmp / "store", "tiny")
    wd = tmp / "work"
    first = train_and_evaluate(tiny_config(store, FIRST), wd)  # 1 process, checkpoint at FIRST
    assert first["step"] == FIRST
    run_two_processes(dict(store=str(store), workdir=str(wd), out=str(tmp / "two.json")))  # 1 -> 2
    two = json.loads((tmp / "two.json").read_text())
    one = resume_and_read(store, wd)  # 2 -> 1
    return dict(store=store, workdir=wd, config=tiny_config(store, MORE), one=one, two=two)


def test_saved_state_is_the_number_of_records_each_process_consumed(runs):
    b = runs["config"].input.global_batch
    assert (runs["two"]["processes"], runs["two"]["step"], runs["one"]["step"]) == (2, ENDS[2], ENDS[1])
    for step, n in ((FIRST, 1), (ENDS[2], 2), (ENDS[1], 1)):
        assert saved_positions(runs["workdir"], step) == {
            f"process_{i}-of-{n}.json": {"next_index": step * b // n} for i in range(n)
        }, step


def test_both_layouts_feed_the_same_records_each_step(runs):
    """Uninterrupted pipelines: the same rows per global batch; process-major row order (process p holds
    global positions p, p+2, ...)."""
    one, two = runs["one"]["ref"], runs["two"]["ref"]
    assert len(one) == len(two) == DRAW
    for s in range(DRAW):
        assert len(set(one[s])) == len(one[s])  # digests tell the rows apart
        assert sorted(one[s]) == sorted(two[s]), s
        assert two[s] == one[s][0::2] + one[s][1::2], s
    assert len({tuple(sorted(r)) for r in one}) == DRAW  # every step's batch differs: a wrong position shows


@pytest.mark.parametrize("n_from,m_to", [(2, 1), (1, 2)])
def test_resume_with_another_process_count_continues_the_global_batches(runs, n_from, m_to):
    side, other = (runs["one"], runs["two"]) if m_to == 1 else (runs["two"], runs["one"])
    ref, start, end = side["ref"], STARTS[m_to], ENDS[m_to]
    # the checkpoint of N processes, restored by M: the uninterrupted M-process batches from its step on
    assert side["info_start"] == {"process_count": n_from, "data_restored": True, "data_remapped_from": n_from}
    assert side["from_start"] == ref[start : start + MORE + 1]
    assert [sorted(r) for r in side["from_start"]] == [sorted(r) for r in other["ref"][start : start + MORE + 1]]
    assert side["from_start"] != ref[: MORE + 1]  # what a fresh iterator (the data stream restarted) would give
    # the trainer resumed there (its checkpoint at `end` holds end * B records consumed, see the test above),
    # and the checkpoint it wrote continues the uninterrupted batches in turn
    assert side["info_end"] == {"process_count": m_to, "data_restored": True, "data_remapped_from": None}
    assert side["from_end"] == ref[end : end + 2]


def test_position_that_cannot_be_carried_over_is_refused_with_one_line(runs, tmp_path, capsys):
    """The checkpoints of steps FIRST (1 process) and FIRST + MORE (2 processes). With the 2 saved positions
    made unequal, resuming in 1 process stops with exit code 5 and says how to continue; the older checkpoint is
    not tried instead."""
    wd = tmp_path / "w"
    last = ENDS[2]
    shutil.copytree(
        runs["workdir"] / "checkpoints",
        wd / "checkpoints",
        ignore=lambda d, names: [str(ENDS[1])] if pathlib.Path(d).name == "checkpoints" else [],
    )
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == [str(FIRST), str(last)]
    f = wd / "checkpoints" / str(last) / "data" / "process_1-of-2.json"
    f.write_text(json.dumps({"next_index": json.loads(f.read_text())["next_index"] - 1}))
    c = tiny_config(runs["store"], MORE)
    rc = run_cli(lambda: train_and_evaluate(c, wd), debug=False)
    err = capsys.readouterr().err.strip()
    assert rc == CheckpointError.exit_code == 5
    assert len(err.splitlines()) == 1
    assert err.startswith(
        f"error: {wd / 'checkpoints'}/{last}: the data iterator state of 2 processes cannot be "
        "carried over to 1 process (the processes stopped at different positions"
    )
    assert "resume with 2 processes, or move" in err and f"{wd / 'checkpoints'}/{last}/data aside" in err
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == [str(FIRST), str(last)]  # nothing moved
    # how to continue, as the message says: without its data item the checkpoint resumes, data from its seed
    (wd / "checkpoints" / str(last) / "data").rename(wd / "data.aside")
    rows, info = global_batch_rows(c, 1, wd, last)
    assert info == {"process_count": 2, "data_restored": False, "data_remapped_from": None}
    assert rows == runs["one"]["ref"][:1]


def test_remap_refuses_states_it_cannot_map_exactly(runs):
    from vitally_jax.data import pipeline

    c = runs["config"]
    fresh = iter(
        pipeline.train_dataset(c.input.store, crop=c.input.crop, global_batch=c.input.global_batch, seed=c.seed)
    ).get_state()
    assert ckpt.remap_data_state([{"next_index": 24}] * 2, 3, fresh, source="ck") == {"next_index": 16}
    for states, m, current, reason in [
        ([{"next_index": 3}], 2, fresh, "3 records consumed in all, not divisible by 2"),
        ([{"next_index": 4}, {"next_index": 4, "workers": []}], 1, fresh, "a saved state is not a plain"),
        ([{"next_index": 4}] * 2, 1, {"parent": fresh}, "this input pipeline's iterator state is not"),
    ]:
        with pytest.raises(ckpt.DataLayoutError) as e:
            ckpt.remap_data_state(states, m, current, source="ck")
        assert (
            str(e.value).startswith(f"ck: the data iterator state of {len(states)} process")
            and reason in str(e.value)
            and f"resume with {len(states)} process" in str(e.value)
        )
        assert isinstance(e.value, CheckpointError) and e.value.exit_code == 5
