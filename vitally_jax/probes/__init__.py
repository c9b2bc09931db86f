"""The block search: linear probes on every block's features, the probe tasks, and the sweep that finds b*.

- `linear`: logistic-regression probes (JAX and scikit-learn backends), balanced accuracy.
- `gene_groups`: functional gene groups from CORUM complexes (the gene-group probe's labels).
- `sweep`: the tasks, `run_sweep`, `best_blocks`, the table / plot writer and `sweep_screen` on a store.
"""

from vitally_jax.probes.gene_groups import functional_gene_groups
from vitally_jax.probes.linear import JaxLogisticProbe, LinearProbe, balanced_accuracy, make_probe
from vitally_jax.probes.sweep import TASKS, best_blocks, run_sweep, sweep_screen, write_sweep

__all__ = [
    "JaxLogisticProbe",
    "LinearProbe",
    "TASKS",
    "balanced_accuracy",
    "best_blocks",
    "functional_gene_groups",
    "make_probe",
    "run_sweep",
    "sweep_screen",
    "write_sweep",
]
