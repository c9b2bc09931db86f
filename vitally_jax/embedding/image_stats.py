"""Simple per-channel image statistics: the "image-statistics baseline" representation of a well image.

For every channel (in store order) the features are, on the 0..255 scale:
mean, std, the 10/50/90/99% quantiles (exact, from 256-bin histograms), foreground fraction and foreground mean
(foreground = pixels above q10 + 0.25 (q99 - q10)), gradient energy (mean |dy| + |dx|), Laplacian energy
(mean |4x - 4-neighbours|, fine texture) and coarse texture (std of 4x4 block means). F = 11 * C features,
feature-major within a channel: column c * 11 + k is feature k of channel c (`feature_names` gives the names).
"""

from __future__ import annotations

import numpy as np

from vitally_jax.errors import DataError

FEATURES = (
    "mean",
    "std",
    "q10",
    "q50",
    "q90",
    "q99",
    "fg_fraction",
    "fg_mean",
    "gradient",
    "laplacian",
    "coarse_texture",
)
_CHUNK_PIXELS = 1 << 22  # values per internal chunk


def feature_names(channel_names) -> list[str]:
    """Column names `<channel>_<feature>` in the order of `image_statistics` columns."""
    return [f"{c}_{f}" for c in channel_names for f in FEATURES]


def _stats(x: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, C) -> float32 (B, C, 11). Intensity features come from exact 256-bin histograms
    (quantiles are the lowest value whose cumulative share reaches q); texture features from int16 differences."""
    b, h, w, c = x.shape
    n = h * w
    key = (np.arange(b, dtype=np.int64)[:, None, None, None] * c + np.arange(c)) * 256 + x
    hist = np.bincount(key.ravel(), minlength=b * c * 256).reshape(b, c, 256).astype(np.float64)
    v = np.arange(256, dtype=np.float64)
    mean = hist @ v / n
    std = np.sqrt(np.maximum(hist @ (v * v) / n - mean**2, 0))
    cdf = np.cumsum(hist, axis=-1)
    q = [np.argmax(cdf >= qq * n, axis=-1).astype(np.float64) for qq in (0.1, 0.5, 0.9, 0.99)]
    thr = q[0] + 0.25 * (q[3] - q[0])
    fg = v > thr[..., None]  # (B, C, 256)
    n_fg = (hist * fg).sum(-1)
    fg_frac = n_fg / n
    fg_mean = (hist * fg) @ v / np.maximum(n_fg, 1)
    xi = x.astype(np.int16)
    grad = np.abs(np.diff(xi, axis=1)).mean((1, 2)) + np.abs(np.diff(xi, axis=2)).mean((1, 2))
    lap = np.abs(4 * xi[:, 1:-1, 1:-1] - xi[:, :-2, 1:-1] - xi[:, 2:, 1:-1] - xi[:, 1:-1, :-2] - xi[:, 1:-1, 2:])
    lap = lap.mean((1, 2))
    h4, w4 = h // 4 * 4, w // 4 * 4
    blocks = xi[:, :h4, :w4].reshape(b, h4 // 4, 4, w4 // 4, 4, c).mean((2, 4))
    coarse = blocks.std((1, 2))
    return np.stack([mean, std, *q, fg_frac, fg_mean, grad, lap, coarse], axis=-1)


def image_statistics(images: np.ndarray) -> np.ndarray:
    """uint8 images (B, H, W, C) -> float32 features (B, 11 * C) (see the module docstring)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"image_statistics: expected uint8 (B, H, W, C), got {images.dtype} {images.shape}")
    b, h, w, c = images.shape
    if h < 4 or w < 4:
        raise DataError(f"image_statistics: images of {h}x{w} are too small (need at least 4x4)")
    step = max(1, _CHUNK_PIXELS // (h * w * c))
    out = [_stats(images[i : i + step]) for i in range(0, b, step)]
    return (
        np.concatenate(out).reshape(b, c * len(FEATURES)).astype(np.float32)
        if out
        else np.zeros((0, c * len(FEATURES)), np.float32)
    )


def store_image_statistics(store, batch_size: int = 256) -> np.ndarray:
    """Features float32 (N, 11 * C) of every image of an `ImageStore` (or a store path), in store order."""
    from vitally_jax.data.store import ImageStore

    if not isinstance(store, ImageStore):
        store = ImageStore.open(store)
    n = len(store)
    return np.concatenate(
        [image_statistics(store.read_many(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    )
