"""Per-device memory of the real MAE train step, from ahead-of-time compilation on a mesh of fake devices.

Lowers and compiles `vitally_jax.train`'s update step (the same builders the trainer uses) against abstract
inputs (ShapeDtypeStructs carrying the real shardings) and prints XLA's per-device memory analysis: arguments
(parameters + optimiser state + batch), outputs, temporaries (activations, gradients), and the total.
Nothing is allocated, so G/8 plans run on a laptop CPU:

    python tools/aot_memory.py                                  # L/8 and G/8, 16 fake devices, fsdp
    python tools/aot_memory.py --models=G/8 --devices=64 --per_device_batch=4 --dtype=bfloat16 --remat=full
    python tools/aot_memory.py --json=plan.json

CPU memory analysis is the XLA:CPU view of the same SPMD program; on TPU/GPU the compiler fuses differently
(temporaries usually smaller), so treat the numbers as an upper-bound plan and confirm on one real host.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = {"L/8": "vitl8", "G/8": "vitg8", "S/16": "vits16", "CA-S/16": "vits16", "tiny": "tiny"}


def load_config(name: str, arg: str = ""):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def accelerator_attention(config) -> None:
    """Plan with the attention an accelerator compiles (one jax.nn.dot_product_attention op): the model's default
    on CPU is the head-grouped variant (`layers.attention`), a CPU-speed choice with its own buffers."""
    if config.model.attention_impl is None:
        config.model.attention_impl = "xla"


def analyse(config, mesh) -> dict:
    """Compile the train step of `config` on `mesh` from abstract inputs; per-device bytes and timings."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vitally_jax import checkpoint as ckpt
    from vitally_jax import sharding, train

    t0 = time.perf_counter()
    mae_cfg = train.model_config(config)
    graphdef, abs_state, state_sh, schedules, _ = train.build_abstract(config, mae_cfg, mesh)
    state = ckpt.abstract_like(abs_state, state_sh)
    c = config.input.crop
    batch = {"image": jax.ShapeDtypeStruct((config.input.global_batch, c, c, mae_cfg.encoder.in_chans), jnp.uint8,
                                           sharding=sharding.batch_sharding(mesh))}
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
    step = train.jit_train_step(train.make_train_step(graphdef, mae_cfg, schedules,
                                                      use_drop_path=mae_cfg.encoder.drop_path_rate > 0),
                                state_sh, mesh)
    with jax.set_mesh(mesh):
        lowered = step.lower(state, batch, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    n_params = sum(int(x.size) for x in jax.tree.leaves(abs_state[0]))
    state_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(abs_state))
    out = {"variant": config.model.variant, "mesh": dict(mesh.shape), "devices": mesh.size,
           "global_batch": config.input.global_batch, "dtype": config.model.dtype, "remat": config.model.remat,
           "params": n_params, "state_bytes_total": state_bytes,
           "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
           "generated_code_bytes": int(m.generated_code_size_in_bytes),
           "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}
    # donated state aliases its output buffers: peak = arguments + outputs - aliased + temporaries
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def _gib(b: int) -> str:
    return f"{b / 2**30:8.2f}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':>8} {'mesh (d,f,m)':>13} {'batch':>6} {'dtype':>9} {'remat':>13} {'params':>9} "
            f"{'args GiB':>9} {'out GiB':>8} {'temp GiB':>9} {'peak GiB':>9} {'compile s':>9}")
    print("per-device memory of one train step (XLA memory analysis)")
    print(head)
    print("-" * len(head))
    for r in rows:
        mesh = ",".join(str(v) for v in r["mesh"].values())
        print(f"{r['variant']:>8} {mesh:>13} {r['global_batch']:>6} {r['dtype']:>9} {r['remat']:>13} "
              f"{r['params'] / 1e6:8.1f}M {_gib(r['argument_bytes']):>9} {_gib(r['output_bytes']):>8} "
              f"{_gib(r['temp_bytes']):>9} {_gib(r['peak_bytes']):>9} {r['compile_s']:>9}")
    for r in rows:
        per_dev_state = r["state_bytes_total"] / r["devices"] / 2**30
        print(f"{r['variant']}: params+optimizer state {r['state_bytes_total'] / 2**30:.2f} GiB in total, "
              f"{per_dev_state:.2f} GiB per device if fully sharded; arguments/ideal = "
              f"{r['argument_bytes'] / max(r['state_bytes_total'] / r['devices'], 1):.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="L/8,G/8", help="comma-separated: L/8, G/8, S/16, tiny")
    p.add_argument("--devices", type=int, default=16, help="number of fake CPU devices in the mesh")
    p.add_argument("--mesh", default="1,-1,1", help="mesh shape over (data, fsdp, model); one -1 allowed")
    p.add_argument("--per_device_batch", type=int, default=2, help="crops per device (global = this x devices)")
    p.add_argument("--dtype", default=None, help="compute dtype override: float32 | bfloat16")
    p.add_argument("--remat", default=None, help="remat override: none | full | dots_saveable")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    sys.path.insert(0, str(ROOT))
    import jax

    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("VITALLY_JAX_COMPILATION_CACHE",
                                     str(pathlib.Path.home() / ".cache" / "vitally_jax" / "jax_cc")))
    from vitally_jax import sharding

    mesh = sharding.make_mesh(tuple(int(v) for v in args.mesh.split(",")))
    rows = []
    for name in args.models.split(","):
        config = load_config(CONFIGS[name.strip()])
        config.input.global_batch = args.per_device_batch * args.devices
        if args.dtype:
            config.model.dtype = args.dtype
        if args.remat:
            config.model.remat = args.remat
        accelerator_attention(config)
        rows.append(analyse(config, mesh))
        print(f"compiled {name}: {rows[-1]['compile_s']} s", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
