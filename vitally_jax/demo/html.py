"""A self-contained run report: one `report.html` (figures embedded as base64 PNGs) plus machine-readable results.

Usage::

    rep = Report("vitally_jax demo")
    rep.heading("Results")
    rep.table(results_df, caption="one row per model and map")
    rep.figure(recall_bars(recall_df), caption="known-relationship recall")
    rep.write(workdir / "report.html")
    write_results(results_df, workdir)          # results.json + results.csv

The plotting helpers return PNG bytes (matplotlib, Agg backend) so they can be embedded, saved, or checked.
`report_images(path)` decodes every embedded image again (used by tests to check none is broken or blank).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import pathlib
import re
from collections.abc import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vitally_jax.errors import DataError  # noqa: E402
from vitally_jax.fileio import atomic_path, write_text  # noqa: E402

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #2b6cb0; padding-bottom: .2em; }
h2 { margin-top: 1.8em; color: #2b6cb0; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0 1.2em 0; font-size: 0.9em; display: block; max-width: 100%;
        overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #edf2f7; }
td.txt, th.txt { text-align: left; }
tr:nth-child(even) td { background: #f7fafc; }
figure { margin: .8em 0 1.4em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption, .caption { color: #555; font-size: 0.9em; margin-top: .2em; }
pre { background: #f4f4f4; padding: .8em; overflow: auto; font-size: 0.8em; max-height: 40em; white-space: pre-wrap; }
.verdict { font-weight: bold; }
.pass { color: #276749; } .fail { color: #c53030; }
"""


# ----------------------------------------------------------------------------------------------- HTML builder
class Report:
    """Accumulates headings, text, tables and figures; renders one self-contained HTML page."""

    def __init__(self, title: str):
        self.title = title
        self._parts: list[str] = []

    def heading(self, text: str) -> None:
        self._parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, *, css_class: str | None = None) -> None:
        cls = f' class="{css_class}"' if css_class else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def html(self, fragment: str) -> None:
        """Append a trusted HTML fragment (built by this module's callers from escaped values)."""
        self._parts.append(fragment)

    def pre(self, text: str) -> None:
        self._parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, df: pd.DataFrame, *, caption: str | None = None, digits: int = 3) -> None:
        self._parts.append(html_table(df, digits=digits))
        if caption:
            self._parts.append(f'<p class="caption">{html.escape(caption)}</p>')

    def figure(
        self, png: bytes, *, caption: str | None = None, alt: str = "figure", max_width: str | None = None
    ) -> None:
        """Embed PNG bytes; `max_width` (CSS, e.g. "480px") limits the displayed width."""
        b64 = base64.b64encode(png).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        style = f' style="max-width: {html.escape(max_width)}"' if max_width else ""
        img = f'<img alt="{html.escape(alt)}"{style} src="data:image/png;base64,{b64}">'
        self._parts.append(f"<figure>{img}{cap}</figure>")

    def render(self) -> str:
        body = "\n".join(self._parts)
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head>\n"
            f"<body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n"
        )

    def write(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the page atomically; returns the path."""
        write_text(path, self.render())
        return pathlib.Path(path)


def _fmt(v, digits: int) -> tuple[str, bool]:
    """Format one table cell; returns (text, is_text)."""
    if isinstance(v, (bool, np.bool_)):
        return ("yes" if v else "no"), True
    if isinstance(v, (int, np.integer)):
        return f"{int(v)}", False
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"), False
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10**-digits):
            return f"{v:.{digits}g}", False
        return f"{v:.{digits}f}", False
    return str(v), True


def html_table(df: pd.DataFrame, *, digits: int = 3) -> str:
    """DataFrame -> escaped HTML table; numbers right-aligned with `digits` decimals, text left-aligned."""
    head = "".join(
        f'<th class="{"txt" if not pd.api.types.is_numeric_dtype(df[c]) else "num"}">{html.escape(str(c))}</th>'
        for c in df.columns
    )
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for v in rec:
            s, is_text = _fmt(v, digits)
            cells.append(f'<td class="{"txt" if is_text else "num"}">{html.escape(s)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


# ------------------------------------------------------------------------------------------ results files
def write_results(
    results: pd.DataFrame, out_dir: str | os.PathLike, *, extra: dict | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write `results.csv` and `results.json` (rows + optional `extra` dict) atomically into `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    with atomic_path(csv_path) as tmp:
        results.to_csv(tmp, index=False)
    payload = {"results": json.loads(results.to_json(orient="records")), **(extra or {})}
    write_text(json_path, json.dumps(payload, indent=2, default=_json_default) + "\n")
    return json_path, csv_path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (pathlib.Path,)):
        return str(o)
    return str(o)


# -------------------------------------------------------------------------------------------------- figures
def figure_png(fig, *, dpi: int = 90) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def channel_montage(images: np.ndarray, channel_names: Sequence[str], row_labels: Sequence[str]) -> bytes:
    """Grid of grayscale panels: one row per image, one column per channel, plus an RGB composite column.

    images: uint8 (n, H, W, C). Each panel is contrast-stretched to its own 1st-99.5th percentile for display.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise DataError(f"montage images: expected (n, H, W, C), got shape {images.shape}")
    n, _, _, c = images.shape
    fig, axes = plt.subplots(n, c + 1, figsize=(1.6 * (c + 1), 1.7 * n), squeeze=False)
    for i in range(n):
        img = images[i].astype(np.float32)
        for j in range(c):
            ax = axes[i, j]
            ax.imshow(_stretch(img[..., j]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(channel_names[j] if j < len(channel_names) else f"ch{j}", fontsize=9)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=8)
        rgb = np.stack([_stretch(img[..., k % c]) for k in (min(c - 1, 4), min(c - 1, 2), 0)], axis=-1)
        axes[i, c].imshow(rgb, interpolation="nearest")
        axes[i, c].set_xticks([]), axes[i, c].set_yticks([])
        if i == 0:
            axes[i, c].set_title("composite", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def _stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [1.0, 99.5])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def training_curves(
    metrics: pd.DataFrame, *, keys: Iterable[str] = ("loss", "loss_rec", "loss_fourier", "lr")
) -> bytes:
    """Loss terms and learning rate against step. metrics: one row per logged step with a `step` column."""
    keys = [k for k in keys if k in metrics.columns and metrics[k].notna().any()]
    if "step" not in metrics.columns or not keys:
        raise DataError(f"training metrics: need a 'step' column and one of loss/lr, got {list(metrics.columns)}")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        m = metrics[["step", k]].dropna()
        ax.plot(m["step"], m[k], lw=1.2, color="#2b6cb0")
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step")
        if k.startswith("loss") and (m[k] > 0).all() and m[k].max() > 20 * m[k].min():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def probe_curves(sweep: pd.DataFrame, b_star: dict[str, int], *, labels: dict[str, str] | None = None) -> bytes:
    """Probe score per block, one panel per task, one line per source; b* of the trained model marked.

    sweep columns (as written by `vitally_jax.probes.sweep`): source, task, block (1-based), score. Sources with
    a single row (e.g. image statistics, block 0) are drawn as horizontal dashed lines. `labels` renames sources.
    """
    labels = labels or {}
    tasks = list(dict.fromkeys(sweep["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.3), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes[0], tasks):
        t = sweep[sweep["task"] == task]
        for k, (source, m) in enumerate(t.groupby("source", sort=False)):
            col, name = colors[k % len(colors)], labels.get(source, source)
            if len(m) > 1:
                m = m.sort_values("block")
                ax.plot(m["block"], m["score"], marker="o", ms=4, lw=1.8, label=name, color=col)
            else:
                ax.axhline(float(m["score"].iloc[0]), ls="--", lw=1.2, label=name, color=col)
        if task in b_star:
            ax.axvline(b_star[task], color="#c53030", ls=":", lw=1.5, label=f"b* = {b_star[task]}")
        ax.set_title(task.replace("_", " "), fontsize=10)
        ax.set_xlabel("block")
        ax.set_ylabel("balanced accuracy")
        blocks = sorted(int(b) for b in t["block"].unique() if b > 0)
        if blocks:
            ax.set_xticks(blocks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return figure_png(fig)


def recall_bars(recall: pd.DataFrame, *, value_col: str = "recall", random_level: float | None = 0.1) -> bytes:
    """Grouped bars: known-relationship recall per annotation source (x) and model (colour).

    recall columns: source, model, `value_col`.
    """
    pivot = recall.pivot_table(index="source", columns="model", values=value_col, sort=False)
    sources, models = list(pivot.index), list(pivot.columns)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(sources) * max(1, len(models)) / 2.5), 3.4))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(sources))
    for k, model in enumerate(models):
        ax.bar(x + (k - (len(models) - 1) / 2) * width, pivot[model].to_numpy(), width, label=model)
    if random_level is not None:
        ax.axhline(random_level, color="gray", ls="--", lw=1, label=f"random ({random_level:.2f})")
    ax.set_xticks(x, sources)
    ax.set_ylabel(value_col.replace("_", " "))
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def stage_times(times: pd.DataFrame) -> bytes:
    """Horizontal bars of wall time per stage. times columns: stage, seconds."""
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(times) + 1.0))
    ax.barh(times["stage"][::-1], times["seconds"][::-1], color="#2b6cb0")
    ax.set_xlabel("wall time (s)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


# ---------------------------------------------------------------------------------------------- checking
_IMG_RE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
_TD_RE = re.compile(r'<td class="num">([^<]*)</td>')


def report_images(path: str | os.PathLike) -> list:
    """Decode every embedded PNG of a report (PIL images, fully loaded). Raises if one does not decode."""
    from PIL import Image

    text = pathlib.Path(path).read_text()
    out = []
    for b64 in _IMG_RE.findall(text):
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.load()
        out.append(im)
    return out


def report_numeric_cells(path: str | os.PathLike) -> list[str]:
    """Text of every numeric table cell in a report (to check they are all finite numbers)."""
    return [html.unescape(s) for s in _TD_RE.findall(pathlib.Path(path).read_text())]


# ------------------------------------------------------------------------------------------ provenance
def environment() -> dict[str, str]:
    """Python, platform, the library versions recorded with checkpoints (`vitally_jax.checkpoint.versions`),
    the other main libraries of this run and the devices."""
    import importlib.metadata as md
    import platform

    from vitally_jax.checkpoint import versions

    out = {"python": platform.python_version(), "platform": platform.platform(), **versions()}
    for pkg in ("jaxlib", "grain", "tensorstore", "numpy", "scikit-learn", "pandas", "matplotlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import jax

        out["devices"] = f"{jax.device_count()} x {jax.devices()[0].platform}"
    except Exception:  # noqa: BLE001 - the report still renders without device info
        out["devices"] = "unknown"
    return out
