"""Map building and whole-genome benchmarks (EFAAR_benchmarking 1.0 numerics, copairs mAP), in float64.

Typical use::

    from vitally_jax import benchmarks as B
    aligned = B.align(embeddings, metadata, method="tvn", control_key="EMPTY", batch_col="experiment")
    m = B.aggregate(aligned, metadata, perturbation_col="perturbation", drop=["EMPTY"])
    report = B.benchmark(embeddings, metadata, control_key="EMPTY")
"""

from vitally_jax.benchmarks.aggregate import PerturbationMap, aggregate, aggregate_arrays, aggregate_transformed
from vitally_jax.benchmarks.align import (
    align,
    centerscale,
    centerscale_on_controls,
    pca,
    pca_centerscale,
    pca_fit,
    tvn,
    tvn_transforms,
)
from vitally_jax.benchmarks.annotations import SOURCES, load_clusters, load_relationships
from vitally_jax.benchmarks.cluster import cluster_benchmark
from vitally_jax.benchmarks.compound import compound_gene_activity, compound_gene_scores
from vitally_jax.benchmarks.consistency import signal_consistency
from vitally_jax.benchmarks.cosine import cosine_matrix
from vitally_jax.benchmarks.hierarchical import hierarchical_fdr
from vitally_jax.benchmarks.magnitude import signal_magnitude
from vitally_jax.benchmarks.mapk import (
    average_precisions,
    mean_average_precision,
    phenotypic_activity,
    phenotypic_consistency,
)
from vitally_jax.benchmarks.multilabel import multilabel_average_precisions, multilabel_consistency
from vitally_jax.benchmarks.normalized import expected_average_precision, normalized_average_precision
from vitally_jax.benchmarks.recall import THRESHOLDS, SortedNull, known_relationship_recall
from vitally_jax.benchmarks.replicate import replicate_consistency
from vitally_jax.benchmarks.report import BenchmarkReport
from vitally_jax.benchmarks.suite import benchmark

__all__ = [
    "PerturbationMap",
    "aggregate",
    "aggregate_arrays",
    "aggregate_transformed",
    "tvn_transforms",
    "align",
    "centerscale",
    "centerscale_on_controls",
    "pca",
    "pca_centerscale",
    "pca_fit",
    "tvn",
    "SOURCES",
    "load_clusters",
    "load_relationships",
    "cluster_benchmark",
    "signal_consistency",
    "cosine_matrix",
    "signal_magnitude",
    "THRESHOLDS",
    "SortedNull",
    "known_relationship_recall",
    "compound_gene_activity",
    "compound_gene_scores",
    "average_precisions",
    "mean_average_precision",
    "phenotypic_activity",
    "phenotypic_consistency",
    "hierarchical_fdr",
    "multilabel_average_precisions",
    "multilabel_consistency",
    "expected_average_precision",
    "normalized_average_precision",
    "replicate_consistency",
    "BenchmarkReport",
    "benchmark",
]
