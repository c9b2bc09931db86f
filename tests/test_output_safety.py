"""No writer deletes or overwrites what it did not create (docs/errors.md, "Outputs").

For every writer, run as its command line does (`runpy` on the script with `sys.argv`, or the library call that
main runs), three things are shown:

- a user's folder (or file) at the output path survives byte-identical, with exit code 10 and one line;
- an output equal to an input, or inside one, is refused before any work, the input byte-identical;
- an artefact of the same kind is replaced only with `--overwrite`, and not even then when it holds a file
  that vitally_jax did not write.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from flax import nnx

from vitally_jax import fileio
from vitally_jax.checkpoint import export_encoder, load_encoder
from vitally_jax.data.store import ImageStore
from vitally_jax.data.synthetic import generate_screen
from vitally_jax.errors import OutputError
from vitally_jax.models.vit import ViTEncoder, vit_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ helpers
def snapshot(path: pathlib.Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `path` (or of `path` itself), plus folders as 'dir'."""
    path = pathlib.Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def user_folder(path: pathlib.Path) -> dict[str, str]:
    """A folder of a user's own files (what the bug report had); returns its snapshot."""
    (path / "plots").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "plots" / "fig1.png").write_bytes(b"\x89PNG not really" + os.urandom(64))
    return snapshot(path)


def run_tool(name: str, *argv) -> tuple[int, str]:
    """Run tools/<name>.py as `python tools/<name>.py ARGV` does, in-process; returns (exit code, stderr)."""
    err = io.StringIO()
    old = sys.argv
    sys.argv = [str(ROOT / "tools" / f"{name}.py"), *map(str, argv)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                rc = 0
            except SystemExit as e:
                rc = int(e.code or 0)
    finally:
        sys.argv = old
    return rc, err.getvalue()


def refused(result: tuple[int, str], *needles: str) -> str:
    """Exit code 10 and exactly one `error:` line containing every needle."""
    rc, err = result
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 10 and len(lines) == 1, (rc, err[-2000:])
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def ok(result: tuple[int, str]) -> None:
    assert result[0] == 0, result[1][-3000:]


# ------------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic store, an encoder export, an embedding store, well embeddings + metadata, raw imports."""
    from test_importers import write_jump, write_rxrx1

    d = tmp_path_factory.mktemp("world")
    store = generate_screen(d / "screen", "tiny")
    enc = ViTEncoder(vit_config("mu/8", depth=2, in_chans=6), rngs=nnx.Rngs(0))
    export_encoder(d / "encoder", nnx.state(enc), enc.cfg)
    ok(
        run_tool(
            "embed",
            "--encoder",
            d / "encoder",
            "--store",
            store,
            "--out",
            d / "emb",
            "--crop",
            32,
            "--pooling",
            "mean",
            "--no-progress",
        )
    )
    meta = ImageStore.open(store).metadata
    np.save(d / "x.npy", np.random.default_rng(0).normal(size=(len(meta), 8)).astype(np.float32))
    meta.to_parquet(d / "meta.parquet")
    (d / "rxrx").mkdir()
    rx_csv, _ = write_rxrx1(d / "rxrx")
    (d / "jump").mkdir()
    jump_csv, _ = write_jump(d / "jump", dtype=np.uint8)
    return {
        "dir": d,
        "store": store,
        "encoder": d / "encoder",
        "emb": d / "emb",
        "x": d / "x.npy",
        "meta": d / "meta.parquet",
        "rx_csv": rx_csv,
        "rx_root": d / "rxrx",
        "jump_csv": jump_csv,
        "jump_root": d / "jump",
    }


# each writer: (command for an output path OUT, the kind of artefact, the inputs the command reads)
def _writers(w):
    return {
        "make_store synthetic": (
            lambda out: ("make_store", "synthetic", out, "--set", "n_genes=12", "n_compounds=2", "image_size=32"),
            None,
        ),
        "make_store rxrx": (lambda out: ("make_store", "rxrx", w["rx_csv"], w["rx_root"], out), w["rx_root"]),
        "make_store jump": (
            lambda out: ("make_store", "jump", w["jump_csv"], out, "--image-root", w["jump_root"]),
            w["jump_root"],
        ),
        "embed": (
            lambda out: (
                "embed",
                "--encoder",
                w["encoder"],
                "--store",
                w["store"],
                "--out",
                out,
                "--crop",
                32,
                "--pooling",
                "mean",
                "--no-progress",
            ),
            w["store"],
        ),
        "embed --parquet": (lambda out: ("embed", "--out", w["emb"], "--export-block", 1, "--parquet", out), w["emb"]),
        "curate": (
            lambda out: (
                "curate",
                "--store",
                w["store"],
                "--image-statistics",
                "--permutations",
                50,
                "--min-experiments",
                1,
                "--min-wells",
                1,
                "--out",
                out,
            ),
            w["store"],
        ),
        "probe_sweep": (
            lambda out: (
                "probe_sweep",
                "--encoder",
                w["encoder"],
                "--store",
                w["store"],
                "--out",
                out,
                "--crop",
                32,
                "--tasks",
                "perturbation",
                "--baselines",
                "none",
                "--chunk-images",
                256,
                "--no-progress",
            ),
            w["store"],
        ),
        "benchmark": (
            lambda out: (
                "benchmark",
                "--embeddings",
                w["x"],
                "--metadata",
                w["meta"],
                "--out",
                out,
                "--map-null-size",
                100,
                "--no-plots",
                "--skip",
                "cluster,map",
            ),
            w["x"],
        ),
        "convert_weights orbax": (
            lambda out: ("convert_weights", w["encoder"], "--layout", "export", "--to", "orbax", out),
            w["encoder"],
        ),
        "convert_weights safetensors": (
            lambda out: ("convert_weights", w["encoder"], "--layout", "export", "--to", "safetensors", out),
            w["encoder"],
        ),
    }


WRITERS = [
    "make_store synthetic",
    "make_store rxrx",
    "make_store jump",
    "embed",
    "embed --parquet",
    "curate",
    "probe_sweep",
    "benchmark",
    "convert_weights orbax",
    "convert_weights safetensors",
]
FILE_OUTPUTS = {"embed --parquet": ".parquet", "curate": ".parquet", "convert_weights safetensors": ".safetensors"}


def _out(tmp_path: pathlib.Path, writer: str, name: str = "out") -> pathlib.Path:
    return tmp_path / (name + FILE_OUTPUTS.get(writer, ""))


@pytest.mark.parametrize("writer", WRITERS)
def test_user_files_at_the_output_survive(world, tmp_path, writer):
    cmd, _ = _writers(world)[writer]
    out = _out(tmp_path, writer)
    if writer in FILE_OUTPUTS:
        out.write_bytes(b"a user's own file " + os.urandom(100))
        before = snapshot(out)
    else:
        before = user_folder(out)
    refused(run_tool(*cmd(out)), str(out), "refusing")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left beside it


@pytest.mark.parametrize("writer", [w for w in WRITERS if w != "make_store synthetic"])
def test_output_equal_to_or_inside_an_input_is_refused(world, writer):
    cmd, inp = _writers(world)[writer]
    before = snapshot(inp)
    outs = [inp, inp / ("inside" + FILE_OUTPUTS.get(writer, ""))]
    if writer == "convert_weights safetensors":  # its output must end with .safetensors: only "inside" applies
        outs = outs[1:]
    for out in outs:
        line = refused(run_tool(*cmd(out)), "input")
        assert "is the input" in line or "lies inside the input" in line, line
        assert snapshot(inp) == before


@pytest.mark.parametrize("writer", WRITERS)
def test_overwrite_replaces_only_an_artefact_of_the_same_kind(world, tmp_path, writer):
    cmd, _ = _writers(world)[writer]
    out = _out(tmp_path, writer)
    ok(run_tool(*cmd(out)))
    first = snapshot(out)
    if writer == "embed":  # a finished embedding store with the same settings is resumed: nothing to do
        ok(run_tool(*cmd(out)))
    else:
        refused(run_tool(*cmd(out)), str(out), "--overwrite")  # the same kind: not replaced without the flag
    assert snapshot(out) == first
    ok(run_tool(*cmd(out), "--overwrite"))
    assert out.exists()
    if writer not in FILE_OUTPUTS:  # a foreign file inside the artefact blocks even --overwrite
        (out / "my_notes.txt").write_text("mine\n")
        before = snapshot(out)
        refused(run_tool(*cmd(out), "--overwrite"), "my_notes.txt", "did not write")
        assert snapshot(out) == before
    # an artefact of another kind is not "the same kind" either
    other = tmp_path / ("other" + FILE_OUTPUTS.get(writer, ""))
    if other.suffix == ".parquet":
        fileio.write_parquet(other, pd.DataFrame({"a": [1]}), "some other kind")
    elif other.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"a": np.zeros(2, np.float32)}, str(other), metadata={fileio.TAG: "some other kind"})
    else:
        fileio.write_marker(other, "benchmark report" if writer != "benchmark" else "probe sweep")
    before = snapshot(other)
    refused(run_tool(*cmd(other), "--overwrite"), "refusing")
    assert snapshot(other) == before


def test_probe_sweep_trim_and_curation_sidecars(world, tmp_path):
    """--trim is an encoder export like any other; the curation report files are guarded like the index."""
    cmd, _ = _writers(world)["probe_sweep"]
    trim = tmp_path / "trimmed"
    before = user_folder(trim)
    refused(run_tool(*cmd(tmp_path / "sweep"), "--trim", trim), str(trim))
    assert snapshot(trim) == before and not (tmp_path / "sweep").exists()
    refused(run_tool(*cmd(tmp_path / "sweep"), "--trim", world["store"] / "enc"), "lies inside the input")
    ok(run_tool(*cmd(tmp_path / "sweep"), "--trim", tmp_path / "t2"))
    assert load_encoder(tmp_path / "t2")[1].depth in (1, 2)

    cmd, _ = _writers(world)["curate"]
    index = tmp_path / "idx.parquet"
    (tmp_path / "idx.report.md").write_text("# my own report\n")
    before = snapshot(tmp_path / "idx.report.md")
    refused(run_tool(*cmd(index)), "idx.report.md")
    assert snapshot(tmp_path / "idx.report.md") == before and not index.exists()


def test_embed_overwrite_keeps_the_old_store_until_the_new_one_is_complete(world, tmp_path):
    from vitally_jax.embedding.screen import EmbeddingStore, embed_screen

    enc, _, _ = load_encoder(world["encoder"])
    out = tmp_path / "emb"
    embed_screen(enc, world["store"], out, pooling=("mean",), crop=32, chunk_images=64, progress=False)
    old = EmbeddingStore.open(out).features("mean")
    r = embed_screen(
        enc,
        world["store"],
        out,
        pooling=("mean", "cls"),
        crop=32,
        chunk_images=64,
        progress=False,
        overwrite=True,
        stop_after=1,
    )
    assert not r["complete"]
    np.testing.assert_array_equal(EmbeddingStore.open(out).features("mean"), old)  # untouched, still readable
    r = embed_screen(
        enc, world["store"], out, pooling=("mean", "cls"), crop=32, chunk_images=64, progress=False, overwrite=True
    )  # resumes the replacement, then swaps it in
    assert r["complete"] and r["skipped"] == [0]
    assert EmbeddingStore.open(out).poolings == ["mean", "cls"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]


def test_api_writers_refuse_user_folders(world, tmp_path):
    """The library calls behind the commands keep the same rules (export_encoder, write_store, reports)."""
    from vitally_jax.benchmarks.report import BenchmarkReport

    enc, cfg, _ = load_encoder(world["encoder"])
    target = tmp_path / "mine"
    before = user_folder(target)
    with pytest.raises(OutputError, match="refusing to touch it"):
        export_encoder(target, nnx.state(enc), cfg)
    with pytest.raises(OutputError, match="refusing to touch it"):
        generate_screen(target, "tiny")
    with pytest.raises(OutputError, match="refusing to touch it"):
        BenchmarkReport(summary={"a": 1.0}, tables={}, notes=[]).write(target)
    assert snapshot(target) == before
    export_encoder(tmp_path / "e", nnx.state(enc), cfg)
    with pytest.raises(OutputError, match="overwrite"):
        export_encoder(tmp_path / "e", nnx.state(enc), cfg)
    export_encoder(tmp_path / "e", nnx.state(enc), cfg, num_blocks=1, overwrite=True)
    assert load_encoder(tmp_path / "e")[1].depth == 1
    # an empty folder is fine: nothing to lose
    (tmp_path / "empty").mkdir()
    export_encoder(tmp_path / "empty", nnx.state(enc), cfg)
    assert fileio.folder_kind(tmp_path / "empty") == "encoder export"


def _main(args, cwd, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "vitally_jax.main", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_main_workdir_of_a_user_is_refused_for_train_and_demo(world, tmp_path):
    """`main --workdir` (train and demo) refuses a user's folder and a workdir inside the input store."""
    wd = tmp_path / "wd"
    before = user_folder(wd)
    runs = {
        "train": _main(["--config=configs/tiny.py", f"--workdir={wd}", "--config.total_steps=20"], ROOT),
        "demo": _main(["--config=configs/demo.py", f"--workdir={wd}"], ROOT),
        "inside the store": _main(
            [
                "--config=configs/tiny.py",
                f"--workdir={world['store'] / 'wd'}",
                f"--config.input.store={world['store']}",
            ],
            ROOT,
        ),
    }
    for name, r in runs.items():
        refused((r.returncode, r.stderr), "refusing" if name != "inside the store" else "lies inside the input")
    assert snapshot(wd) == before
    assert not (world["store"] / "wd").exists()


def test_killed_overwrite_leaves_the_previous_store_readable(tmp_path):
    """SIGKILL while `make_store synthetic --overwrite` writes: the old store is intact, or the new one is."""
    out = tmp_path / "store"
    args = [sys.executable, str(ROOT / "tools" / "make_store.py"), "synthetic", str(out)]
    subprocess.run(
        args + ["--set", "n_genes=12", "n_compounds=2", "image_size=32"], check=True, timeout=300, capture_output=True
    )
    old = ImageStore.open(out).read_many(0, len(ImageStore.open(out)))
    proc = subprocess.Popen(
        args + ["--overwrite", "--set", "n_genes=200", "image_size=64"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None, f"the rewrite exited ({proc.returncode}) before writing anything"
        time.sleep(0.01)  # the rewrite has started once its temporary folder exists
    time.sleep(0.1)  # well inside the write: the exchange comes only after every image is written
    assert proc.poll() is None, "the rewrite finished before it could be killed: make it larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = ImageStore.open(out)
    if st.shape[1] == 32:  # killed before the exchange: the previous store, byte for byte
        np.testing.assert_array_equal(st.read_many(0, len(st)), old)
    else:
        assert st.shape[1] == 64 and len(st.read_many(0, 4)) == 4


def test_swap_in_is_an_atomic_exchange(tmp_path):
    old, new = tmp_path / "a", tmp_path / "b"
    (old / "x").mkdir(parents=True)
    (new / "y").mkdir(parents=True)
    fileio.swap_in(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["y"] and not new.exists()


def test_documented_exit_code():
    assert OutputError.exit_code == 10
    assert "| 10 | `OutputError`" in (ROOT / "docs" / "errors.md").read_text()


def test_demo_stage_folder_of_a_user_is_refused(tmp_path):
    """The demo empties a stage folder only when its own fingerprint tag is there."""
    from vitally_jax.demo.stages import fresh_dir

    before = user_folder(tmp_path / "train")
    with pytest.raises(OutputError, match="not a demo stage folder"):
        fresh_dir(tmp_path / "train", "abc")
    assert snapshot(tmp_path / "train") == before
    d = fresh_dir(tmp_path / "ours", "abc")
    (d / "x.txt").write_text("stage output\n")
    fresh_dir(tmp_path / "ours", "other fingerprint")  # its own folder of another configuration: started afresh
    assert sorted(p.name for p in d.iterdir()) == [".demo_fingerprint"]


def test_swap_in_without_exchange_keeps_a_users_dot_old_folder(tmp_path, monkeypatch):
    """Where renameat2 is missing, the two-rename fallback parks the old artefact under a fresh name of its own."""
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    old, new = tmp_path / "a", tmp_path / "b"
    (old / "x").mkdir(parents=True)
    (new / "y").mkdir(parents=True)
    before = user_folder(tmp_path / ".a.old")  # a user's folder with the name a naive fallback would use
    fileio.swap_in(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["y"]
    assert snapshot(tmp_path / ".a.old") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.old", "a"]


def test_export_encoder_leaves_a_foreign_partial_folder_alone(world, tmp_path):
    enc, cfg, _ = load_encoder(world["encoder"])
    before = user_folder(tmp_path / ".e.partial")
    with pytest.raises(OutputError, match="not a partial encoder export"):
        export_encoder(tmp_path / "e", nnx.state(enc), cfg)
    assert snapshot(tmp_path / ".e.partial") == before and not (tmp_path / "e").exists()
