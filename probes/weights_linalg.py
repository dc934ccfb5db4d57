"""Linear algebra on weight updates that are dense (m, n) or low-rank (B, A) with dW = B @ A.

The weight probes (probes/weights.py) never need a low-rank update as a dense matrix: inner
products, norms, one-sided products and the thin SVD all have exact factor forms that cost
O((m + n) r^2) instead of O(m n r).

Offers
    Update                 a dense tensor or a (B, A) pair, cast to one device and dtype
    as_update(x, ...)      that cast (numpy arrays and [B, A] lists accepted, as in models.delta)
    shape(x), dense(x)
    inner(x, y)            Frobenius inner product <X, Y> = tr(X^T Y)
    norm(x)                ||X||_F
    right(x, Q)            X @ Q      (m, k)
    left(P, x)             P^T @ X    (k, n)
    thin_svd(x)            U, S, Vh with X = U diag(S) Vh, S descending
    numerical_rank(S, rtol)
    row_basis(K, rtol)     orthonormal basis (n, k) of the span of the rows of K (k', n)
    BasisCache             row_basis once per key tensor shared by many sites (UCE's c_e)
    principal_angles(Q1, Q2)  angles between two column spaces, in radians, descending
                           (Bjorck & Golub 1973; the same convention as scipy.linalg.subspace_angles)

All functions are pure and run on whatever device their inputs live on.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from models.errors import FadelabError

Factors = tuple[Tensor, Tensor]
Update = Union[Tensor, Factors]


def as_update(x: Any, device: torch.device | str | None, dtype: torch.dtype, what: str = "update") -> Update:
    """`x` (tensor, ndarray, or (B, A) pair) as a tensor or factor pair on `device` in `dtype`.

    device None keeps the device of the input. Raises FadelabError for anything else.
    """

    def cast(t: Any) -> Tensor:
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(t)
        if not isinstance(t, Tensor):
            raise FadelabError(f"{what} must be a tensor or a (B, A) pair of tensors, got {type(t).__name__}")
        return t.detach().to(device=t.device if device is None else device, dtype=dtype)

    if isinstance(x, (tuple, list)) and len(x) == 2:
        b, a = cast(x[0]), cast(x[1])
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise FadelabError(
                f"{what}: low-rank factors need B (m, r) and A (r, n); got {tuple(b.shape)} and {tuple(a.shape)}"
            )
        return (b, a)
    t = cast(x)
    if t.ndim != 2:
        raise FadelabError(f"{what} must be a 2-D weight update, got shape {tuple(t.shape)}")
    return t


def shape(x: Update) -> tuple[int, int]:
    """(m, n) of the update."""
    if isinstance(x, tuple):
        return (x[0].shape[0], x[1].shape[1])
    return (x.shape[0], x.shape[1])


def dense(x: Update) -> Tensor:
    """The (m, n) matrix."""
    return x[0] @ x[1] if isinstance(x, tuple) else x


def inner(x: Update, y: Update) -> Tensor:
    """<X, Y>_F = tr(X^T Y), a 0-d tensor.

    Factor forms:  <D, B A> = sum((B^T D) * A);  <B1 A1, B2 A2> = sum((B1^T B2) * (A1 A2^T)).
    """
    if isinstance(x, tuple) and isinstance(y, tuple):
        (b1, a1), (b2, a2) = x, y
        return ((b1.T @ b2) * (a1 @ a2.T)).sum()  # (r1, r2) * (r1, r2)
    if isinstance(x, tuple):
        x, y = y, x
    if isinstance(y, tuple):
        b, a = y
        return ((b.T @ x) * a).sum()  # (r, n) * (r, n)
    return (x * y).sum()


def norm(x: Update) -> Tensor:
    """||X||_F (0-d tensor), without forming B @ A."""
    return inner(x, x).clamp_min(0.0).sqrt()


def right(x: Update, q: Tensor) -> Tensor:
    """X @ Q for Q (n, k): (m, k)."""
    if isinstance(x, tuple):
        return x[0] @ (x[1] @ q)  # (m, r) @ ((r, n) @ (n, k))
    return x @ q


def left(p: Tensor, x: Update) -> Tensor:
    """P^T @ X for P (m, k): (k, n)."""
    if isinstance(x, tuple):
        return (p.T @ x[0]) @ x[1]  # ((k, m) @ (m, r)) @ (r, n)
    return p.T @ x


def thin_svd(x: Update) -> tuple[Tensor, Tensor, Tensor]:
    """X = U diag(S) Vh with U (m, q), S (q,) descending, Vh (q, n).

    Dense: q = min(m, n). Factors (B, A) of rank r: q = r, via B = Q_B R_B, A^T = Q_A R_A,
    B A = Q_B (R_B R_A^T) Q_A^T, and the SVD of the r x r core (the dense SVD's other singular
    values are exactly 0).
    """
    if isinstance(x, tuple):
        b, a = x
        qb, rb = torch.linalg.qr(b)  # (m, r), (r, r)
        qa, ra = torch.linalg.qr(a.T)  # (n, r), (r, r)
        uc, s, vhc = torch.linalg.svd(rb @ ra.T)  # core (r, r)
        return qb @ uc, s, vhc @ qa.T
    return torch.linalg.svd(x, full_matrices=False)


def numerical_rank(s: Tensor, rtol: float) -> int:
    """Number of singular values above rtol * the largest (0 for a zero matrix)."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    return int((s > rtol * s[0]).sum())


def row_basis(k: Tensor, rtol: float) -> Tensor:
    """Orthonormal basis (n, r) of span(rows of K), K (k', n) or (n,); r = numerical rank of K."""
    if k.ndim == 1:
        k = k[None]
    _, s, vh = torch.linalg.svd(k, full_matrices=False)
    return vh[: numerical_rank(s, rtol)].T


class BasisCache:
    """`row_basis` of each distinct key tensor, computed once.

    UCE stores one c_e for all its sites (140 on SDXL), and probing site by site factored it 140
    times: 110 s of the SDXL smoke run's debias x full cell on an H100 (2026-12-06). A key is
    recognised by its storage (data pointer, shape, strides, dtype, device); the cache holds a
    reference to it, so that storage cannot be freed and its address reused by another tensor
    while the cache lives. The basis is computed from K moved to `device` and cast to `dtype`
    (None keeps K's own), on a miss only.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple, tuple[Tensor, Tensor]] = {}

    def __call__(self, k: Tensor, rtol: float, device: Any = None, dtype: torch.dtype | None = None) -> Tensor:
        key = (k.data_ptr(), tuple(k.shape), k.stride(), k.dtype, str(k.device), rtol, str(device), dtype)
        hit = self._seen.get(key)
        if hit is None:
            hit = self._seen[key] = (k, row_basis(k.to(device=device or k.device, dtype=dtype or k.dtype), rtol))
        return hit[1]

    def __len__(self) -> int:
        return len(self._seen)


def principal_angles(q1: Tensor, q2: Tensor) -> Tensor:
    """Principal angles (radians, descending) between the column spaces of Q1 (d, p) and Q2 (d, q).

    Inputs need orthonormal columns. Bjorck & Golub (1973), as scipy.linalg.subspace_angles:
    with M = Q1^T Q2 and sigma its singular values, theta = arccos(sigma) where sigma^2 < 1/2,
    and theta = arcsin(mu) otherwise, mu the singular values of the residual Q2 - Q1 M
    (Q1 - Q2 M^T when Q1 has fewer columns), which keeps small angles accurate.
    Returns min(p, q) angles.
    """
    m = q1.T @ q2  # (p, q)
    sigma = torch.linalg.svdvals(m)  # descending cosines
    resid = q2 - q1 @ m if q1.shape[1] >= q2.shape[1] else q1 - q2 @ m.T
    mu = torch.linalg.svdvals(resid)  # descending sines
    n = min(q1.shape[1], q2.shape[1])
    cos_asc = sigma[:n].flip(0).clamp(-1.0, 1.0)  # ascending cosines = descending angles
    use_sin = sigma[:n].flip(0) ** 2 >= 0.5
    sin = mu[:n].clamp(-1.0, 1.0)
    return torch.where(use_sin, torch.arcsin(sin), torch.arccos(cos_asc))
