"""Linear probes: standardised multinomial logistic regression with an L2 penalty.

Two interchangeable backends with one interface, `fit_predict(train_x, train_y, test_x) -> predicted labels`:

- `JaxLogisticProbe`: every block fitted at once (`jax.vmap` over the block axis of a jitted L-BFGS solve).
- `SklearnLogisticProbe`: scikit-learn's `StandardScaler` + `LogisticRegression` (lbfgs), one block at a time.

Both minimise the same objective as scikit-learn,

    C * sum_i CE(softmax(x_i W + b), y_i) + 0.5 * ||W||^2      (intercept not penalised)

which is solved in the equivalent per-sample form `mean_i CE + ||W||^2 / (2 C n)`. Features are standardised
with the training split's mean and standard deviation (a constant feature keeps scale 1, as in scikit-learn).
Probe quality is measured by balanced accuracy (mean per-class recall over the classes present in the truth).
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitally_jax.errors import DataError


class LinearProbe(Protocol):
    """A probe: fit on (train_x, train_y) per block, predict labels of test_x per block."""

    def fit_predict(self, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray: ...


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in `y_true` (scikit-learn's `balanced_accuracy_score`).

    y_true, y_pred: (n,) labels of any comparable dtype.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise DataError(
            f"balanced_accuracy: expected two equal-length 1-D label arrays, got {y_true.shape} and {y_pred.shape}"
        )
    classes, inverse = np.unique(y_true, return_inverse=True)
    hit = (y_true == y_pred).astype(np.float64)
    recall = np.bincount(inverse, weights=hit, minlength=len(classes)) / np.bincount(inverse, minlength=len(classes))
    return float(recall.mean())


def _encode_labels(train_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes (K,), codes (n,) in [0, K)) for the training labels."""
    train_y = np.asarray(train_y)
    if train_y.ndim != 1:
        raise DataError(f"probe labels: expected a 1-D array, got shape {train_y.shape}")
    classes, codes = np.unique(train_y, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"probe labels: need at least 2 classes in the training split, got {len(classes)}")
    return classes, codes.astype(np.int32)


def _check_blocks(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> None:
    if train_x.ndim != 3 or test_x.ndim != 3:
        raise DataError(
            f"probe features: expected (blocks, samples, features) arrays, got {train_x.shape} and {test_x.shape}"
        )
    if train_x.shape[0] != test_x.shape[0] or train_x.shape[2] != test_x.shape[2]:
        raise DataError(f"probe features: train {train_x.shape} and test {test_x.shape} differ in blocks or features")
    if train_x.shape[1] != len(train_y):
        raise DataError(f"probe labels: {len(train_y)} labels for {train_x.shape[1]} training samples")


# ----------------------------------------------------------------------------------------------------------------
# JAX backend
# ----------------------------------------------------------------------------------------------------------------


def standardize(train_x: jax.Array, test_x: jax.Array, weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Scale features by the training split's statistics. train_x (n, d), test_x (m, d), weight (n,) 0/1 rows."""
    w = jnp.ones(train_x.shape[:1], train_x.dtype) if weight is None else weight.astype(train_x.dtype)
    n = jnp.sum(w)
    mean = w @ train_x / n
    std = jnp.sqrt(w @ jnp.square(train_x - mean) / n)
    std = jnp.where(std > 1e-6 * (1.0 + jnp.abs(mean)), std, 1.0)
    return (train_x - mean) / std, (test_x - mean) / std


def fit_logistic(
    x: jax.Array,
    y: jax.Array,
    num_classes: int,
    *,
    weight: jax.Array | None = None,
    class_mask: jax.Array | None = None,
    C: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-4,
) -> tuple[jax.Array, jax.Array]:
    """Multinomial logistic regression by L-BFGS. x (n, d) float32, y (n,) int32 -> (W (d, K), b (K,)).

    weight (n,): 1 for real rows, 0 for padding; class_mask (K,): False for padded classes (never predicted).
    Stops when the largest gradient entry is below `tol` or after `max_iter` iterations.
    """
    d = x.shape[1]
    w_rows = jnp.ones(x.shape[:1], x.dtype) if weight is None else weight.astype(x.dtype)
    n = jnp.sum(w_rows)
    onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype) * w_rows[:, None]
    mask = jnp.ones((num_classes,), bool) if class_mask is None else class_mask
    lam = 1.0 / (C * n)

    def loss(params):
        w, b = params
        logits = jnp.where(mask, x @ w + b, -1e30)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.where(onehot > 0, onehot * logp, 0.0)) / n + 0.5 * lam * jnp.sum(w * w)

    opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=30, store_grad=True))
    value_and_grad = optax.value_and_grad_from_state(loss)
    params0 = (jnp.zeros((d, num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))

    def grad_max(grad):
        return jnp.maximum(jnp.max(jnp.abs(grad[0])), jnp.max(jnp.abs(grad[1])))

    def cond(carry):
        _, _, it, gmax, stalled = carry
        return (it < max_iter) & (gmax > tol) & ~stalled

    def body(carry):
        params, state, it, _, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        new_params = optax.apply_updates(params, updates)
        # float32 round-off: once the line search cannot decrease the loss any more, stop
        stalled = (it > 0) & ~(optax.tree.get(state, "value") < value)
        return new_params, state, it + 1, grad_max(grad), stalled

    carry = (params0, opt.init(params0), jnp.int32(0), jnp.asarray(jnp.inf, x.dtype), jnp.asarray(False))
    params, _, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return params


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit_predict_blocks(train_x, train_y, train_w, class_mask, test_x, *, num_classes, C, max_iter, tol):
    """train_x (nb, n, d), train_y (n,), train_w (n,), class_mask (K,), test_x (nb, m, d) -> codes (nb, m)."""

    def one(tr, te):
        tr, te = standardize(tr, te, train_w)
        w, b = fit_logistic(
            tr, train_y, num_classes, weight=train_w, class_mask=class_mask, C=C, max_iter=max_iter, tol=tol
        )
        return jnp.argmax(jnp.where(class_mask, te @ w + b, -jnp.inf), axis=-1)

    return jax.vmap(one)(train_x, test_x)


def _bucket(n: int, smallest: int) -> int:
    """Next size in the sequence smallest * 2^(k/2) (rounded up to a multiple of 8), so shapes repeat."""
    size = smallest
    while size < n:
        size = int(math.ceil(size * math.sqrt(2) / 8) * 8)
    return size


def _pad_rows(x: np.ndarray, rows: int, axis: int) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rows - x.shape[axis])
    return np.pad(x, pad)


class JaxLogisticProbe:
    """Standardise + multinomial logistic regression, all blocks in one jitted, vmapped solve.

    Sample and class counts are padded up to a few fixed sizes (at least 256 rows and 64 classes, then steps of
    about sqrt(2); padded rows carry weight 0, padded classes are masked), so that folds and tasks of similar size
    share one traced and compiled program.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 500, tol: float = 1e-4):
        self.C, self.max_iter, self.tol = float(C), int(max_iter), float(tol)

    def fit_predict(self, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
        """train_x (nb, n, d), train_y (n,), test_x (nb, m, d) -> predicted labels (nb, m)."""
        train_x = np.asarray(train_x, np.float32)
        test_x = np.asarray(test_x, np.float32)
        _check_blocks(train_x, train_y, test_x)
        classes, codes = _encode_labels(train_y)
        n, m, k = train_x.shape[1], test_x.shape[1], len(classes)
        n_pad, m_pad, k_pad = _bucket(n, 256), _bucket(m, 256), _bucket(k, 64)
        weight = (np.arange(n_pad) < n).astype(np.float32)
        pred = _fit_predict_blocks(
            jnp.asarray(_pad_rows(train_x, n_pad, 1)),
            jnp.asarray(_pad_rows(codes, n_pad, 0)),
            jnp.asarray(weight),
            jnp.asarray(np.arange(k_pad) < k),
            jnp.asarray(_pad_rows(test_x, m_pad, 1)),
            num_classes=k_pad,
            C=self.C,
            max_iter=self.max_iter,
            tol=self.tol,
        )
        return classes[np.asarray(pred)[:, :m]]


# ----------------------------------------------------------------------------------------------------------------
# scikit-learn backend
# ----------------------------------------------------------------------------------------------------------------


class SklearnLogisticProbe:
    """scikit-learn `StandardScaler` + `LogisticRegression(C, lbfgs)`, one block at a time."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4):
        self.C, self.max_iter, self.tol = float(C), int(max_iter), float(tol)

    def fit_predict(self, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
        """train_x (nb, n, d), train_y (n,), test_x (nb, m, d) -> predicted labels (nb, m)."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        train_x = np.asarray(train_x, np.float64)
        test_x = np.asarray(test_x, np.float64)
        _check_blocks(train_x, train_y, test_x)
        classes, codes = _encode_labels(train_y)
        out = np.empty((train_x.shape[0], test_x.shape[1]), dtype=np.int64)
        for i in range(train_x.shape[0]):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(train_x[i], codes)
            out[i] = model.predict(test_x[i])
        return classes[out]


def make_probe(backend: str = "jax", **kwargs) -> LinearProbe:
    """A probe by name: 'jax' (default) or 'sklearn'."""
    if backend == "jax":
        return JaxLogisticProbe(**kwargs)
    if backend == "sklearn":
        return SklearnLogisticProbe(**kwargs)
    from vitally_jax.errors import ConfigError

    raise ConfigError(f"probe backend: expected 'jax' or 'sklearn', got {backend!r}")


def probe_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    probe: LinearProbe | None = None,
) -> np.ndarray:
    """Balanced accuracy per block of a probe fitted on train and scored on test. -> (nb,) float64."""
    probe = probe or JaxLogisticProbe()
    pred = probe.fit_predict(train_x, train_y, test_x)
    return np.array([balanced_accuracy(test_y, p) for p in pred])
