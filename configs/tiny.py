"""A tiny MAE for tests and a first look: trains quickly on a synthetic screen on one CPU.

    python -m vitally_jax.main --config=configs/tiny.py --workdir=/tmp/tiny

Same recipe as the paper (Lion, one-cycle cosine, mask 0.75, Fourier 0.01) at toy scale; a larger peak lr
so that the loss visibly falls within a few dozen steps.
"""

from vitally_jax import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg)
    c = config_lib.build(
        dict(
            variant="mu/8",
            total_steps=40,
            global_batch=16,
            peak_lr=3e-3,
            drop_path_rate=0.1,
            mesh=(-1, 1, 1),
            peak_flops=None,
        ),
        "runlocal," + (arg or ""),
    )
    if "steps" not in args:
        c.total_steps = 40
    c.optax.peak_lr = 3e-3
    c.checkpoint.every_steps = 20
    c.log.every_steps = 5
    c.log.recon_every_steps = None
    c.checkpoint.export_encoder = False
    return c
