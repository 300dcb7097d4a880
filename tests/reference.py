"""Plain numpy reference of the BN drift maths (DESIGN.md, "BN drift: definitions"), for tests."""

import numpy as np


def reference_drift(
    x: np.ndarray, mean_r: np.ndarray, var_r: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d, r, KL per channel for raw BN inputs x (N, C) or (N, C, H, W) of one window."""
    x = np.asarray(x, dtype=np.float64)
    per_channel = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)  # (C, N·H·W)
    mu_l = per_channel.mean(axis=1)
    var_l = per_channel.var(axis=1, ddof=1)  # unbiased, like running_var
    d = (mu_l - mean_r) / np.sqrt(var_r + eps)
    r = np.log((var_l + eps) / (var_r + eps))
    kl = 0.5 * (np.exp(r) + d**2 - 1.0 - r)
    return d, r, kl
