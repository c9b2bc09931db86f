"""Phenoprints-style curation of a training set: quality, replicate and control filters, then a calibrated
consistency test (see `curate` for the steps and `stats` for the statistics behind them)."""

from vitally_jax.curation.core import (
    CurationConfig,
    CurationResult,
    check_curation_outputs,
    curate,
    curate_store,
    report_markdown,
    write_curation,
)

__all__ = [
    "CurationConfig",
    "CurationResult",
    "check_curation_outputs",
    "curate",
    "curate_store",
    "report_markdown",
    "write_curation",
]
