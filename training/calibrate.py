"""Drift calibration at training time: BN-input moments of clean held-out images, and thresholds from them."""

from __future__ import annotations

import torch
from torch import nn

from model.bnstats import BnStatsRecorder, Moments
from training.loop import batches


@torch.inference_mode()
def collect_moments(net: nn.Module, x: torch.Tensor, *, batch_size: int = 1000) -> dict[str, Moments]:
    """Per-image moments of every BN layer's input for the (already normalised) images x, in eval mode."""
    net.eval()
    recorder = BnStatsRecorder(net)
    device = next(net.parameters()).device
    parts: dict[str, list[Moments]] = {name: [] for name in recorder.references}
    for idx in batches(len(x), batch_size, shuffle=False):
        with recorder.capture() as captured:
            net(x[idx].to(device))
        for name, m in captured.items():
            parts[name].append(m)
    return {name: Moments.concat(p) for name, p in parts.items()}
