"""Write the tiny `torch.save` files that the weight reader is tested against: tests/goldens/torch_*.

Never run by CI (CI has no torch); the committed files are what `tests/test_weight_reader.py` reads, with the
reader that never imports torch. Run in the goldens environment (tools/goldens/requirements.txt):

    /work/goldens-venv/bin/python tools/goldens/make_goldens_torch_files.py

Writes (a few KB each):
- `torch_zip_state_dict.pt`: `torch.save({"state_dict": sd})` in the default zip format, which is exactly what
  OpenPhenom's `save_pretrained` writes (under the name `model.safetensors`).
- `torch_legacy_state_dict.pt`: the same tensors as `nn.Parameter`s plus an epoch counter,
  `torch.save({"state_dict": sd, "epoch": 7}, _use_new_zipfile_serialization=False)` (the pre-1.6 format).
- `torch_state_dict_expected.npz`: every tensor as numpy (bfloat16 widened to float32), from torch itself.

The state dict covers the dtypes checkpoints use (float32/16/64, bfloat16, int64, bool), tensors that share one
storage (a transposed view and a slice at a non-zero offset) and an empty tensor.
"""

from __future__ import annotations

import argparse
import collections
import pathlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parent.parent.parent / "tests" / "goldens"


def state_dict() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(20251201)
    base = torch.randn(4, 3, generator=g)
    sd = collections.OrderedDict()
    sd["encoder.weight"] = torch.randn(3, 5, generator=g)
    sd["encoder.bias"] = torch.randn(5, generator=g).half()
    sd["encoder.norm.weight"] = (1 + torch.randn(6, generator=g)).to(torch.bfloat16)
    sd["encoder.double"] = torch.randn(2, 2, generator=g, dtype=torch.float64)
    sd["decoder.base"] = base
    sd["decoder.base_t"] = base.t()  # a strided view of the same storage
    sd["decoder.rows"] = base[1:3]  # the same storage at offset 3
    sd["decoder.counts"] = torch.arange(6, dtype=torch.int64).reshape(2, 3) - 2
    sd["decoder.flags"] = torch.tensor([True, False, True])
    sd["decoder.empty"] = torch.zeros(0, 4)
    sd._metadata = collections.OrderedDict({"": {"version": 1}})  # what Module.state_dict() attaches
    return sd


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sd = state_dict()
    torch.save({"state_dict": sd}, args.out / "torch_zip_state_dict.pt")
    params = collections.OrderedDict(
        (k, torch.nn.Parameter(v, requires_grad=v.is_floating_point())) for k, v in sd.items()
    )
    torch.save(
        {"state_dict": params, "epoch": 7},
        args.out / "torch_legacy_state_dict.pt",
        _use_new_zipfile_serialization=False,
    )
    expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()}
    expected["meta/torch"] = np.array(torch.__version__)
    np.savez_compressed(args.out / "torch_state_dict_expected.npz", **expected)
    for name in ("torch_zip_state_dict.pt", "torch_legacy_state_dict.pt", "torch_state_dict_expected.npz"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
