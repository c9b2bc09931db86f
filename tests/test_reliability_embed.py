"""An embedding job killed mid-run (SIGKILL, a real `tools/embed.py` process): the rerun finishes the store and its
contents are bitwise identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from vitally_jax.checkpoint import export_encoder, load_encoder
from vitally_jax.data.store import metadata_frame, write_store
from vitally_jax.embedding.screen import EmbeddingStore, embed_screen
from vitally_jax.models.vit import ViTEncoder, vit_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
N_IMAGES, CHUNK = 24, 2
SETTINGS = dict(pooling=("cls_norm", "mean"), crop=16, batch_size=8, chunk_images=CHUNK, progress=False)
ARGS = [
    "--pooling",
    "cls_norm,mean",
    "--crop",
    "16",
    "--batch-size",
    "8",
    "--chunk-images",
    str(CHUNK),
    "--no-progress",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("embed_inputs")
    enc = ViTEncoder(vit_config("mu/8", depth=2, in_chans=3), rngs=nnx.Rngs(3))
    enc.blocks.gamma[...] = 0.5 * np.ones(enc.blocks.gamma[...].shape, np.float32)  # blocks visibly differ
    export_encoder(d / "encoder", nnx.state(enc), enc.cfg)
    images = np.random.default_rng(0).integers(0, 256, (N_IMAGES, 32, 32, 3), dtype=np.uint8)
    meta = metadata_frame(
        [f"img{i:02d}" for i in range(N_IMAGES)],
        well_id=[f"W{i // 2:02d}" for i in range(N_IMAGES)],
        site=[i % 2 + 1 for i in range(N_IMAGES)],
    )
    store = write_store(d / "store", images, meta, ["a", "b", "c"])
    return d / "encoder", store


def contents(path: pathlib.Path) -> dict:
    s = EmbeddingStore.open(path)
    return {p: s.features(p) for p in s.poolings}


def test_killed_embedding_job_resumes_identically(inputs, tmp_path):
    enc_path, store = inputs
    out = tmp_path / "emb"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    log = open(tmp_path / "embed.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "embed_slowly.py"),
            "0.15",
            "--encoder",
            str(enc_path),
            "--store",
            str(store),
            "--out",
            str(out),
            *ARGS,
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # meanwhile: the uninterrupted reference, in this process, from the same export
        encoder, _, _ = load_encoder(enc_path)
        ref = tmp_path / "reference"
        assert embed_screen(encoder, store, ref, **SETTINGS)["complete"]
        t0 = time.time()
        while not (out / "done").is_dir() or not any((out / "done").glob("chunk_*")):
            assert proc.poll() is None, (tmp_path / "embed.log").read_text()[-3000:]
            assert time.time() - t0 < 300
            time.sleep(0.005)
        time.sleep(float(np.random.default_rng().uniform(0.0, 0.3)))  # somewhere in a later chunk
        assert proc.poll() is None, "the embedding job finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed = EmbeddingStore.open(out)
    done_before = killed.done_chunks()
    n_chunks = N_IMAGES // CHUNK
    assert 1 <= len(done_before) < n_chunks, done_before
    with pytest.raises(Exception, match="incomplete"):
        killed.features("mean")  # an interrupted store refuses to be read as if it were whole
    rerun = embed_screen(encoder, store, out, **SETTINGS)
    assert rerun["complete"]
    assert sorted(rerun["skipped"]) == sorted(done_before)
    assert sorted(rerun["computed"]) == sorted(set(range(n_chunks)) - done_before)
    a, b = contents(out), contents(ref)
    assert a.keys() == b.keys() == {"cls_norm", "mean"}
    for p in a:
        assert a[p].shape == (2, N_IMAGES, encoder.cfg.width)
        assert np.array_equal(a[p], b[p]), p  # bitwise
    assert json.loads((out / "embedding.json").read_text()) == json.loads((ref / "embedding.json").read_text())
    assert (out / "metadata.parquet").read_bytes() == (ref / "metadata.parquet").read_bytes()
    leftovers = [p.name for p in out.rglob(".*") if p.name.endswith(".tmp")]
    assert not leftovers
