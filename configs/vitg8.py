"""MAE-G/8 (Phenom-2, 1.84B-parameter encoder): the paper's recipe.

Launch on a TPU pod / GPU cluster (one process per host)::

    python -m vitally_jax.main --config=configs/vitg8.py --workdir=gs://bucket/g8 \
        --config.input.store=/data/phenoprints --config.input.index=/data/curated.parquet

CPU smoke run in minutes: `--config=configs/vitg8.py:runlocal`.
Recipe: Lion b=(0.9, 0.95), wd 0.05, peak lr 3e-5, one-cycle cosine (10% warm-up), global batch 8,192,
stochastic depth 0.6, mask 0.75, Fourier weight 0.01, 500 epochs (~8B crops = ~977k steps).
Expected: the paper's MAE-G/8 (256 x H100, ~48k GPU-hours). Memory plan: `python tools/perf/aot_memory.py`.
"""

from vitally_jax import config_lib


def get_config(arg=None):
    return config_lib.build(
        dict(
            variant="G/8",
            total_steps=977_000,
            global_batch=8192,
            peak_lr=3e-5,
            drop_path_rate=0.6,
            mesh=(1, -1, 1),
            peak_flops=None,
        ),
        arg,
    )
