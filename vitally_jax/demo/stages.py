"""Demo infrastructure shared by every stage: the stage runner (fingerprints, reuse, markers), stage folders,
logging, and loading the features the stages pass on to each other.

Imports nothing from the other demo modules, so that they can all import it (no import circle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from vitally_jax.errors import OutputError
from vitally_jax.fileio import write_text

STAGES = ("screen", "curate", "baselines", "pretrain", "embed", "probe", "maps", "benchmarks", "report")


def log(msg: str) -> None:
    """One timestamped progress line of the demo."""
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ stage machinery
@dataclasses.dataclass
class StageRecord:
    """What a finished stage leaves behind in `<workdir>/stages/<name>.json`."""

    name: str
    fingerprint: str
    seconds: float
    outputs: dict[str, Any]
    reused: bool = False


def fingerprint(section: Any, upstream: str = "") -> str:
    """Stable short hash of a config section (anything JSON-serialisable) and the upstream fingerprint."""
    blob = json.dumps(section, sort_keys=True, default=str) + "|" + upstream
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageRunner:
    """Runs named stages in order, reusing those whose done-marker matches their fingerprint.

    A stage function takes no arguments and returns a JSON-serialisable dict of outputs (paths as strings,
    small numbers); it must write its own files atomically. The marker is written only after it returns.
    """

    def __init__(self, workdir: str | os.PathLike, *, force: tuple[str, ...] = ()):
        self.workdir = pathlib.Path(workdir)
        self.marker_dir = self.workdir / "stages"
        self.records: dict[str, StageRecord] = {}
        self.force = set(force)
        self._upstream = ""
        self._invalidated = False
        self.current_fingerprint = ""  # of the stage being run (for `fresh_dir`)

    def marker(self, name: str) -> pathlib.Path:
        return self.marker_dir / f"{name}.json"

    def run(self, name: str, section: Any, fn: Callable[[], dict]) -> dict:
        fp = fingerprint(section, self._upstream)
        self._upstream = fp
        n = len(self.records) + 1
        marker = self.marker(name)
        if marker.exists() and not self._invalidated and name not in self.force:
            rec = json.loads(marker.read_text())
            if rec.get("fingerprint") == fp:
                r = StageRecord(name, fp, float(rec["seconds"]), rec["outputs"], reused=True)
                self.records[name] = r
                log(f"stage {n} {name}: reused (finished earlier in {r.seconds:.1f} s)")
                return r.outputs
            log(f"stage {n} {name}: configuration changed; rerunning it and every later stage")
        self._invalidated = True  # everything after a rerun stage is rerun too
        log(f"stage {n} {name}: running")
        self.current_fingerprint = fp
        t0 = time.perf_counter()
        outputs = fn() or {}
        dt = time.perf_counter() - t0
        write_text(
            marker,
            json.dumps({"name": name, "fingerprint": fp, "seconds": dt, "outputs": outputs}, indent=2, default=str)
            + "\n",
        )
        self.records[name] = StageRecord(name, fp, dt, outputs)
        log(f"stage {n} {name}: done in {dt:.1f} s")
        return outputs

    def times(self):
        """DataFrame stage, seconds, reused (seconds are those of the run that produced the outputs)."""
        import pandas as pd

        return pd.DataFrame(
            [{"stage": r.name, "seconds": r.seconds, "reused": r.reused} for r in self.records.values()]
        )


def fresh_dir(path: pathlib.Path, fp: str) -> pathlib.Path:
    """A working folder for a stage that resumes itself (training, embedding): kept when it was started with the
    same fingerprint (an interrupted run resumes), emptied when it belongs to another configuration."""
    import shutil

    tag = path / ".demo_fingerprint"
    if path.exists() and not (tag.is_file() and tag.read_text().strip() == fp):
        if not tag.is_file() and any(path.iterdir()):  # not a stage folder of the demo: not ours to empty
            raise OutputError(
                f"{path}: exists and is not a demo stage folder (no .demo_fingerprint); "
                "refusing to touch it (move it away or choose another workdir)"
            )
        log(f"  {path} holds outputs of another configuration; starting it afresh")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if not tag.is_file():
        write_text(tag, fp + "\n")
    return path


# ------------------------------------------------------------------------------------------------- helpers
def _csv(s: str) -> list[str]:
    return [p.strip() for p in str(s or "").split(",") if p.strip()]


def _section(config, name: str) -> dict:
    sec = getattr(config, name)
    return sec.to_dict() if hasattr(sec, "to_dict") else dict(sec)


# ------------------------------------------------------------------------------------------ shared features
def well_table(store_path: str, features_by_model: dict) -> tuple[dict, pd.DataFrame]:
    """Per-image features {name: (nb, images, D)} -> per-well features {name: (nb, wells, D)} and well metadata."""
    from vitally_jax.data.store import ImageStore
    from vitally_jax.embedding.screen import well_features

    meta = ImageStore.open(store_path).metadata
    out, wells = {}, None
    for name, f in features_by_model.items():
        out[name], wells = well_features(f, meta)
    return out, wells


# representations that are not encoders: (feature file key in the stage outputs, display name)
BASELINES = {
    "image_stats": ("curate", "image statistics"),
    "crop_stats": ("baselines", "statistics of the self-standardised crops"),
    "cellprofiler": ("baselines", "CellProfiler measurements (median per image)"),
}
CEILINGS = {
    "oracle": ("baselines", "oracle (true process activations)"),
    "oracle_visible": ("baselines", "visible oracle (processes a standardised crop sees)"),
}


def load_representation(outputs: dict, name: str, pooling: str | None = None):
    """(blocks, per-image features (nb, images, D)) of an encoder ("mae", "random_init", at `pooling`) or of a
    baseline / ceiling by key; None where the run has no such representation (e.g. no truth table)."""
    import numpy as np

    from vitally_jax.embedding.screen import EmbeddingStore

    if name in ("mae", "random_init"):
        es = EmbeddingStore.open(outputs["embed"][name])
        return list(es.blocks), es.features(pooling)
    stage = {**BASELINES, **CEILINGS}[name][0]
    path = outputs.get(stage, {}).get(name)
    if not path:
        return None
    x = np.load(path).astype(np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        return None
    return [0], x[None]
