"""The performance tools run end to end at tiny shapes (the GPU check's CPU smoke, the train-step ablation) and
`vitally_jax.aot` plans pod memory per block."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from vitally_jax import aot
from vitally_jax.cli import CACHE_ENV

ROOT = pathlib.Path(__file__).resolve().parent.parent
PERF = ROOT / "tools" / "perf"


def _run_tool(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python tools/perf/<script> args` in a fresh process (one CPU device), sharing the tests' compilation cache."""
    full = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **env)
    full[CACHE_ENV] = str(jax.config.jax_compilation_cache_dir or "")
    r = subprocess.run(
        [sys.executable, str(PERF / script), *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    _run_tool("gpu_check.py", "--cpu-smoke", "--json", str(out))
    r = json.loads(out.read_text())
    assert r["cpu_smoke"] and r["errors"] == []
    (train,) = r["train"]
    assert train["variant"] == "mu/8" and train["depth"] == 1 and train["dtype"] == "bfloat16"
    assert train["finite"] and train["step_s"] > 0 and train["mfu"] > 0
    # MFU divides two timings taken at different moments, so no bound on it holds on a loaded machine; check the formula
    assert train["mfu"] == pytest.approx(train["tflops"] * 1e12 / r["peak_flops"], rel=1e-9)
    e = r["extraction"]
    assert e["every_block_images_per_s"] > 0 and e["final_block_images_per_s"] > 0
    a = r["agreement"]
    assert 0.99 < a["min_cosine"] <= 1.0 + 1e-6 and a["max_rel_err"] < 0.1


def test_pod_plan_per_block_extrapolation(tmp_path):
    r1 = aot.compile_at_depth("tiny", 1, (1, 8), 64, "bfloat16", "full")
    r2 = aot.compile_at_depth("tiny", 2, (1, 8), 64, "bfloat16", "full")
    assert r1["mesh"] == {"data": 1, "fsdp": 8, "model": 1} and r1["devices"] == 8
    assert (r1["depth"], r2["depth"]) == (1, 2) and r1["full_depth"] == r2["full_depth"] > 0
    # one more encoder block adds its parameters and Lion state to the arguments
    assert r2["argument_bytes"] > r1["argument_bytes"] and r2["peak_bytes"] > 0
    assert r2["params"] > r1["params"]
    est = aot.extrapolate(r1, r2, 5)
    assert est["argument_bytes"] == pytest.approx(r1["argument_bytes"] + 4 * est["argument_per_block"])
    assert est["argument_per_block"] == r2["argument_bytes"] - r1["argument_bytes"]
    rows = [{"model": "tiny", "devices": 8, "per_device_batch": 8, "remat": "full", **est}]
    md = tmp_path / "plan.md"
    aot.write_doc(md, rows, None, "python tools/perf/pod_plan.py --models=tiny", "test")
    text = md.read_text()
    assert "| tiny | 8 | 1 x 8 | 8 | full |" in text and "python tools/perf/pod_plan.py --models=tiny" in text
    assert "extrapolated linearly in depth" in text


def test_profile_train_step_ablation_runs(tmp_path):
    """The train-step ablation tool times the full step, the 1-block decoder and the FFT-free step (tiny shapes;
    the PyTorch side is reported as not available when its venv is missing, as in CI)."""
    out = tmp_path / "profile.json"
    r = _run_tool(
        "profile_train_step.py",
        "--variant=mu/8",
        "--crop=32",
        "--batch=2",
        "--steps=1",
        "--kernel-repeats=2",
        f"--json={out}",
        VITALLY_TORCH_PYTHON=str(tmp_path / "no-venv" / "python"),
    )
    result = json.loads(out.read_text())
    s = result["seconds"]
    assert s["ours_full"] > 0 and s["ours_decoder_1"] > 0 and s["ours_no_fourier"] > 0 and s["ours_xla_attention"] > 0
    assert s["torch_full"] is None and s["torch_decoder_1"] is None
    k = result["kernels_ms"]
    assert set(k["ours"]) == {
        "gelu",
        "gelu_fwd_bwd",
        "layer_norm",
        "softmax",
        "attention_fwd_bwd",
        "attention_unfused_fwd_bwd",
        "batched_qk",
        "mlp_gemms",
        "matmul_2048",
    }
    assert all(v > 0 for v in k["ours"].values()) and k["torch_1"] is None
    # the kernel shapes are the decoder's: mu/8 at 32 px has 16 patches + CLS, decoder width 32
    assert "decoder kernels at rows 34, width 32, hidden 128, 2 heads x 17 tokens (median ms of 2)" in r.stdout


def test_pod_plan_mesh_choice_keeps_every_weight_sharded():
    """G/8's width 1,664 = 13 x 128 does not split 256 ways: pure fsdp=256 would leave its fused projections whole
    on every device, so the plan uses data=2 x fsdp=128 there; L/8 splits 256 ways."""
    assert aot.choose_mesh("L/8", 256) == (1, 256)
    assert aot.choose_mesh("G/8", 64) == (1, 64)
    assert aot.choose_mesh("G/8", 256) == (2, 128)
    whole = aot.state_bytes_per_device("G/8", (1, 256))
    split = aot.state_bytes_per_device("G/8", (2, 128))
    assert whole > 50 * split  # 13.7 GiB vs ~0.11 GiB per device


@pytest.mark.parametrize(
    "script",
    [
        "aot_memory.py",
        "pod_plan.py",
        "bench_all.py",
        "bench_train.py",
        "bench_probe.py",
        "bench_data.py",
        "gpu_check.py",
        "profile_train_step.py",
    ],
)
def test_perf_scripts_start(script):
    """Every performance script imports its helpers (`_shared`, `vitally_jax`) when run by path."""
    r = _run_tool(script, "--help")
    assert "usage:" in r.stdout
