"""Network shapes and config handling."""

import pytest
import torch
from torch import nn

from model.net import NetConfig, bn_layers, build_net, fold_batchnorm, folded_affine


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


def randomised(arch: str) -> nn.Module:
    """A net in eval mode whose BN statistics and affine parameters are away from their defaults."""
    torch.manual_seed(0)
    net = build_net(NetConfig(arch=arch))  # type: ignore[arg-type]
    for bn in bn_layers(net).values():
        bn.running_mean.normal_()  # type: ignore[union-attr]
        bn.running_var.uniform_(0.2, 3.0)  # type: ignore[union-attr]
        bn.weight.data.uniform_(0.2, 2.0).mul_(torch.randn(bn.num_features).sign())  # |γ| away from 0: all fold
        bn.bias.data.normal_()
    return net.eval()


@pytest.mark.parametrize("arch", ["bn-cnn", "seed-mlp"])
def test_folded_batchnorm_computes_what_batchnorm_computes_and_its_hooks_map_back_to_bn_inputs(arch: str) -> None:
    net = randomised(arch)
    x = torch.randn(8, 1, 28, 28)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name, bn in bn_layers(net).items():
        bn.register_forward_hook(lambda _m, a, y, name=name: outputs.__setitem__(name, y.clone()))
    hooks = [
        bn.register_forward_pre_hook(lambda _m, a, name=name: inputs.__setitem__(name, a[0].clone()))
        for name, bn in bn_layers(net).items()
    ]
    with torch.no_grad():
        expected = net(x)
        unfolded_inputs = dict(inputs)
        fold_batchnorm(net)
        fold_batchnorm(net)  # a second call changes nothing
        got = net(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d) for bn in bn_layers(net).values())
    for name, bn in bn_layers(net).items():
        affine = folded_affine(bn)
        assert affine is not None, f"{name} follows a conv or linear layer: it folds"
        scale, shift = (t.view(-1, *([1] * (inputs[name].dim() - 2))) for t in affine)
        torch.testing.assert_close(inputs[name], outputs[name], msg="a folded layer passes its input on")
        torch.testing.assert_close((inputs[name] - shift) / scale, unfolded_inputs[name], rtol=1e-4, atol=1e-4)
    for h in hooks:
        h.remove()
    net.train()
    with pytest.raises(RuntimeError, match="folded"):
        net(x)


def test_a_bn_layer_that_cannot_fold_runs_as_batchnorm_does() -> None:
    net = randomised("bn-cnn")
    first = net.features[0][1]
    with torch.no_grad():
        first.weight[0] = 0.0  # a dead channel: its output says nothing about its input, so it cannot be mapped back
        expected = net(torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)))
    fold_batchnorm(net)
    assert folded_affine(first) is None
    assert folded_affine(net.features[1][1]) is not None
    with torch.no_grad():
        got = net(torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    net.train()  # an unfolded layer trains as BatchNorm does: normalised by the batch
    batch = torch.randn(16, first.num_features, 5, 5)
    torch.testing.assert_close(first(batch).mean([0, 2, 3]), first.bias.detach(), atol=1e-5, rtol=0)
