"""The modules are drop-ins for nn.BatchNorm*d + activation: arguments, state_dict, repr, input checks."""
from __future__ import annotations

import pytest
import torch

import ckptnorm
from ckptnorm.torch import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, _compat

PAIRS = [(BatchNormAct1d, torch.nn.BatchNorm1d), (BatchNormAct2d, torch.nn.BatchNorm2d),
         (BatchNormAct3d, torch.nn.BatchNorm3d)]


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
def test_state_dict_round_trip_strict(ours, theirs, affine, track):
    bn = theirs(6, affine=affine, track_running_stats=track)
    with torch.no_grad():
        for t in bn.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    layer = ours(6, affine=affine, track_running_stats=track)
    assert list(layer.state_dict()) == list(bn.state_dict())
    layer.load_state_dict(bn.state_dict(), strict=True)
    for key, value in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value)
    theirs(6, affine=affine, track_running_stats=track).load_state_dict(layer.state_dict(), strict=True)


def test_same_parameters_buffers_and_defaults_as_batchnorm():
    layer, bn = BatchNormAct2d(8), torch.nn.BatchNorm2d(8)
    assert [n for n, _ in layer.named_parameters()] == [n for n, _ in bn.named_parameters()]
    assert [n for n, _ in layer.named_buffers()] == [n for n, _ in bn.named_buffers()]
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-5, 0.1, True, True)
    assert (layer.activation, layer.activation_param, layer.strategy, layer.inplace) == (
        "leaky_relu", 0.01, "efficient_checkpoint", False)
    assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("norm_takes_bias", sorted({_compat._NORM_TAKES_BIAS, False}))
def test_bias_false_has_no_bias_parameter(monkeypatch, norm_takes_bias):
    """Also as on a torch whose BatchNorm has no ``bias`` keyword (2.11, the lent GPUs' torch)."""
    monkeypatch.setattr(_compat, "_NORM_TAKES_BIAS", norm_takes_bias)
    layer = BatchNormAct2d(4, bias=False)
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():
        layer.weight.fill_(3.0)
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(4))
    assert BatchNormAct2d(4, bias=True).bias is not None
    assert [n for n, _ in BatchNormAct2d(4, affine=False, bias=False).named_parameters()] == []


def test_device_and_dtype_arguments():
    layer = BatchNormAct1d(3, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == layer.running_mean.dtype == torch.float64
    out = layer(torch.randn(5, 3, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_extra_repr():
    text = repr(BatchNormAct2d(16, strategy="inplace", activation="elu", activation_param=0.5, inplace=True))
    assert text == ("BatchNormAct2d(16, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, "
                    "activation=elu(0.5), strategy=inplace_abn, inplace=True)")
    assert "bias=False" in repr(BatchNormAct2d(4, bias=False))


@pytest.mark.parametrize("cls,good,bad", [(BatchNormAct1d, [(4, 3), (4, 3, 5)], [(3,), (2, 3, 4, 5)]),
                                          (BatchNormAct2d, [(2, 3, 4, 5)], [(2, 3, 4), (2, 3, 4, 5, 6)]),
                                          (BatchNormAct3d, [(2, 3, 2, 2, 2)], [(2, 3, 4, 5)])])
def test_check_input_dim(cls, good, bad):
    layer = cls(3)
    for shape in good:
        layer(torch.randn(shape))
    for shape in bad:
        with pytest.raises(ValueError, match=rf"^ckptnorm: {cls.__name__} expects .*tip:"):
            layer(torch.randn(shape))


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="^ckptnorm: eps must be positive.*tip:"):
        BatchNormAct2d(3, eps=eps)


def test_strategy_accepts_name_alias_class_and_instance():
    for spec in ("checkpoint", "ckpt", ckptnorm.Checkpoint, ckptnorm.Checkpoint()):
        assert BatchNormAct2d(3, strategy=spec).strategy == "checkpoint"


def test_momentum_none_cumulative_average_and_eval_uses_running_stats():
    layer, bn = BatchNormAct2d(3, momentum=None, activation="identity"), torch.nn.BatchNorm2d(3, momentum=None)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, generator=g) * 3 + 1
        layer(x)
        bn(x)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert int(layer.num_batches_tracked) == 3
    layer.eval()
    bn.eval()
    x = torch.randn(2, 3, 5, 5, generator=g)
    torch.testing.assert_close(layer(x), bn(x))
    assert int(layer.num_batches_tracked) == 3


@pytest.mark.parametrize("strategy", ckptnorm.STRATEGY_NAMES)
def test_running_buffers_updated_in_place_as_batchnorm_does(strategy):
    """The same buffer objects and memory, updated in place, and autograd's version counters as nn.BatchNorm leaves
    them (its kernels write the buffers without an in-place op, as ours do)."""
    layer, bn = BatchNormAct2d(3, strategy=strategy, activation="identity"), torch.nn.BatchNorm2d(3)
    buffers = layer.running_mean, layer.running_var
    pointers, versions = [b.data_ptr() for b in buffers], [b._version for b in buffers]
    bn_versions = [bn.running_mean._version, bn.running_var._version]
    x = torch.randn(4, 3, 5, 5) + 2
    layer(x.clone().requires_grad_())
    bn(x.clone().requires_grad_())
    assert layer.running_mean is buffers[0] and layer.running_var is buffers[1]
    assert [b.data_ptr() for b in buffers] == pointers
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert [b._version - v for b, v in zip(buffers, versions)] == \
        [bn.running_mean._version - bn_versions[0], bn.running_var._version - bn_versions[1]]


def test_no_grad_forward_works_for_every_strategy():
    x = torch.randn(2, 3, 4, 4)
    outs = []
    for strategy in ckptnorm.STRATEGY_NAMES:
        with torch.no_grad():
            outs.append(BatchNormAct2d(3, strategy=strategy)(x))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_module_is_reusable_in_one_graph():
    """The same layer applied twice before backward (weight sharing): gradients add up as with native BN."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    grads = []
    for strategy in ("standard", "checkpoint", "efficient_checkpoint", "inplace_abn"):
        layer = BatchNormAct2d(3, strategy=strategy, dtype=torch.float64)
        (layer(a.double()) * layer(b.double())).sum().backward()
        grads.append((layer.weight.grad, layer.bias.grad, layer.running_mean.clone()))
    for other in grads[1:]:
        for got, want in zip(other, grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", list(ckptnorm.STRATEGY_NAMES))
def test_empty_batch_behaves_like_batchnorm(strategy):
    layer, bn = BatchNormAct2d(3, strategy=strategy, activation="identity"), torch.nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    bn(torch.randn(0, 3, 4, 4))
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)


def test_functional_momentum_none_needs_a_factor():
    from ckptnorm.torch import batch_norm_act
    with pytest.raises(ValueError, match="^ckptnorm: momentum=None needs a batch count; tip:"):
        batch_norm_act(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)
