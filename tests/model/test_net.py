"""Network shapes and config handling."""

import pytest
import torch
from torch import nn

from model.net import NetConfig, bn_layers, build_net, freeze_batchnorm


@pytest.mark.parametrize("batch", [1, 5])
def test_bn_cnn_shapes(batch: int) -> None:
    net = build_net(NetConfig()).eval()
    assert net(torch.zeros(batch, 1, 28, 28)).shape == (batch, 10)
    x = torch.zeros(batch, 1, 28, 28)
    assert net.features(x).shape == (batch, 64, 7, 7)


def test_seed_mlp_matches_the_seed_document() -> None:
    net = build_net(NetConfig.seed_mlp()).eval()
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 10)]
    assert [type(m).__name__ for m in bn_layers(net).values()] == ["BatchNorm1d"]
    assert not any(isinstance(m, torch.nn.Softmax) for m in net.modules()), "the MLP must return logits"
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_bn_layers_in_forward_order_with_both_kinds() -> None:
    layers = bn_layers(build_net(NetConfig()))
    assert list(layers) == ["features.0.1", "features.1.1", "features.2.1", "head.2"]
    assert [type(m).__name__ for m in layers.values()] == ["BatchNorm2d"] * 3 + ["BatchNorm1d"]


def test_config_round_trip_and_validation() -> None:
    cfg = NetConfig(conv_channels=(8, 16), hidden=32)
    assert NetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="arch"):
        NetConfig(arch="resnet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown architecture keys"):
        NetConfig.from_dict({**cfg.to_dict(), "layers": 3})
    with pytest.raises(ValueError, match="dropout"):
        NetConfig(dropout=1.5)


@pytest.mark.parametrize("arch", ["bn-cnn", "seed-mlp"])
def test_frozen_batchnorm_computes_what_batchnorm_computes_and_keeps_its_hooks(arch: str) -> None:
    torch.manual_seed(0)
    net = build_net(NetConfig(arch=arch))  # type: ignore[arg-type]
    for bn in bn_layers(net).values():  # statistics and affine parameters away from their defaults
        bn.running_mean.normal_()  # type: ignore[union-attr]
        bn.running_var.uniform_(0.2, 3.0)  # type: ignore[union-attr]
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    net.eval()
    x = torch.randn(8, 1, 28, 28)
    expected = net(x)
    seen: list[torch.Tensor] = []
    for bn in bn_layers(net).values():
        bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    freeze_batchnorm(net)
    assert all(isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d) for bn in bn_layers(net).values())
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    assert len(seen) == len(bn_layers(net)), "the pre-hooks (drift) still see every BN input"
    net.train()  # training mode normalises by the batch, as BatchNorm does
    bn = next(iter(bn_layers(net).values()))
    batch = torch.randn(16, bn.num_features, *((5, 5) if isinstance(bn, nn.BatchNorm2d) else ()))
    out = bn(batch)
    dims = [0, 2, 3] if batch.dim() == 4 else [0]
    torch.testing.assert_close(out.mean(dims), bn.bias.detach(), atol=1e-5, rtol=0)
