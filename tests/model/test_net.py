"""Network shapes and config handling."""

import pytest
import torch

from model.net import NetConfig, bn_layers, build_net


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
