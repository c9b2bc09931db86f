"""Training metrics: JSONL + TensorBoard event files, a progress line with ETA, reconstruction PNGs.

Only process 0 writes. `MetricWriter(workdir)` appends one JSON object per logged step to
`WORKDIR/metrics.jsonl` (`{"step": int, "loss": float, ...}`) and the same scalars to TensorBoard event files
under `WORKDIR/tb`. On resume, `truncate_after(step)` drops lines logged after the restored checkpoint so the
file never holds two histories.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import sys
import time

import numpy as np

from vitally_jax.fileio import atomic_path, write_text

# the SIMD extensions a benchmark report names (those the CPU has, in this order)
SIMD_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
)


def host() -> dict:
    """This machine as benchmark and report figures name it: CPU model, cores, SIMD flags, OS, Python."""
    model, flags = "", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": model or platform.processor() or "unknown CPU",
        "cores": os.cpu_count(),
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "os": platform.platform(),
        "python": platform.python_version(),
    }


class MetricWriter:
    """Scalars to `metrics.jsonl` and TensorBoard; a no-op on processes other than 0."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True, tensorboard: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

    def truncate_after(self, step: int) -> None:
        """Keep only lines with `step <= step` (atomic rewrite)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a torn last line from a killed job
        write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Goodput:
    """Where a training job's wall time goes: productive step time vs compile, checkpoint save / restore, input
    stalls and the rest, as cumulative seconds since the clock was created.

        gp = Goodput()
        with gp.phase("input"):
            batch = next(it)
        gp.scalars()   # {"goodput": productive / wall, "time_wall_s": ..., "time_productive_s": ..., ...}

    Phases: "productive" (dispatching the update step and waiting for its results), "compile", "checkpoint_save",
    "checkpoint_restore", "input" (waiting for the next batch; with asynchronous dispatch the device may still be
    running the previous step meanwhile, so this is an upper bound on the stall); wall time in no phase is
    "other" (setup, initialisation, logging, reconstruction images).
    """

    PHASES = ("productive", "compile", "checkpoint_save", "checkpoint_restore", "input")
    _KEYS = {"input": "time_input_wait_s"}

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._t0 = clock()
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    def phase(self, name: str):
        if name not in self.seconds:
            raise ValueError(f"goodput phase {name!r}; expected one of {list(self.PHASES)}")
        return _Phase(self, name)

    def scalars(self) -> dict[str, float]:
        wall = max(self._clock() - self._t0, 1e-12)
        out = {"goodput": self.seconds["productive"] / wall, "time_wall_s": wall}
        for name in self.PHASES:
            out[self._KEYS.get(name, f"time_{name}_s")] = self.seconds[name]
        out["time_other_s"] = max(wall - sum(self.seconds.values()), 0.0)
        return out


class _Phase:
    def __init__(self, owner: Goodput, name: str):
        self.owner, self.name = owner, name

    def __enter__(self):
        self.t = self.owner._clock()
        return self

    def __exit__(self, *exc):
        self.owner.seconds[self.name] += self.owner._clock() - self.t
        return False


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """All rows of `WORKDIR/metrics.jsonl` in order."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_tensorboard_scalars(logdir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `logdir`: {tag: [(step, value), ...]} in file order.

    Reads the TFRecord framing (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload) and
    checks both checksums; a torn last record (a killed writer) ends that file's reading."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(pathlib.Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            header = data[pos : pos + 8]
            (n,) = struct.unpack("<Q", header)
            (crc_len,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            payload = data[pos + 12 : pos + 12 + n]
            if crc_len != masked_crc32c(header) or len(payload) < n or pos + 16 + n > len(data):
                break
            (crc_data,) = struct.unpack("<I", data[pos + 12 + n : pos + 16 + n])
            if crc_data != masked_crc32c(payload):
                break
            pos += 16 + n
            event = Event.FromString(payload)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """`step 120/1000 (12.0%) loss 0.8123 lr 2.1e-05 | 35.2 img/s | elapsed 0:01:10 ETA 0:08:33` lines.

    The rate is measured from the first step seen by this process after `start` (resumes and compilation
    excluded), so the ETA reflects steady-state speed.
    """

    def __init__(self, total_steps: int, *, stream=None):
        self.total = total_steps
        self.stream = stream or sys.stdout
        self._t0: float | None = None
        self._s0 = 0

    def start(self, step: int) -> None:
        self._t0, self._s0 = time.perf_counter(), step

    def line(self, step: int, scalars: dict[str, float]) -> str:
        elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        done = step - self._s0
        rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
        eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
        shown = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        pct = 100.0 * step / max(self.total, 1)
        return f"step {step}/{self.total} ({pct:.1f}%) {shown} | elapsed {_hms(elapsed)} ETA {_hms(eta)}"

    def print(self, step: int, scalars: dict[str, float]) -> None:
        print(self.line(step, scalars), file=self.stream, flush=True)


def save_reconstruction_png(
    path: str | pathlib.Path,
    original: np.ndarray,
    masked: np.ndarray,
    reconstruction: np.ndarray,
    channel_names: list[str] | None = None,
) -> None:
    """One row per (image, channel): original | masked input | reconstruction (masked tokens filled in).

    original, masked, reconstruction: (B, H, W, C) float (self-standardised units). Colour range per row is
    the original's 1st-99th percentile so the three panels are comparable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, _, _, c = original.shape
    names = channel_names or [f"ch{i}" for i in range(c)]
    fig, axes = plt.subplots(b * c, 3, figsize=(6, 2 * b * c), squeeze=False)
    for i in range(b):
        for ch in range(c):
            r = i * c + ch
            lo, hi = np.percentile(original[i, :, :, ch], [1, 99])
            for j, (img, title) in enumerate(
                ((original, "original"), (masked, "masked"), (reconstruction, "reconstruction"))
            ):
                ax = axes[r, j]
                ax.imshow(img[i, :, :, ch], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(title, fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"img{i} {names[ch]}", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
