"""Bad input: every case gives one line `error: ...` naming the problem, its documented exit code, no traceback
unless `--debug`, and no partial output. The table of cases is `docs/errors.md`.

The training entry point (`python -m vitally_jax.main`) is run as real subprocesses (started together, so their
interpreter start-ups overlap); the tools' `main(argv)` functions and the library calls behind them are run
in-process through `vitally_jax.cli.run_cli`, exactly as their command lines do.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from vitally_jax import errors
from vitally_jax.cli import run_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tool(name: str):
    """Import tools/<name>.py as a module (its `main(argv)` is the command line)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_one_line_error(stderr: str, code: int, rc: int, *needles: str) -> str:
    """The last stderr line is `error: ...` containing every needle; no traceback anywhere; rc is `code`."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error: ")]
    assert rc == code, (rc, stderr[-2000:])
    assert len(errs) == 1 and lines[-1] == errs[0], stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    for n in needles:
        assert n in errs[0], (n, errs[0])
    return errs[0]


def cli(capsys, fn, code: int, *needles: str, debug_raises: type | None = None) -> str:
    """Run `fn` as the command lines do (`run_cli`), check the one-line error; optionally check `--debug`."""

    def call():  # a tool's main(argv) returns its exit code; a library call returns data (exit code 0)
        out = fn()
        return out if isinstance(out, int) else None

    capsys.readouterr()
    rc = run_cli(call, debug=False)
    line = assert_one_line_error(capsys.readouterr().err, code, rc, *needles)
    if debug_raises is not None:  # with --debug the same failure shows its traceback (the exception escapes)
        with pytest.raises(debug_raises):
            run_cli(call, debug=True)
    return line


def assert_nothing_written(path: pathlib.Path) -> None:
    """`path` does not exist and no temporary sibling (`.name.*`) was left behind."""
    path = pathlib.Path(path)
    assert not path.exists(), path
    if path.parent.is_dir():
        left = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
        assert not left, left


# ------------------------------------------------------------------------------------------------------------
# python -m vitally_jax.main (subprocesses, started together)
# ------------------------------------------------------------------------------------------------------------


def _main_cases(tmp: pathlib.Path) -> dict[str, tuple[list[str], int, tuple[str, ...]]]:
    (tmp / "a_file").write_text("not a folder")
    tiny = "--config=configs/tiny.py"
    wd = f"--workdir={tmp / 'wd'}"
    return {
        "config key typo": ([tiny, "--config.total_stepz=5", wd], 3, ("total_stepz", "total_steps")),
        "config argument typo": (["--config=configs/tiny.py:runlokal", wd], 3, ("runlokal",)),
        "config value of the wrong type": ([tiny, "--config.input.global_batch=abc", wd], 3, ("global_batch", "abc")),
        "config file missing": (["--config=configs/nope.py", wd], 3, ("configs/nope.py", "not found")),
        "unknown flag": ([tiny, "--workdirr=/tmp/x", wd], 3, ("workdirr",)),
        "invalid config value": ([tiny, "--config.job=trian", wd], 3, ("config.job", "trian")),
        "unwritable workdir": ([tiny, f"--workdir={tmp / 'a_file' / 'wd'}"], 8, ("--workdir", "not writable")),
        "image store missing": (
            [tiny, f"--config.input.store={tmp / 'no_store'}", wd],
            4,
            ("no_store", "no image store"),
        ),
        # optional keys (None by default) are typed placeholders: setting them parses, and the run gets as far
        # as the missing store
        "optional keys settable": (
            [
                tiny,
                "--config.model.decoder_depth=2",
                "--config.optax.mu_dtype=bfloat16",
                "--config.log.peak_flops_per_device=1e12",
                "--config.model.attention_impl=xla",
                f"--config.input.store={tmp / 'no_store'}",
                wd,
            ],
            4,
            ("no_store", "no image store"),
        ),
        "batch not divisible by devices": (
            [tiny, "--config.input.global_batch=12", f"--config.input.store={tmp / 'no_store'}", wd],
            3,
            ("global_batch 12", "divisible"),
        ),
    }


@pytest.fixture(scope="module")
def main_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main_cli")
    cases = _main_cases(tmp)
    cases["--debug shows the traceback"] = (cases["config key typo"][0] + ["--debug"], None, ())
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA_FLAGS from conftest: 8 devices, like the in-process tests
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "vitally_jax.main", *argv],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, _, _) in cases.items()
    }
    out = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=240)
        out[name] = (p.returncode, err)
    return tmp, cases, out


@pytest.mark.parametrize(
    "name",
    [
        "config key typo",
        "config argument typo",
        "config value of the wrong type",
        "config file missing",
        "unknown flag",
        "invalid config value",
        "unwritable workdir",
        "image store missing",
        "optional keys settable",
        "batch not divisible by devices",
    ],
)
def test_training_entry_point(main_runs, name):
    tmp, cases, out = main_runs
    _, code, needles = cases[name]
    rc, err = out[name]
    assert_one_line_error(err, code, rc, *needles)
    assert not (tmp / "wd" / "checkpoints").exists()  # nothing trained, nothing half-written
    assert not (tmp / "wd" / "metrics.jsonl").exists()
    assert not list(tmp.rglob("events.out.tfevents*"))  # no empty TensorBoard file either


def test_training_entry_point_debug_shows_traceback(main_runs):
    _, _, out = main_runs
    rc, err = out["--debug shows the traceback"]
    assert rc != 0 and "Traceback" in err and "ConfigError" in err and "total_stepz" in err


# ------------------------------------------------------------------------------------------------------------
# tools/benchmark.py: embeddings, metadata, controls
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    md = pd.DataFrame(
        {
            "perturbation": ["EMPTY"] * 10 + [f"G{i % 10}" for i in range(30)],
            "experiment": ["e1"] * 40,
            "is_control": [True] * 10 + [False] * 30,
        }
    )
    np.save(d / "emb.npy", x)
    md.to_parquet(d / "md.parquet")
    bad = x.copy()
    bad[3, 2] = np.nan
    np.save(d / "nan.npy", bad)
    np.save(d / "emb3d.npy", x[:, :, None])
    md.assign(is_control=False).to_parquet(d / "no_controls.parquet")
    md.drop(columns=["perturbation"]).to_parquet(d / "no_perturbation.parquet")
    md.iloc[:30].to_parquet(d / "short.parquet")
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "a_file").write_text("x")
    return d


BENCH_CASES = {
    "NaN embeddings": ("nan.npy", "md.parquet", "out", 7, ("embeddings", "NaN", "row 3")),
    "no control wells": ("emb.npy", "no_controls.parquet", "out", 7, ("control wells", "none found")),
    "metadata missing column": ("emb.npy", "no_perturbation.parquet", "out", 7, ("no column 'perturbation'",)),
    "metadata rows != embeddings": ("emb.npy", "short.parquet", "out", 7, ("30 rows", "40")),
    "corrupt metadata file": ("emb.npy", "corrupt.parquet", "out", 4, ("corrupt.parquet",)),
    "embeddings file missing": ("missing.npy", "md.parquet", "out", 4, ("missing.npy", "not found")),
    "embeddings not 2-D": ("emb3d.npy", "md.parquet", "out", 7, ("2-D", "(40, 8, 1)")),
    "unwritable report folder": ("emb.npy", "md.parquet", "a_file/out", 8, ("a_file/out",)),
}


@pytest.mark.parametrize("name", list(BENCH_CASES))
def test_benchmark_tool(bench_inputs, capsys, name):
    emb, md, out, code, needles = BENCH_CASES[name]
    d = bench_inputs
    main = tool("benchmark").main
    argv = [
        "--embeddings",
        str(d / emb),
        "--metadata",
        str(d / md),
        "--out",
        str(d / out),
        "--no-plots",
        "--skip",
        "recall,cluster,map,magnitude",
    ]
    cli(capsys, lambda: main(argv), code, *needles)
    assert_nothing_written(d / out)


def test_benchmark_tool_debug_shows_traceback(bench_inputs):
    """With --debug the error escapes as the exception itself (Python prints its traceback)."""
    d = bench_inputs
    main = tool("benchmark").main
    with pytest.raises(errors.BenchmarkInputError, match="NaN"):
        main(
            [
                "--embeddings",
                str(d / "nan.npy"),
                "--metadata",
                str(d / "md.parquet"),
                "--out",
                str(d / "dbg"),
                "--debug",
            ]
        )
    assert_nothing_written(d / "dbg")


# ------------------------------------------------------------------------------------------------------------
# Annotation tables
# ------------------------------------------------------------------------------------------------------------


def test_annotation_tables(tmp_path, capsys):
    from vitally_jax.benchmarks import known_relationship_recall

    rng = np.random.default_rng(1)
    labels = np.array([f"G{i}" for i in range(25)])
    x = rng.normal(size=(25, 4))
    pd.DataFrame({"gene_a": ["G1"], "gene_b": ["G2"]}).to_csv(tmp_path / "wrong_columns.csv", index=False)
    cli(
        capsys,
        lambda: known_relationship_recall(x, labels, sources=[str(tmp_path / "wrong_columns.csv")]),
        7,
        "wrong_columns.csv",
        "entity1",
        "gene_a",
        debug_raises=errors.BenchmarkInputError,
    )
    # genes the map does not have: the bundled CORUM table shares no pair with G0..G24
    line = cli(capsys, lambda: known_relationship_recall(x, labels, sources=["CORUM"]), 7, "no annotated pair", "'G0'")
    assert "np.str_" not in line
    cli(
        capsys,
        lambda: known_relationship_recall(x, labels, sources=[str(tmp_path / "absent.csv")]),
        7,
        "absent.csv",
        "not found",
    )


# ------------------------------------------------------------------------------------------------------------
# Weight files (tools/convert_weights.py)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_state():
    from flax import nnx

    from vitally_jax.interop.timm_vit import timm_vit_state_dict
    from vitally_jax.models.vit import ViTEncoder, vit_config

    enc = ViTEncoder(vit_config("mu/8", depth=2, in_chans=3), rngs=nnx.Rngs(0))
    return {k: np.asarray(v) for k, v in timm_vit_state_dict(enc).items()}


def test_weight_files(timm_state, tmp_path, capsys):
    import safetensors.numpy

    main = tool("convert_weights").main
    wrong_keys = tmp_path / "wrong_keys.safetensors"
    safetensors.numpy.save_file({"foo": np.zeros((3, 4), np.float32)}, str(wrong_keys))
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    bad = dict(timm_state)
    key = next(k for k in bad if k.endswith("mlp_out_proj.weight"))
    bad[key] = np.zeros((bad[key].shape[0], bad[key].shape[1] + 3), np.float32)
    safetensors.numpy.save_file(bad, str(wrong_shape))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(wrong_keys.read_bytes()[:30])
    for src, needles in (
        (wrong_keys, ("wrong_keys.safetensors", "cls_token")),
        (wrong_shape, ("wrong_shape.safetensors", "mlp_out_proj")),
        (truncated, ("truncated.safetensors",)),
        (tmp_path / "absent.safetensors", ("absent.safetensors", "not found")),
    ):
        out = tmp_path / f"out_{src.stem}"
        cli(capsys, lambda: main([str(src), "--layout", "timm-vit", "--to", "orbax", str(out)]), 6, *needles)
        assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------------------
# Images, metadata and stores
# ------------------------------------------------------------------------------------------------------------


def test_store_writer_rejects_bad_images_and_metadata(tmp_path, capsys):
    from vitally_jax.data.store import metadata_frame, write_store

    ok = np.zeros((2, 16, 16, 3), np.uint8)
    meta = metadata_frame(["a", "b"])
    cases = [
        (np.zeros((2, 16, 16, 3), np.float32), meta, ("dtype float32", "uint8")),
        (np.zeros((2, 16, 16), np.uint8), meta, ("(2, 16, 16)", "channels")),
        ([ok[0], np.zeros((8, 16, 3), np.uint8)], meta, ("image 1", "(8, 16, 3)")),
        (ok, metadata_frame(["a", "a"]), ("duplicate image_id 'a'",)),
        (ok, metadata_frame(["a", "b"], perturbation_type="virus"), ("perturbation_type 'virus'",)),
        (ok, meta.drop(columns=["plate"]), ("missing required column", "plate")),
        (ok, metadata_frame(["a", "b", "c"]), ("3 metadata rows",)),
    ]
    for k, (images, md, needles) in enumerate(cases):
        out = tmp_path / f"store{k}"
        cli(
            capsys,
            lambda: write_store(out, images, md, ["x", "y", "z"]),
            4,
            *needles,
            debug_raises=errors.DataError if k == 0 else None,
        )
        assert_nothing_written(out)


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    from vitally_jax.data.store import metadata_frame, write_store

    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    return write_store(
        tmp_path_factory.mktemp("good") / "store", images, metadata_frame([f"i{k}" for k in range(4)]), ["a", "b", "c"]
    ), images


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _chunk_files(store: pathlib.Path) -> list[pathlib.Path]:
    return [f for f in (store / "images.zarr").rglob("*") if f.is_file() and f.name != "zarr.json"]


def test_corrupt_store_files(good_store, tmp_path, capsys):
    from vitally_jax.data.store import ImageStore

    src, _ = good_store
    meta = _copy(src, tmp_path / "bad_meta")
    (meta / "metadata.parquet").write_bytes(b"junk")
    cli(capsys, lambda: ImageStore.open(meta), 4, "metadata.parquet", "unreadable")
    desc = _copy(src, tmp_path / "bad_json")
    (desc / "store.json").write_text("{")
    cli(capsys, lambda: ImageStore.open(desc), 4, "store.json", "unreadable")
    cli(capsys, lambda: ImageStore.open(tmp_path / "nowhere"), 4, "nowhere", "no image store")


def test_truncated_image_chunk_is_a_data_error(good_store, tmp_path, capsys):
    from vitally_jax.data.store import ImageStore

    bad = _copy(good_store[0], tmp_path / "truncated")
    for f in _chunk_files(bad):
        f.write_bytes(f.read_bytes()[:10])
    cli(capsys, lambda: ImageStore.open(bad).read(0), 4, "images.zarr")


def test_deleted_image_file_is_a_data_error(good_store, tmp_path, capsys):
    """zarr reads a missing shard as zeros; the store refuses to, even for a shard of all-zero images."""
    import shutil

    from vitally_jax.data.store import ImageStore, metadata_frame, write_store

    bad = _copy(good_store[0], tmp_path / "deleted")
    shutil.rmtree(bad / "images.zarr" / "c" / "0")
    cli(capsys, lambda: ImageStore.open(bad).read(0), 4, "images.zarr", "missing", "c/0", "images 0..3")
    dark = write_store(
        tmp_path / "dark", np.zeros((2, 16, 16, 3), np.uint8), metadata_frame(["d0", "d1"]), ["a", "b", "c"]
    )
    assert ImageStore.open(dark).read(1).shape == (16, 16, 3)  # an all-zero shard is written, so it reads


def test_flipped_bytes_in_image_chunk_are_detected(good_store, tmp_path, capsys):
    """Silent corruption must not reach training: checksums on image chunks turn it into a DataError."""
    from vitally_jax.data.store import ImageStore

    src, images = good_store
    bad = _copy(src, tmp_path / "flipped")
    for f in _chunk_files(bad):
        b = bytearray(f.read_bytes())
        b[40:60] = bytes(20)
        f.write_bytes(bytes(b))
    st = ImageStore.open(bad)
    try:
        got = st.read(0)
    except errors.DataError as e:
        assert "images.zarr" in str(e)
        return
    assert np.array_equal(got, images[0]), "corrupted image chunk read back with wrong pixels and no error"


def test_corrupt_image_file_in_import(tmp_path, capsys):
    """A JUMP load_data CSV whose TIFF for one channel is garbage: DataError naming the file, no store."""
    import tifffile

    root = tmp_path / "jump"
    root.mkdir()
    row = {"Metadata_Plate": "P1", "Metadata_Well": "A01", "Metadata_Site": 1}
    for ch in ("DNA", "ER", "RNA", "AGP", "Mito"):
        name = f"P1_A01_s1_{ch}.tiff"
        tifffile.imwrite(root / name, np.zeros((16, 16), np.uint8))
        row[f"FileName_Orig{ch}"], row[f"PathName_Orig{ch}"] = name, str(root)
    (root / "P1_A01_s1_RNA.tiff").write_bytes(b"II*\x00 definitely not a tiff")
    pd.DataFrame([row]).to_csv(root / "load_data.csv", index=False)
    main = tool("make_store").main
    out = tmp_path / "store"
    cli(capsys, lambda: main(["jump", str(root / "load_data.csv"), str(out)]), 4, "P1_A01_s1_RNA.tiff")
    assert_nothing_written(out)
    (root / "P1_A01_s1_RNA.tiff").unlink()
    cli(capsys, lambda: main(["jump", str(root / "load_data.csv"), str(out)]), 4, "P1_A01_s1_RNA.tiff", "not found")
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------------------
# Encoders and embedding runs (tools/embed.py)
# ------------------------------------------------------------------------------------------------------------


def test_embed_tool_inputs(good_store, tmp_path, capsys):
    main = tool("embed").main
    out = tmp_path / "emb"
    cli(
        capsys,
        lambda: main(
            [
                "--encoder",
                str(tmp_path / "no_encoder"),
                "--store",
                str(good_store[0]),
                "--out",
                str(out),
                "--no-progress",
            ]
        ),
        5,
        "no_encoder",
        "not an encoder export",
    )
    assert_nothing_written(out)
    cli(capsys, lambda: main(["--out", str(out), "--export-block", "1"]), 3, "--export-block", "--parquet")
    cli(
        capsys,
        lambda: main(["--out", str(out), "--export-block", "1", "--parquet", str(tmp_path / "b.parquet")]),
        4,
        "emb",
        "not an embedding store",
    )
    assert_nothing_written(tmp_path / "b.parquet")


# ------------------------------------------------------------------------------------------------------------
# Disk full
# ------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tiny_filesystem(path: pathlib.Path, size: str = "1m"):
    """A 1 MiB tmpfs mounted at `path` (needs root); yields False when mounting is not possible here."""
    path.mkdir(parents=True, exist_ok=True)
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", str(path)], check=False)


def test_disk_full_while_writing_a_store(tmp_path, capsys, monkeypatch):
    """A real full disk (1 MiB tmpfs) when we can mount one; otherwise ENOSPC injected into the writes."""
    from vitally_jax import fileio
    from vitally_jax.data.store import metadata_frame, write_store

    images = np.random.default_rng(0).integers(0, 255, (16, 128, 128, 3), dtype=np.uint8)  # 786 kB x ~1 (noise)
    images = np.concatenate([images, images[::-1]])  # 1.5 MB: does not fit
    meta = metadata_frame([f"i{k}" for k in range(len(images))])
    with tiny_filesystem(tmp_path / "small") as mounted:
        if not mounted:  # simulate: the final rename of the atomic write fails with ENOSPC

            def full(*a, **k):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(fileio.os, "replace", full)
        out = tmp_path / "small" / "store"
        cli(capsys, lambda: write_store(out, images, meta, ["a", "b", "c"]), 8, str(out), "no space left")
        assert_nothing_written(out)
        if mounted:
            assert not any((tmp_path / "small").iterdir())  # temporary folder removed, space given back
