"""One-epoch training, evaluation and BN re-estimation: the small functions the CLI composes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.net import bn_layers


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    predictions: np.ndarray  # (N,) int64


def batches(
    n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """Index batches over range(n); shuffle=True draws a fresh permutation from `generator`."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    yield from order.split(batch_size)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Mixed precision on CUDA (bf16 where supported, else fp16), full precision elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator, fill: float) -> torch.Tensor:
    """Translate each image of (N, 1, H, W) by up to ±max_shift pixels, filling with the background value."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=fill)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (N, H)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (N, W)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return pad[idx, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train_one_epoch(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    generator: torch.Generator,
    max_shift: int,
    fill: float,
    label_smoothing: float,
    scaler: torch.amp.GradScaler | None,
    desc: str,
) -> float:
    """One pass over (x, y) with shuffling and augmentation; returns the mean training loss."""
    net.train()
    device = next(net.parameters()).device
    total, seen = 0.0, 0
    bar = tqdm(list(batches(len(x), batch_size, shuffle=True, generator=generator)), desc=desc, mininterval=1.0)
    for idx in bar:
        xb = random_shift(x[idx], max_shift, generator, fill).to(device, non_blocking=True)
        xb = xb.contiguous(memory_format=torch.channels_last)
        yb = y[idx].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = F.cross_entropy(net(xb), yb, label_smoothing=label_smoothing)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
    return total / max(seen, 1)


@torch.inference_mode()
def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000) -> EvalResult:
    """Loss, accuracy and predictions of the network in eval mode (BN uses its running statistics)."""
    net.eval()
    device = next(net.parameters()).device
    losses, preds = [], []
    for idx in batches(len(x), batch_size, shuffle=False):
        xb = x[idx].to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits = net(xb).float()
        losses.append(F.cross_entropy(logits, y[idx].to(device), reduction="sum").item())
        preds.append(logits.argmax(1).cpu())
    pred = torch.cat(preds).numpy()
    return EvalResult(loss=sum(losses) / len(x), accuracy=float((pred == y.numpy()).mean()), predictions=pred)


@torch.no_grad()
def reestimate_bn(net: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> None:
    """Recompute every BN layer's running statistics with the final weights, as a cumulative average.

    With momentum=None, PyTorch averages the batch statistics equally over the pass, so the references describe
    the network that is actually served rather than an exponential average over earlier weights.
    """
    layers = bn_layers(net)
    momenta = {name: bn.momentum for name, bn in layers.items()}
    for bn in layers.values():
        bn.reset_running_stats()
        bn.momentum = None
    net.train()
    for module in net.modules():  # dropout must not perturb what the BN layers see
        if isinstance(module, nn.Dropout):
            module.eval()
    device = next(net.parameters()).device
    for idx in batches(len(x), batch_size, shuffle=False):
        net(x[idx].to(device).contiguous(memory_format=torch.channels_last))
    for name, bn in layers.items():
        bn.momentum = momenta[name]
    net.eval()
