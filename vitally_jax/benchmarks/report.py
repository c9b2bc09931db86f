"""A benchmark report: tables + headline numbers, written as CSV, JSON, Markdown and PNG plots (atomically)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import numpy as np
import pandas as pd

from vitally_jax.fileio import ARTEFACT_KEY, atomic_path, check_output

KIND = "benchmark report"  # the artefact kind named in summary.json (see vitally_jax.fileio)


@dataclasses.dataclass
class BenchmarkReport:
    """`summary`: flat metric name -> number; `tables`: name -> DataFrame; `distributions`: name -> 1-D array
    of cosine similarities used for the similarity plot (e.g. null, CORUM pairs, replicate pairs)."""

    summary: dict = dataclasses.field(default_factory=dict)
    tables: dict = dataclasses.field(default_factory=dict)
    distributions: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    def summary_frame(self) -> pd.DataFrame:
        """The headline numbers as a two-column DataFrame (metric, value)."""
        return pd.DataFrame({"metric": list(self.summary), "value": list(self.summary.values())})

    def to_markdown(self) -> str:
        """Markdown: headline table, recall table, notes."""
        lines = ["# Map benchmark report", "", "| metric | value |", "|---|---|"]
        for k, v in self.summary.items():
            lines.append(f"| {k} | {_fmt(v)} |")
        if "recall" in self.tables:
            rec = self.tables["recall"]
            cols = list(rec.columns)
            lines += ["", "## Known-relationship recall", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for row in rec.itertuples(index=False):
                lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(
        self, out_dir: str | os.PathLike, *, plots: bool = True, overwrite: bool = False, inputs=()
    ) -> pathlib.Path:
        """Write summary.csv/json, report.md, one CSV per table and PNG plots into `out_dir`, atomically.

        A benchmark report already at `out_dir` is replaced whole only with `overwrite=True`; anything else there
        (or an `out_dir` inside one of `inputs`) is refused with `OutputError`."""
        out_dir = pathlib.Path(out_dir)
        check_output(out_dir, KIND, overwrite=overwrite, inputs=inputs)
        with atomic_path(out_dir, is_dir=True) as tmp:
            self.summary_frame().to_csv(tmp / "summary.csv", index=False)
            (tmp / "summary.json").write_text(
                json.dumps(
                    {
                        ARTEFACT_KEY: KIND,
                        "summary": {k: _jsonable(v) for k, v in self.summary.items()},
                        "notes": self.notes,
                    },
                    indent=1,
                )
            )
            (tmp / "report.md").write_text(self.to_markdown())
            for name, df in self.tables.items():
                df.to_csv(tmp / f"{name}.csv", index=False)
            if plots:
                self.plot_recall(tmp / "recall.png")
                self.plot_similarities(tmp / "similarities.png")
        return out_dir

    def plot_recall(self, path) -> None:
        """Bar chart: recall per annotation source at each threshold pair."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        rec = self.tables.get("recall")
        if rec is not None and len(rec):
            cols = [c for c in rec.columns if c.startswith("recall_")]
            w = 0.8 / len(cols)
            for k, c in enumerate(cols):
                ax.bar(np.arange(len(rec)) + k * w, rec[c], width=w, label=c)
            ax.set_xticks(np.arange(len(rec)) + 0.4 - w / 2, rec.source)
            ax.axhline(0.1, color="grey", ls="--", lw=0.8, label="random map (~0.1)")
            ax.legend(fontsize=7)
        ax.set_ylabel("recall")
        ax.set_title("Known-relationship recall per source")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def plot_similarities(self, path) -> None:
        """Histograms (density) of the cosine-similarity distributions in `distributions`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.linspace(-1, 1, 81)
        for name, vals in self.distributions.items():
            if len(vals):
                ax.hist(vals, bins=bins, density=True, histtype="step", label=f"{name} (n={len(vals)})")
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        ax.set_title("Similarity distributions")
        if self.distributions:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    return v
