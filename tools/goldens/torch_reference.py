"""PyTorch reference MAE train step for side-by-side benchmarks (runs ONLY in the torch venv).

The encoder is timm 0.9.7's VisionTransformer with ParallelScalingBlock (Recursion's settings), the decoder is the
standard MAE decoder of timm Blocks, and the loss is masked MSE + 0.01 x the "reference" Fourier L1, all built by
`tools/goldens/make_goldens.py` (which also installs the torchvision import placeholder timm 0.9.7 needs). The
optimiser is Lion (b1 0.9, b2 0.95, wd 0.05), the paper's, written here with torch foreach ops.

Worker protocol (used by `tools/perf/bench_train.py`, one process kept alive so rounds can interleave with JAX):

    /work/goldens-venv/bin/python tools/goldens/torch_reference.py --worker '{"variant": "S/16", "batch": 32, ...}'
    stdin:  "eager 2" | "compile 2" | "forward 2" | "forward_compile 2" | "embed_last 2" | "embed_all 2" | "quit"
    stdout: one JSON line per command
    (eager / compile: train steps; forward / forward_compile: the encoder's inference forward, CLS + mean pooling;
    embed_last / embed_all: a whole-screen embedding job, see `make_embed`)

`--check` prints versions and whether torch.compile works on this CPU. `--kernels '{"rows": 520, "width": 512,
"hidden": 2048, "tokens": 65, "heads": 16, "repeats": 20}'` prints the median milliseconds of the decoder block's
kernels (GELU, LayerNorm, softmax, attention fused (SDPA) and unfused, the batched QK^T matmul, the MLP's three
GEMMs) and of a 2048^3 matmul, at 1 and 2 threads (see `tools/perf/profile_train_step.py`). `--gemms '{"gemms":
[{"b": 1, "m": 520, "k": 512, "n": 2048}, ...], "repeats": 10, "threads": 2}'` prints the median milliseconds of
each (B, M, K) x (B, K, N) float32 torch.matmul (see `tools/perf/gemm_bound.py`).
"""

from __future__ import annotations

import json
import sys
import time

import make_goldens as mg  # noqa: I001  (first: registers the torchvision placeholder, imports timm and torch)
import torch

WIDTHS = {"mu": (64, 3, 2), "Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}


def geometry(spec: dict) -> dict:
    """Benchmark spec {variant 'S/16', img, chans, mask_ratio, dec_width, dec_depth, dec_heads} -> make_goldens geom."""
    size, patch = spec["variant"].split("/")
    width, depth, heads = WIDTHS[size]
    return dict(
        img=spec.get("img", 256),
        patch=int(patch),
        chans=spec.get("chans", 6),
        width=width,
        depth=spec.get("depth", depth),
        heads=heads,
        mlp_ratio=4,
        dec_width=spec.get("dec_width", 512),
        dec_depth=spec.get("dec_depth", 8),
        dec_heads=spec.get("dec_heads", 16),
        mask_ratio=spec.get("mask_ratio", 0.75),
        fourier_weight=0.01,
    )


def mae_loss(mae, x, noise, geom):
    """Masked-MSE + Fourier loss of the standard MAE. x: (B, C, H, W) standardised; noise: (B, L)."""
    vit = mae.encoder.vit_backbone
    t = mg.encoder_tokens(vit, x, False)
    kept, mask, restore = mg.random_masking(t[:, 1:], geom["mask_ratio"], noise)
    t = vit.blocks(vit.norm_pre(torch.cat([t[:, :1], kept], dim=1)))
    y = mae.encoder_decoder_proj(vit.norm(t))
    n_mask = restore.shape[1] + 1 - y.shape[1]
    body = torch.cat([y[:, 1:], mae.decoder.mask_token.expand(y.shape[0], n_mask, -1)], dim=1)
    body = torch.gather(body, 1, restore[..., None].expand(-1, -1, y.shape[2]))
    pred = mae.decoder_pred(mae.decoder(torch.cat([y[:, :1], body], dim=1)))[:, 1:]
    target = mg.patchify(x, geom["patch"])
    rec = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    b, n, k = pred.shape
    s = int(n**0.5)
    ft = (torch.fft.fft2(pred.reshape(b, k, s, s)).abs() - torch.fft.fft2(target.reshape(b, k, s, s)).abs()).abs()
    w = geom["fourier_weight"]
    return (1 - w) * rec + w * ft.mean()


class Lion:
    """Lion: u = sign(b1 m + (1-b1) g); p <- p (1 - lr wd) - lr u; m <- b2 m + (1-b2) g."""

    def __init__(self, params, lr=1e-4, b1=0.9, b2=0.95, wd=0.05):
        self.params = [p for p in params if p.requires_grad]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.lr, self.b1, self.b2, self.wd = lr, b1, b2, wd

    @torch.no_grad()
    def step(self):
        grads = [p.grad for p in self.params]
        u = torch._foreach_mul(self.m, self.b1)
        torch._foreach_add_(u, grads, alpha=1 - self.b1)
        u = [t.sign_() for t in u]
        torch._foreach_mul_(self.params, 1 - self.lr * self.wd)
        torch._foreach_add_(self.params, u, alpha=-self.lr)
        torch._foreach_mul_(self.m, self.b2)
        torch._foreach_add_(self.m, grads, alpha=1 - self.b2)
        for p in self.params:
            p.grad = None


def make_step(spec: dict, compiled: bool):
    """-> (step(), images uint8): one full train step (standardise, MAE loss, backward, Lion update)."""
    geom = geometry(spec)
    torch.manual_seed(0)
    mae = mg.build(False, geom).train()
    opt = Lion(mae.parameters())
    b, c, img = spec.get("batch", 32), geom["chans"], geom["img"]
    images = torch.randint(0, 256, (b, c, img, img), dtype=torch.uint8)
    n_tok = (img // geom["patch"]) ** 2

    def loss_fn(imgs, noise):
        return mae_loss(mae, mg.self_standardize(imgs), noise, geom)

    fn = torch.compile(loss_fn) if compiled else loss_fn
    gen = torch.Generator().manual_seed(1)

    def step():
        loss = fn(images, torch.rand(b, n_tok, generator=gen))
        loss.backward()
        opt.step()
        return float(loss)

    return step, mae, images


def make_forward(spec: dict, compiled: bool = False):
    """-> (forward(), model, images): the reference encoder's inference forward (self-standardise, blocks, final
    norm, CLS and mean of patch tokens), no gradients; what an every-block extractor is compared against."""
    geom = geometry(spec)
    torch.manual_seed(0)
    vit = mg.build(False, geom).eval().encoder.vit_backbone
    b, c, img = spec.get("batch", 32), geom["chans"], geom["img"]
    images = torch.randint(0, 256, (b, c, img, img), dtype=torch.uint8)

    def embed(imgs):
        t = vit.norm(vit.blocks(vit.norm_pre(mg.encoder_tokens(vit, mg.self_standardize(imgs), False))))
        return t[:, 0], t[:, 1:].mean(1)

    fn = torch.compile(embed) if compiled else embed

    def forward():
        with torch.inference_mode():
            cls, mean = fn(images)
        return float(cls[0, 0] + mean[0, 0])

    return forward, vit, images


class _Tiles(torch.utils.data.Dataset):
    """Every non-overlapping crop x crop tile of every image of an (N, H, W, C) uint8 .npy file (memory-mapped),
    as (C, crop, crop) uint8 tensors, image by image, row-major."""

    def __init__(self, path: str, crop: int):
        import numpy as np

        self.images = np.load(path, mmap_mode="r")
        n, h, w, _ = self.images.shape
        self.crop, self.ty, self.tx = crop, h // crop, w // crop
        self.n = n * self.ty * self.tx

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import numpy as np

        img, t = divmod(i, self.ty * self.tx)
        y, x = divmod(t, self.tx)
        c = self.crop
        tile = np.ascontiguousarray(self.images[img, y * c : (y + 1) * c, x * c : (x + 1) * c].transpose(2, 0, 1))
        return torch.from_numpy(tile), img


def make_embed(spec: dict, every_block: bool):
    """-> (job(), model, None): the way OpenPhenom's example notebook embeds a screen: a torch DataLoader over the
    screen's tiles (spec["embed"]: {"npy": images file, "wells": well index per image, "crop", "batch", "out"}),
    the timm encoder under inference_mode, per-well mean of the embeddings (CLS after the final norm and the mean
    of the normed patch tokens), written with numpy. every_block=False: the final block only (one forward);
    True: the same two poolings after every block (the final norm applied to each block's tokens)."""
    import numpy as np

    e = spec["embed"]
    geom = geometry(spec)
    torch.manual_seed(0)
    vit = mg.build(False, geom).eval().encoder.vit_backbone
    wells = torch.as_tensor(np.asarray(e["wells"], dtype=np.int64))
    n_wells = int(wells.max()) + 1
    loader = torch.utils.data.DataLoader(_Tiles(e["npy"], e["crop"]), batch_size=e["batch"], shuffle=False)
    nb = len(vit.blocks) if every_block else 1

    def job():
        sums = torch.zeros(2, nb, n_wells, geom["width"], dtype=torch.float64)
        counts = torch.zeros(n_wells, dtype=torch.float64)
        with torch.inference_mode():
            for tiles, img in loader:
                t = vit.norm_pre(mg.encoder_tokens(vit, mg.self_standardize(tiles), False))
                w = wells[img]
                if every_block:
                    for b, blk in enumerate(vit.blocks):
                        t = blk(t)
                        n = vit.norm(t)
                        sums[0, b].index_add_(0, w, n[:, 0].double())
                        sums[1, b].index_add_(0, w, n[:, 1:].mean(1).double())
                else:
                    n = vit.norm(vit.blocks(t))
                    sums[0, 0].index_add_(0, w, n[:, 0].double())
                    sums[1, 0].index_add_(0, w, n[:, 1:].mean(1).double())
                counts.index_add_(0, w, torch.ones_like(w, dtype=torch.float64))
        np.save(e["out"], (sums / counts[None, None, :, None]).float().numpy())
        return len(loader.dataset)

    return job, vit, None


def worker(spec: dict) -> None:
    torch.set_num_threads(int(spec.get("threads", 2)))
    steps = {}
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "quit":
            break
        n = int(rest[0]) if rest else 1
        try:
            if cmd not in steps:
                t0 = time.perf_counter()
                if cmd in ("forward", "forward_compile"):
                    steps[cmd] = make_forward(spec, compiled=(cmd == "forward_compile"))
                elif cmd in ("embed_last", "embed_all"):
                    steps[cmd] = make_embed(spec, every_block=(cmd == "embed_all"))
                else:
                    steps[cmd] = make_step(spec, compiled=(cmd == "compile"))
                steps[cmd][0]()  # warm-up (and compilation)
                warm = time.perf_counter() - t0
            else:
                warm = 0.0
            times = []
            for _ in range(n):
                t = time.perf_counter()
                steps[cmd][0]()
                times.append(time.perf_counter() - t)
            print(json.dumps({"cmd": cmd, "times": times, "warmup_s": warm}), flush=True)
        except Exception as e:  # reported to the parent, which records "not available"
            print(json.dumps({"cmd": cmd, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}), flush=True)


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def kernel_cases(spec: dict) -> dict:
    """name -> zero-argument callable; the same cases, at the same shapes, as profile_train_step.jax_kernel_cases."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    hid = torch.randn(spec["rows"], spec["hidden"], generator=g)
    act = torch.randn(spec["rows"], spec["width"], generator=g)
    scores = torch.randn(spec["rows"] // spec["tokens"] * spec["heads"] * spec["tokens"], spec["tokens"], generator=g)
    a = torch.randn(2048, 2048, generator=g)
    hid_g = hid.clone().requires_grad_()

    def gelu_fwd_bwd():
        hid_g.grad = None
        F.gelu(hid_g).sum().backward()

    b, t, n = spec["rows"] // spec["tokens"], spec["tokens"], spec["heads"]
    hd = spec["width"] // n
    qkv = [torch.randn(b, n, t, hd, generator=g).requires_grad_() for _ in range(3)]
    qb = torch.randn(b * n, t, hd, generator=g)
    w1 = torch.randn(spec["hidden"], spec["width"], generator=g)  # nn.Linear layout (out, in)

    def attn_fwd_bwd(fn):
        def run():
            for x in qkv:
                x.grad = None
            fn(*qkv).sum().backward()

        return run

    def unfused(q, k, v):
        return ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v

    return {
        "gelu": lambda: F.gelu(hid),
        "gelu_fwd_bwd": gelu_fwd_bwd,
        "layer_norm": lambda: F.layer_norm(act, (spec["width"],), eps=1e-6),
        "softmax": lambda: scores.softmax(-1),
        "attention_fwd_bwd": attn_fwd_bwd(F.scaled_dot_product_attention),
        "attention_unfused_fwd_bwd": attn_fwd_bwd(unfused),
        "batched_qk": lambda: qb @ qb.transpose(1, 2),
        "mlp_gemms": lambda: (F.linear(act, w1), hid @ w1, hid.t() @ act),
        "matmul_2048": lambda: a @ a,
    }


def kernels(spec: dict) -> dict:
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            cases = kernel_cases(spec)
        out[str(threads)] = {k: _median_ms(fn, spec.get("repeats", 20)) for k, fn in cases.items()}
    return out


def gemms(spec: dict) -> dict:
    """{"ms": [median ms of torch.matmul (B, M, K) x (B, K, N) (2-D when B = 1) for each of spec["gemms"]]}."""
    torch.set_num_threads(int(spec.get("threads", 2)))
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for c in spec["gemms"]:
            lead = (c["b"],) if c["b"] > 1 else ()
            a = torch.randn(*lead, c["m"], c["k"], generator=g)
            b = torch.randn(*lead, c["k"], c["n"], generator=g)
            _median_ms(lambda a=a, b=b: torch.matmul(a, b), 1)
            out.append(_median_ms(lambda a=a, b=b: torch.matmul(a, b), spec.get("repeats", 10)))
    return {"ms": out}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--gemms":
        print(json.dumps(gemms(json.loads(argv[1]))))
        return 0
    if argv and argv[0] == "--kernels":
        print(json.dumps(kernels(json.loads(argv[1]))))
        return 0
    if argv and argv[0] == "--worker":
        worker(json.loads(argv[1]))
        return 0
    import timm

    print(json.dumps({"torch": torch.__version__, "timm": timm.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
