"""The BatchNorm networks bnserve trains and serves, built from one dataclass config."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

Arch = Literal["bn-cnn", "seed-mlp"]
ARCHS: tuple[Arch, ...] = ("bn-cnn", "seed-mlp")


@dataclass(frozen=True)
class NetConfig:
    """Everything needed to rebuild a network; stored verbatim in the artifact.

    >>> net = build_net(NetConfig(arch="seed-mlp"))
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    arch: Arch = "bn-cnn"
    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    # bn-cnn: output channels of each conv→BN→ReLU stage; every stage but the last ends in a 2×2 max-pool.
    conv_channels: tuple[int, ...] = (32, 64, 64)
    hidden: int = 128  # width of the BN1d head (bn-cnn) or of the hidden layer (seed-mlp: 64)
    dropout: float = 0.1
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.image_size <= 0 or self.in_channels <= 0 or self.num_classes < 2:
            raise ValueError("image_size and in_channels must be > 0 and num_classes >= 2")
        if self.hidden <= 0 or any(c <= 0 for c in self.conv_channels):
            raise ValueError("hidden and conv_channels must be > 0")
        if self.arch == "bn-cnn" and not self.conv_channels:
            raise ValueError("bn-cnn needs at least one conv stage")
        if self.arch == "bn-cnn" and self.image_size % (2 ** (len(self.conv_channels) - 1)):
            raise ValueError("image_size must be divisible by 2**(len(conv_channels) - 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.bn_eps <= 0:
            raise ValueError("bn_eps must be > 0")

    @classmethod
    def seed_mlp(cls) -> NetConfig:
        """The seed document's model: 784→64→BatchNorm1d→ReLU→10."""
        return cls(arch="seed-mlp", conv_channels=(), hidden=64, dropout=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture keys: {sorted(unknown)}")
        kwargs = dict(data)
        if "conv_channels" in kwargs:
            kwargs["conv_channels"] = tuple(kwargs["conv_channels"])
        return cls(**kwargs)


class ConvBlock(nn.Sequential):
    """conv3×3 → BN → ReLU, optionally followed by a 2×2 max-pool."""

    def __init__(self, c_in: int, c_out: int, *, pool: bool, eps: float, momentum: float) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),  # BN supplies the bias
            nn.BatchNorm2d(c_out, eps=eps, momentum=momentum),
            nn.ReLU(inplace=True),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class BnCnn(nn.Module):
    """Conv→BN→ReLU stages, then a BN1d head. With the default config (N, 1, 28, 28) → (N, 10)."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        chans = (cfg.in_channels, *cfg.conv_channels)
        last = len(cfg.conv_channels) - 1
        self.features = nn.Sequential(
            *(
                ConvBlock(c_in, c_out, pool=i < last, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
                for i, (c_in, c_out) in enumerate(itertools.pairwise(chans))
            )
        )  # (N, 32, 14, 14) → (N, 64, 7, 7) → (N, 64, 7, 7) with the defaults
        side = cfg.image_size // 2**last
        self.head = nn.Sequential(
            nn.Flatten(),  # (N, 64·7·7)
            nn.Linear(cfg.conv_channels[-1] * side * side, cfg.hidden, bias=False),
            nn.BatchNorm1d(cfg.hidden, eps=cfg.bn_eps, momentum=cfg.bn_momentum),  # (N, 128)
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),  # (N, 10) logits
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SeedMlp(nn.Module):
    """The seed's MLP: flatten → Linear(784, 64) → BatchNorm1d → ReLU → Linear(64, 10). Returns logits."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),  # (N, 784)
            nn.Linear(cfg.in_channels * cfg.image_size**2, cfg.hidden),
            nn.BatchNorm1d(cfg.hidden, eps=cfg.bn_eps, momentum=cfg.bn_momentum),  # (N, 64)
            nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden, cfg.num_classes),  # (N, 10) logits, no softmax: the loss normalises
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_net(cfg: NetConfig) -> nn.Module:
    """Build the network a config describes, with freshly initialised weights."""
    return BnCnn(cfg) if cfg.arch == "bn-cnn" else SeedMlp(cfg)


def bn_layers(net: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of a network, by its qualified module name, in forward order."""
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


FOLDABLE = (nn.Conv2d, nn.Linear)  # layers whose output channels are dim 0 of their weight, with an optional bias
FOLD_PRECISION = 1e3  # see fold_batchnorm: the most |centre| / (|scale|·σ_r) a folded channel may have


def fold_batchnorm(net: nn.Module) -> None:
    """Fold each eval-mode BN layer into the convolution or linear layer before it, for serving (in place, once).

    In eval mode BN is y = x·scale + shift per channel, with scale = γ/√(σ²_r + eps) and shift = β − μ_r·scale. When
    x is a convolution's output conv(a) = w∗a + b, y is the convolution with weights w·scale and bias b·scale + shift:
    the kernel that runs anyway does BN's work (the served forward pass ~5 % faster on CPU, bench/README.md). Outputs
    differ from BN's own arithmetic by float rounding.

    The BN modules stay, with their buffers, state dict and forward pre-hooks, but a folded layer passes its input
    through, so its pre-hooks see the layer's *output* y; `folded_affine` gives the (scale, shift) that maps it back
    to x (model/bnstats.py does, for the drift statistics). A BN layer runs as one fused multiply-add instead
    (`_FrozenForward`) when it does not directly follow a Conv2d or Linear in an nn.Sequential, or when a channel's
    scale is too small to map its output back precisely: 0, or |β| > FOLD_PRECISION·|scale|·σ_r (mapping back
    multiplies y's float32 rounding, ~1e-7·|β|, by 1 / scale).

    The folded network is for inference only: its weights carry the BN layers, and a folded layer refuses to run
    in training mode.
    """
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq.children())
        for before, bn in zip([None, *children], children, strict=False):
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or isinstance(bn.forward, _Folded | _FrozenForward):
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue  # no running statistics to fold in: BN normalises by the batch, eval or not
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight
                shift = -bn.running_mean * scale
                if bn.bias is not None:
                    shift = shift + bn.bias
                if _foldable(before, bn, scale, shift):
                    assert isinstance(before, FOLDABLE)
                    before.weight.mul_(scale.view(-1, *([1] * (before.weight.dim() - 1))))
                    bias = shift if before.bias is None else before.bias * scale + shift
                    before.bias = nn.Parameter(bias.clone(), requires_grad=False)
                    bn.forward = _Folded(bn, scale, shift)  # type: ignore[method-assign,assignment]
                else:
                    bn.forward = _FrozenForward(bn, scale, shift)  # type: ignore[method-assign,assignment]


def _foldable(
    before: nn.Module | None, bn: nn.modules.batchnorm._BatchNorm, scale: torch.Tensor, shift: torch.Tensor
) -> bool:
    if not isinstance(before, FOLDABLE) or before.weight.shape[0] != bn.num_features:
        return False
    assert bn.running_mean is not None and bn.running_var is not None
    sigma = torch.sqrt(bn.running_var + bn.eps)
    centre = shift + bn.running_mean * scale  # = β: where the reference mean μ_r lands
    return bool(((scale != 0) & (centre.abs() <= FOLD_PRECISION * scale.abs() * sigma)).all())


def folded_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) of a BN layer folded by `fold_batchnorm`: its pre-hooks see y = x·scale + shift. Else None."""
    folded = getattr(bn, "forward", None)
    return (folded.scale, folded.shift) if isinstance(folded, _Folded) else None


class _Folded:
    """A folded BN layer's forward: the layer before it has done the work."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.bn = bn
        self.scale, self.shift = scale.detach(), shift.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training:
            raise RuntimeError("this BN layer is folded into the layer before it (fold_batchnorm): serving only")
        return x


class _FrozenForward:
    """A BN layer's forward in eval mode as one `addcmul`; BatchNorm's own forward in training mode."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.bn = bn
        self.batchnorm = type(bn).forward.__get__(bn)
        self.scale, self.shift = scale.detach(), shift.detach()
        self._shaped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per input rank: (C, 1, ...) views

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training:
            return self.batchnorm(x)
        shaped = self._shaped.get(x.dim())
        if shaped is None:
            shape = (-1,) + (1,) * (x.dim() - 2)  # channels are dim 1: (N, C), (N, C, L) or (N, C, H, W)
            shaped = self._shaped[x.dim()] = (self.scale.view(shape), self.shift.view(shape))
        return torch.addcmul(shaped[1], x, shaped[0])
