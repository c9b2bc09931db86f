"""MAE-L/8 (Phenom-1 architecture) on a curated set: the paper's recipe.

    python -m vitally_jax.main --config=configs/vitl8.py --workdir=DIR --config.input.store=STORE \
        --config.input.index=CURATED.parquet

Recipe: Lion b=(0.9, 0.95), wd 0.05, peak lr 3e-5, one-cycle cosine (10% warm-up), global batch 16,384,
stochastic depth 0.3, mask 0.75, Fourier weight 0.01, 500 epochs of Phenoprints-16M (~488k steps).
CPU smoke run: `--config=configs/vitl8.py:runlocal`.
"""

from vitally_jax import config_lib


def get_config(arg=None):
    return config_lib.build(
        dict(
            variant="L/8",
            total_steps=488_000,
            global_batch=16384,
            peak_lr=3e-5,
            drop_path_rate=0.3,
            mesh=(1, -1, 1),
            peak_flops=None,
        ),
        arg,
    )
