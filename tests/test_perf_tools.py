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
    full = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(ROOT), **env)
    full[CACHE_ENV] = str(jax.config.jax_compilation_cache_dir or "")
    r = subprocess.run(
        [sys.executable, str(PERF / script), *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _perf_module(name: str):
    """A tools/perf script imported as a module (its folder on sys.path only while importing)."""
    import importlib

    sys.path.insert(0, str(PERF))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(PERF))


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = _run_tool("gpu_check.py", "--cpu-smoke", "--json", str(out))
    res = json.loads(out.read_text())
    assert res["cpu_smoke"] and res["errors"] == []
    (train,) = res["train"]
    assert train["variant"] == "mu/8" and train["dtype"] == "bfloat16" and train["finite"]
    # run at two reduced depths, extrapolated per block to the full depth (mu/8: 3 blocks)
    assert train["depths_run"] == [1, 2] and train["depth"] == 3
    t1, t2 = train["step_s_at_depths"]
    assert t1 > 0 and t2 > 0
    assert train["per_block_s"] == pytest.approx(t2 - t1, rel=1e-9)
    assert train["step_s"] == pytest.approx(t1 + 2 * (t2 - t1), rel=1e-9)
    assert train["images_per_s"] == pytest.approx(train["batch"] / train["step_s"], rel=1e-9)
    # MFU divides two timings taken at different moments, so no bound on it holds on a loaded machine; check the formula
    assert train["tflops"] == pytest.approx(train["flops_per_image"] * train["batch"] / train["step_s"] / 1e12)
    assert train["mfu"] == pytest.approx(train["tflops"] * 1e12 / res["peak_flops"], rel=1e-9)
    e = res["extraction"]
    assert e["every_block_images_per_s"] > 0 and e["final_block_images_per_s"] > 0
    a = res["agreement"]
    assert 0.99 < a["min_cosine"] <= 1.0 + 1e-6 and a["max_rel_err"] < 0.1
    f = res["feed"]
    assert f["crops_per_s"] > 0 and f["vs_consumption"]["mu/8"] == pytest.approx(
        f["crops_per_s"] / train["images_per_s"], rel=1e-9
    )
    # which attention ran: on CPU the per-backend default is the head-grouped XLA attention
    assert res["attention"] == ["attention: head_groups (cpu: independent groups of two heads)"]
    assert "attention: attention: head_groups" in r.stdout and "feed " in r.stdout


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
    assert "| tiny | 8 | 1 x 8 | 8 | full | materialised |" in text
    assert "python tools/perf/pod_plan.py --models=tiny" in text
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
    assert s["ours_remat_none"] > 0
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


def test_gemm_bound_counts_every_matmul_of_a_scanned_layer_stack_and_its_backward():
    """A 3-layer scan of tanh(h @ w_i), differentiated: 3 forward matmuls, then per layer one for the input's
    gradient and one for the weight's, each counted as often as the scan runs it, with B, M, K, N and FLOPs."""
    import jax.numpy as jnp

    gb = _perf_module("gemm_bound")

    def loss(w, x):
        h, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)
        return jnp.sum(h)

    w, x = jnp.ones((3, 16, 16)), jnp.ones((5, 16))
    dots = gb.dot_generals(jax.make_jaxpr(jax.jit(jax.value_and_grad(loss)))(w, x))
    assert sum(dots.values()) == 9
    shapes = sorted((gb.canonical(k)["m"], gb.canonical(k)["k"], gb.canonical(k)["n"], n) for k, n in dots.items())
    # forward h @ w (5x16x16) and input grad g @ w^T (5x16x16): 6 calls; weight grad h^T @ g (16x5x16): 3 calls
    assert sum(n for m, k, nn, n in shapes if (m, k, nn) == (5, 16, 16)) == 6
    assert sum(n for m, k, nn, n in shapes if (m, k, nn) == (16, 5, 16)) == 3
    assert all(gb.canonical(k)["flops"] == 2 * 5 * 16 * 16 for k in dots)
    # a batched matmul: batch, free and contracting sizes from the dimension numbers
    key = ((4, 7, 3), (4, 3, 9), (((2,), (1,)), ((0,), (0,))), "float32", "float32")
    assert gb.canonical(key) == {"b": 4, "m": 7, "k": 3, "n": 9, "flops": 2 * 4 * 7 * 3 * 9}


def test_gemm_bound_tool_runs(tmp_path):
    """The tool times every matmul of the every-block pass alone and the whole pass (tiny shapes; MKL and the
    PyTorch program are reported as not available when the torch venv is missing, as in CI)."""
    out = tmp_path / "gemm.json"
    r = _run_tool(
        "gemm_bound.py",
        "--job=forward",
        "--variant=mu/8",
        "--crop=32",
        "--batch=2",
        "--repeats=2",
        "--passes=1",
        "--rounds=1",
        f"--json={out}",
        VITALLY_TORCH_PYTHON=str(tmp_path / "no-venv" / "python"),
    )
    res = json.loads(out.read_text())
    # mu/8: 3 parallel blocks of [in_proj, QK^T, AV (one group of two heads), attn_out, mlp_out] + the patch embed
    assert res["calls"] == 16 and res["distinct"] == len(res["cases"])
    assert (
        res["xla_s"] > 0
        and res["xla_best_s"] <= res["xla_s"] + 1e-12
        and res["ours_s"] > 0
        and res["mkl_s"] is None
        and res["torch_s"] is None
    )
    assert res["xla_s"] == pytest.approx(sum(c["xla_ms"] * c["count"] for c in res["cases"]) / 1e3)
    assert "matmuls: " in r.stdout and "16 calls" in r.stdout


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
        "bench_world.py",
        "bench_embed.py",
        "gpu_check.py",
        "profile_train_step.py",
        "gemm_bound.py",
    ],
)
def test_perf_scripts_start(script):
    """Every performance script imports its helpers (`_shared`, `vitally_jax`) when run by path."""
    r = _run_tool(script, "--help")
    assert "usage:" in r.stdout


def test_pod_plan_doc_shows_both_attention_memory_models(tmp_path):
    base = {"model": "G/8", "devices": 256, "mesh": {"data": 2, "fsdp": 128}, "per_device_batch": 32, "remat": "full"}
    gib = 2**30
    rows = [
        {**base, "attention": "xla", "argument_bytes": gib, "temp_bytes": 20 * gib, "peak_bytes": 21 * gib,
         "peak_per_block": 0.1 * gib},
        {**base, "attention": "chunked", "argument_bytes": gib, "temp_bytes": 5 * gib, "peak_bytes": 6 * gib,
         "peak_per_block": 0.05 * gib},
    ]  # fmt: skip
    md = tmp_path / "plan.md"
    aot.write_doc(md, rows, None, "python tools/perf/pod_plan.py", "test")
    text = md.read_text()
    row = "| G/8 | 256 | 2 x 128 | 32 | full | "
    assert row + "materialised | 1.00 | 20.00 | 21.00 | 0.10 | no / yes / yes / yes |" in text
    assert row + "fused | 1.00 | 5.00 | 6.00 | 0.05 | yes / yes / yes / yes |" in text
    # recommendations per memory model: the fused plan fits 16 GiB devices, the materialised one needs 32
    assert "- **G/8, fused: no score matrices" in text and "- **G/8, materialised scores" in text
    fused = text.split("- **G/8, fused")[1].split("- **G/8, materialised")[0]
    assert "G/8 on 16 GiB devices: 256 devices" in fused
    materialised = text.split("- **G/8, materialised")[1]
    assert "G/8 on 16 GiB devices: nothing planned fits" in materialised
    with pytest.raises(ValueError, match="attention memory model 'flash'"):
        aot.accelerator_attention(aot.load_config("tiny"), "flash")


def test_bench_all_writes_its_figures_between_the_markers(tmp_path):
    bench_all = _perf_module("bench_all")
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nintro\n\n{bench_all.BEGIN}\nold figures\n{bench_all.END}\n\n## Later\ntext\n")
    info = {
        "command": "python tools/perf/bench_all.py --only=maps",
        "date": "2026-01-01 00:00",
        "machine": bench_all.host(),
        "load_start": "1.0 1.0 1.0",
        "load_end": "1.1 1.0 1.0",
        "wall_s": 120.0,
        "started": 0.0,
    }
    rows = [{"name": "maps", "rc": 0, "wall_s": 12.0, "tail": ["16.2x step by step"]}]
    lines = bench_all.summary_lines(info, rows)
    bench_all.write_doc_section(lines, doc)
    text = doc.read_text()
    assert text.startswith("# Performance\n\nintro\n\n") and text.endswith("\n\n## Later\ntext\n")
    body = text.split(bench_all.BEGIN)[1].split(bench_all.END)[0]
    assert "old figures" not in body and "16.2x step by step" in body
    assert "python tools/perf/bench_all.py --only=maps" in body and "2026-01-01 00:00" in body
    assert info["machine"]["cpu"] in body and "load average 1.0 1.0 1.0 at the start" in body
    bench_all.write_doc_section(lines, doc)  # idempotent: one section, rewritten in place
    assert doc.read_text() == text
    doc.write_text("no markers here\n")
    from vitally_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="performance.md: expected one '<!-- bench_all:begin -->'"):
        bench_all.write_doc_section(lines, doc)


def test_bench_all_matmul_floor_row_is_the_bound_from_the_tools_json(tmp_path, monkeypatch):
    """The summary's matmul-floor row shows what gemm_bound.py wrote: the bound is PyTorch's whole program over
    XLA's best matmul time; a run against torch.compile says so."""
    bench_all = _perf_module("bench_all")
    monkeypatch.setattr(bench_all, "OUT", tmp_path)
    g = {"job": "MAE train step X", "calls": 812, "gflop": 101.5, "xla_s": 0.7, "xla_nn_s": 0.65, "xla_best_s": 0.625}
    g.update(mkl_s=0.5, ours_s=1.25, torch_s=0.8, torch_cmd="compile")
    (tmp_path / "gemm_train256.json").write_text(json.dumps(g))
    info = {"command": "c", "date": "d", "machine": bench_all.host(), "load_start": "1", "load_end": "1"}
    info.update(wall_s=60.0, started=0.0)
    lines = bench_all.summary_lines(info, [{"name": "gemm_train256", "rc": 0, "wall_s": 1.0, "tail": []}])
    (row,) = [ln for ln in lines if ln.startswith("| MAE train step X")]
    assert "vs torch.compile" in row and "| 0.625 s | 0.500 s | 1.25x |" in row
    assert "| 50% | **1.28x** |" in row  # 0.625 / 1.25 of ours; 0.8 / 0.625 = 1.28


def test_host_names_this_machine():
    """The machine every benchmark and real-data report names: its CPU model as /proc/cpuinfo gives it, its cores,
    and only SIMD extensions the CPU reports."""
    from vitally_jax.metrics import SIMD_FLAGS, host

    h = host()
    assert h["cores"] == os.cpu_count() and h["cpu"]
    assert set(h["simd"]) <= set(SIMD_FLAGS)
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        assert h["cpu"] in text
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split()
        assert h["simd"] == [f for f in SIMD_FLAGS if f in flags]
