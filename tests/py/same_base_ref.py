"""Independent numpy implementations of the same-base merges (TIES, DARE), written from the
papers' definitions and mudsc's documented conventions (per-tensor trim keeping exactly
floor(density * n) entries, ties broken in index order; DARE's counter-based drop mask), for
tests/python/test_same_base.py to compare mudsc's merged tensors with."""

from __future__ import annotations

import numpy as np

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _fnv1a(name: str) -> int:
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def dare_mask(seed: int, model: int, name: str, n: int, density: float) -> np.ndarray:
    """Which of a tensor's n entries survive DARE's drop (probability density each)."""
    key = _mix_int(((seed * GOLDEN) & M64) ^ _fnv1a(name) ^ _mix_int(model + 1))
    j = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _mix_array(np.uint64(key) + j * np.uint64(GOLDEN))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return u < density


def task_vectors(base: np.ndarray, models: list[np.ndarray]) -> list[np.ndarray]:
    b = base.astype(np.float64)
    return [np.where(m == base, 0.0, m.astype(np.float64) - b) for m in models]


def trim(tau: np.ndarray, density: float) -> np.ndarray:
    flat = tau.ravel()
    k = int(np.floor(density * flat.size))
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    return np.where(keep, flat, 0.0).reshape(tau.shape)


def disjoint_mean(taus: list[np.ndarray], weights: list[float]) -> np.ndarray:
    t = np.stack(taus)
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * taus[0].ndim)
    sign = np.sign((w * t).sum(axis=0))
    agree = (np.sign(t) == sign) & (sign != 0)
    num = (w * t * agree).sum(axis=0)
    den = (w * agree).sum(axis=0)
    return np.where(den != 0, num / np.where(den == 0, 1.0, den), 0.0)


def ties(base, models, weights, density, lam):
    taus = [trim(t, density) for t in task_vectors(base, models)]
    return base.astype(np.float64) + lam * disjoint_mean(taus, weights)


def dare(base, models, weights, density, lam, seed, name, elect):
    taus = []
    for i, t in enumerate(task_vectors(base, models)):
        mask = dare_mask(seed, i, name, t.size, density).reshape(t.shape)
        taus.append(np.where(mask, t / density, 0.0) if density < 1 else t)
    if elect:
        merged = disjoint_mean(taus, weights)
    else:
        merged = sum(w * t for w, t in zip(weights, taus))
    return base.astype(np.float64) + lam * merged
