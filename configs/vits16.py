"""Channel-agnostic CA-MAE-S/16 (the OpenPhenom architecture): the paper's recipe.

    python -m vitally_jax.main --config=configs/vits16.py --workdir=DIR --config.input.store=STORE

Recipe: Lion b=(0.9, 0.95), wd 0.05, peak lr 1e-4, one-cycle cosine (10% warm-up), global batch 2,048,
stochastic depth 0.1, mask 0.75 (over all channel x position tokens), Fourier weight 0.01, 100 epochs.
`total_steps` assumes ~10M crops per epoch; set it for your store with `--config.total_steps=N`.
CPU smoke run: `--config=configs/vits16.py:runlocal`.
"""

from vitally_jax import config_lib


def get_config(arg=None):
    return config_lib.build(
        dict(
            variant="CA-S/16",
            local_variant="CA-mu/8",
            total_steps=488_000,
            global_batch=2048,
            peak_lr=1e-4,
            drop_path_rate=0.1,
            mesh=(-1, 1, 1),
            peak_flops=None,
        ),
        arg,
    )
