"""BatchNorm-statistic drift maths: per-image moments from BN inputs, window statistics and KL scores.

For BN layer ℓ with reference mean μ_r and variance σ²_r (its running buffers), a window of live inputs has
mean μ_l and unbiased variance σ²_l. Per channel:

    d  = (μ_l − μ_r) / sqrt(σ²_r + eps)                 standardised mean shift
    r  = log((σ²_l + eps) / (σ²_r + eps))               log variance ratio
    KL = ½ (e^r + d² − 1 − r) = KL(N(μ_l, σ²_l) ‖ N(μ_r, σ²_r))

and the layer's drift score is the mean KL over channels. Moments are accumulated *centred on μ_r*, in float64:
live data sits near the reference, so Σ(x − μ_r)² does not cancel catastrophically the way Σx² − (Σx)²/n can
when a channel has a large mean and a tiny variance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from torch import nn
from torch.utils.hooks import RemovableHandle

from model.net import bn_layers, folded_affine


@dataclass(frozen=True)
class LayerReference:
    """What "normal" looks like for one BN layer: its running statistics and eps."""

    name: str
    mean: np.ndarray  # (C,) float64
    var: np.ndarray  # (C,) float64
    eps: float

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])


def layer_references(net: nn.Module) -> dict[str, LayerReference]:
    """The reference statistics of every BN layer of a network, in forward order."""
    refs = {}
    for name, bn in bn_layers(net).items():
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"BN layer {name} tracks no running statistics; drift needs them")
        refs[name] = LayerReference(
            name=name,
            mean=bn.running_mean.detach().double().cpu().numpy().copy(),
            var=bn.running_var.detach().double().cpu().numpy().copy(),
            eps=float(bn.eps),
        )
    return refs


@dataclass
class Moments:
    """Per-image moments of one layer's input: Σ(x − μ_r) and Σ(x − μ_r)² per channel, and elements per image."""

    s1: np.ndarray  # (N, C) float64
    s2: np.ndarray  # (N, C) float64
    per_image: int  # elements per channel per image: H·W, or 1 for (N, C) inputs

    @staticmethod
    def concat(parts: list[Moments]) -> Moments:
        return Moments(np.concatenate([p.s1 for p in parts]), np.concatenate([p.s2 for p in parts]), parts[0].per_image)


def per_image_moments(
    x: torch.Tensor, ref_mean: torch.Tensor, scratch: torch.Tensor | None = None, unscale: np.ndarray | None = None
) -> Moments:
    """Moments of a BN input x shaped (N, C) or (N, C, H, W), centred on the reference mean (C,).

    `unscale` (2, 1, C) float64, for a BN layer folded into the layer before it: x is then the layer's output
    y = x'·scale + shift, `ref_mean` where the reference mean lands (μ_r·scale + shift), and unscale holds 1 / scale
    and 1 / scale², which turn y's sums into those of the input x' (one multiply, in float64).

    The per-image reduction runs in the input's float32 (pairwise summation, after centring, so there is no
    cancellation to amplify rounding: relative error ~1e-7, the input's own precision); everything after it,
    window sums included, is float64. That is 3× cheaper than casting the whole activation to float64 and
    keeps the drift hooks a small fraction of the forward pass. `scratch` (from `torch.empty_like` of an input at
    least as large in dim 0) holds the centred copy, so a hook allocates no activation-sized memory per batch. Its
    memory layout must be x's: centring a channels-last activation into an NCHW buffer is a transpose, and cost
    5× more than everything else in the hook.
    """
    if x.dim() not in (2, 4):
        raise ValueError(f"BN input must be (N, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    # Every torch call below releases and retakes the GIL, which another thread may hold (the event loop, when the
    # model runs on a thread of the server): the fewer calls, the less it waits. No conversion or view not needed.
    mean = ref_mean if ref_mean.dtype == x.dtype and ref_mean.device == x.device else ref_mean.to(x.device, x.dtype)
    want = (-1, 1, 1) if x.dim() == 4 else (-1,)  # broadcasts over (N, C, H, W) or (N, C)
    if mean.dim() != len(want):
        mean = mean.reshape(want)
    if x.requires_grad:  # only outside inference mode; detaching is one more torch call
        x = x.detach()
    if scratch is not None and fits_scratch(scratch, x):
        centred = torch.sub(x, mean, out=scratch[: x.shape[0]])
    else:
        centred = x - mean
    if x.dim() == 4:
        s1 = centred.sum((2, 3))
        s2 = centred.mul_(centred).sum((2, 3))  # in place: the centred copy is ours
        per_image = int(x.shape[2] * x.shape[3])
    else:
        s1, s2, per_image = centred, centred.square(), 1
    both = torch.stack((s1, s2)).double()  # one conversion for both sums
    sums = (both if both.device.type == "cpu" else both.cpu()).numpy()
    if unscale is not None:
        sums *= unscale
    return Moments(sums[0], sums[1], per_image)


def fits_scratch(scratch: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `scratch[:len(x)]` can hold a copy of x in x's memory layout."""
    return (
        scratch.shape[1:] == x.shape[1:]
        and scratch.shape[0] >= x.shape[0]
        and scratch.stride()[1:] == x.stride()[1:]
        and scratch.dtype == x.dtype
        and scratch.device == x.device
    )


class BnStatsRecorder:
    """Forward pre-hooks on every BN layer, there only inside `capture`, that record per-image input moments during
    a normal forward pass; a forward pass outside it runs as if there were no recorder.

    One forward pass at a time per recorder (the service runs one forward pass at a time):

    >>> recorder = BnStatsRecorder(net)
    >>> with recorder.capture() as moments:      # moments computed inside the forward pass
    ...     logits = net(x)
    >>> moments["features.0.1"].s1.shape   # (N, C)

    Sums computed elsewhere (service/engine.py computes them in an exported graph, centred on `centre`) become
    moments through `moments_from_sums`.

    Moments are always of the BN layers' inputs x, folded or not: a folded layer's hooks see its output
    y = x·scale + shift, whose moments are mapped back exactly (float rounding aside).
    """

    def __init__(self, net: nn.Module) -> None:
        self.references = layer_references(net)
        bns = bn_layers(net)
        # Where the hooks centre each layer's input: μ_r, or for a layer folded into the one before it
        # (model.net.fold_batchnorm), whose hooks see y = x·scale + shift, where μ_r lands: μ_r·scale + shift. Then
        # y − that = (x − μ_r)·scale, so the sums are divided by scale and scale² (float64, per channel) to give
        # x's. float32, shaped for broadcasting over (N, C, H, W) or (N, C): the hooks run on every batch, so
        # nothing is converted there.
        self._centres: dict[str, torch.Tensor] = {}
        self._unscale: dict[str, np.ndarray] = {}  # folded layers: (1 / scale, 1 / scale²), float64 (2, 1, C)
        for n, r in self.references.items():
            centre = torch.from_numpy(r.mean).float()
            folded = folded_affine(bns[n])
            if folded is not None:
                scale, shift = (t.detach().double().cpu() for t in folded)
                centre = (torch.from_numpy(r.mean) * scale + shift).float()
                self._unscale[n] = np.stack([1.0 / scale.numpy(), 1.0 / scale.numpy() ** 2])[:, None, :]
            self._centres[n] = centre.view((-1, 1, 1) if isinstance(bns[n], nn.BatchNorm2d) else (-1,))
        self._sink: Callable[[str, torch.Tensor], None] | None = None
        self._scratch: dict[str, torch.Tensor] = {}
        self._bns = bns
        self._handles: list[RemovableHandle] = []

    def _hook_for(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self._sink is not None:
                self._sink(name, args[0])

        return hook

    def _moments_of(self, name: str, x: torch.Tensor) -> Moments:
        buf = self._scratch.get(name)
        if buf is None or not fits_scratch(buf, x):  # grows to the largest batch, then stays
            buf = self._scratch[name] = torch.empty_like(x)
        return per_image_moments(x, self._centres[name], buf, self._unscale.get(name))

    def centre(self, name: str) -> torch.Tensor:
        """Where layer `name`'s hooks centre its input (μ_r, or where it lands in a folded layer's output): float32,
        shaped to broadcast over (N, C, H, W) or (N, C)."""
        return self._centres[name]

    def moments_from_sums(self, name: str, s1: np.ndarray, s2: np.ndarray, per_image: int) -> Moments:
        """Moments of layer `name` from per-image sums of (y − centre) and (y − centre)², (N, C) float32, of what its
        hooks see, computed elsewhere (service/engine.py computes them inside the exported graph): the same float64
        conversion and unfolding as `per_image_moments`."""
        sums = np.stack((s1, s2)).astype(np.float64)
        unscale = self._unscale.get(name)
        if unscale is not None:
            sums *= unscale
        return Moments(sums[0], sums[1], per_image)

    @contextmanager
    def capture(self) -> Iterator[dict[str, Moments]]:
        """Record the moments of every BN layer for the forward passes run inside the block."""
        captured: dict[str, Moments] = {}
        with self._sinking(lambda name, x: captured.__setitem__(name, self._moments_of(name, x))):
            yield captured

    @contextmanager
    def _sinking(self, sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """The hooks exist only inside the block: a module with a hook takes PyTorch's slow call path, and the four
        hooks cost a forward pass ~35 µs even when they record nothing (+8 % at batch 1, measured), which a
        server that samples its batches for drift would pay on every batch."""
        self._sink = sink
        self._handles = [bn.register_forward_pre_hook(self._hook_for(name)) for name, bn in self._bns.items()]
        try:
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._sink = None


@dataclass(frozen=True)
class LayerDrift:
    """Drift of one layer's window against its reference; arrays are per channel."""

    d: np.ndarray
    r: np.ndarray
    kl: np.ndarray

    @property
    def score(self) -> float:
        return float(self.kl.mean())

    @property
    def mean_shift_rms(self) -> float:
        return float(np.sqrt(np.mean(self.d**2)))

    @property
    def log_var_ratio_mean_abs(self) -> float:
        return float(np.mean(np.abs(self.r)))

    def top_channels(self, k: int) -> list[dict[str, float | int]]:
        order = np.argsort(-self.kl)[:k]
        return [
            {
                "channel": int(c),
                "kl": float(self.kl[c]),
                "mean_shift": float(self.d[c]),
                "log_var_ratio": float(self.r[c]),
            }
            for c in order
        ]


def drift_from_sums(s1: np.ndarray, s2: np.ndarray, n: np.ndarray | float, ref: LayerReference) -> LayerDrift:
    """Per-channel drift from window sums centred on μ_r; s1, s2 are (..., C) and n the elements per channel.

    Leading dimensions broadcast, so one call scores many windows at once.
    """
    n = np.asarray(n, dtype=np.float64)[..., None] if np.ndim(n) else float(n)
    shift = s1 / n  # μ_l − μ_r
    var_l = np.maximum(s2 - s1 * shift, 0.0) / np.maximum(np.asarray(n) - 1.0, 1.0)  # unbiased, like running_var
    ref_var = ref.var + ref.eps
    d = shift / np.sqrt(ref_var)
    r = np.log((var_l + ref.eps) / ref_var)
    kl = 0.5 * (np.expm1(r) + d**2 - r)  # ½(e^r − 1 − r + d²); expm1 keeps tiny r accurate
    return LayerDrift(d=d, r=r, kl=kl)


def window_sums(per_image: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Σ over each window's images of per-image rows: (N, C) and (K, W) indices → (K, C).

    A sparse (K, N) indicator matrix times the rows: for K = 5000 windows of W = 1024 images this is ~40× faster
    than gathering a (K, W, C) array, and needs no memory beyond the result.
    """
    k, w = windows.shape
    indicator = sparse.csr_matrix(
        (np.ones(k * w), windows.ravel(), np.arange(0, k * w + 1, w)), shape=(k, per_image.shape[0])
    )
    return np.asarray(indicator @ per_image)


def window_scores(
    moments: dict[str, Moments], references: dict[str, LayerReference], windows: np.ndarray
) -> dict[str, np.ndarray]:
    """Drift score of each layer for each window; windows is (K, W) image indices → {layer: (K,) scores}."""
    scores = {}
    for name, m in moments.items():
        n = windows.shape[1] * m.per_image
        drift = drift_from_sums(window_sums(m.s1, windows), window_sums(m.s2, windows), n, references[name])
        scores[name] = drift.kl.mean(axis=-1)
    return scores
