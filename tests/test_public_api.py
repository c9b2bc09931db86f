"""The public names: every name in each package's `__all__` resolves, and docs/api.md lists every one."""

import importlib
import importlib.util
import pathlib
import re

import pytest

PACKAGES = ("vitally_jax", "vitally_jax.models", "vitally_jax.data", "vitally_jax.interop", "vitally_jax.benchmarks")
API_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _documented() -> dict[str, set[str]]:
    """{package: names listed as "- `name`: ..." under its "## `package`" heading} of docs/api.md."""
    out: dict[str, set[str]] = {}
    current = None
    for line in API_DOC.read_text().splitlines():
        if m := re.match(r"## `([\w.]+)`", line):
            current = out.setdefault(m.group(1), set())
        elif current is not None and (m := re.match(r"- `(\w+)`:", line)):
            current.add(m.group(1))
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package):
    mod = importlib.import_module(package)
    names = list(mod.__all__)
    assert names and len(names) == len(set(names))
    missing = [n for n in names if getattr(mod, n, None) is None]
    assert missing == []


@pytest.mark.parametrize("package", PACKAGES)
def test_api_doc_lists_every_public_name(package):
    mod = importlib.import_module(package)
    documented = _documented().get(package, set())
    assert sorted(set(mod.__all__) - documented) == []
    assert sorted(documented - set(mod.__all__)) == []  # nothing stale either


def test_star_imports():
    ns: dict = {}
    exec("from vitally_jax.models import *", ns)
    assert {"ViTEncoder", "vit_config", "MAE", "mae_config", "Dinov2", "dinov2_config", "POOLINGS"} <= set(ns)
    ns = {}
    exec("from vitally_jax.interop import *", ns)
    assert {"export_timm_vit", "export_openphenom", "export_dinov2", "load_timm_vit"} <= set(ns)


def test_poolings_are_the_encoder_readouts():
    import jax.numpy as jnp
    from flax import nnx

    from vitally_jax.models import POOLINGS, ViTEncoder, vit_config

    enc = ViTEncoder(vit_config("mu/8", img_size=16, in_chans=2), rngs=nnx.Rngs(0))
    out = enc(jnp.zeros((1, 16, 16, 2), jnp.float32))
    assert tuple(sorted(out["blocks"])) == tuple(sorted(POOLINGS))
    assert out["blocks"]["mean"].shape == (1, enc.cfg.depth, enc.cfg.width)


def test_moved_weight_format_functions_live_with_their_format():
    from vitally_jax import interop
    from vitally_jax.interop import dinov2, openphenom, timm_vit

    homes = {
        "export_timm_vit": timm_vit,
        "encoder_to_timm": timm_vit,
        "load_encoder_weights": timm_vit,
        "export_openphenom": openphenom,
        "mae_params_from_openphenom": openphenom,
        "export_dinov2": dinov2,
    }
    for name, home in homes.items():
        assert getattr(interop, name) is getattr(home, name), name
    for package, module in (("models", "convert"), ("interop", "export")):  # one module per format now
        assert importlib.util.find_spec(f"vitally_jax.{package}.{module}") is None
