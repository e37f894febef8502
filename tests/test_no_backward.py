"""Calls where no backward can run -- ``torch.inference_mode``, ``torch.no_grad``, grad mode on with nothing
requiring grad, ``torch.func.functional_call`` under either -- give PyTorch's outputs and running statistics, keep
nothing, build no recipe and register no saved-tensor hook (a validation pass under ``inference_mode`` once crashed
on the recipe's version counter).  Everything in float64, so that "equal" means to 1e-10."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ckptnorm
from ckptnorm.torch import BatchNormAct2d, batch_norm_act, convert
from ckptnorm.torch._recompute import HOOKS
from ckptnorm.torch.models import postact_resnet, preact_resnet

STRATEGIES = ckptnorm.STRATEGY_NAMES
TRAINING = [True, False]
TOL = 1e-10


def _top_hooks():
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


@pytest.fixture(autouse=True)
def no_hooks_left_behind():
    assert _top_hooks() is None
    yield
    assert _top_hooks() is None


class _FrozenGrad:
    """Grad mode on, but neither the input nor any parameter requires grad (a frozen backbone)."""

    def __init__(self, *modules):
        self.modules = modules

    def __enter__(self):
        for m in self.modules:
            m.requires_grad_(False)

    def __exit__(self, *exc):
        for m in self.modules:
            m.requires_grad_(True)


MODES = ["inference_mode", "no_grad", "frozen", "functional_call"]


def _run(mode, module, *args):
    """module(*args) under ``mode``; checks that nothing of it was recorded for a backward."""
    if mode == "inference_mode":
        ctx = torch.inference_mode()
    elif mode == "frozen":
        ctx = _FrozenGrad(module)
    else:
        ctx = torch.no_grad()
    with ctx:
        if mode == "inference_mode":  # as inside a network: the layer's inputs are inference tensors too
            args = tuple(None if a is None else a.clone() for a in args)
        if mode == "functional_call":
            state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            out = torch.func.functional_call(module, state, args)
        else:
            out = module(*args)
        assert HOOKS.live() == 0, "a recipe was registered for a call without backward"
        assert _top_hooks() is None, "saved-tensor hooks pushed for a call without backward"
    assert not out.requires_grad
    return out


def _reference_layer(bn, x, residual, slope):
    y = bn(x)
    return F.leaky_relu(y if residual is None else y + residual, slope)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_module_without_backward_equals_pytorch(strategy, residual, training, mode):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    r = torch.randn_like(x) if residual else None
    ours = BatchNormAct2d(5, activation="leaky_relu", activation_param=0.1, strategy=strategy).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
    bn = nn.BatchNorm2d(5).double()
    bn.load_state_dict(ours.state_dict())
    ours.train(training)
    bn.train(training)
    out = _run(mode, ours, x, r)
    with torch.no_grad():
        expected = _reference_layer(bn, x, r, 0.1)
    torch.testing.assert_close(out, expected, rtol=TOL, atol=TOL)
    for name, value in bn.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=TOL, atol=TOL, msg=name)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("strategy", ["checkpoint", "efficient_checkpoint", "standard"])
def test_activation_module_without_backward(strategy, mode):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    ours = BatchNormAct2d(3, activation=nn.Hardtanh(-0.5, 0.5), strategy=strategy).double()
    bn = nn.BatchNorm2d(3).double()
    out = _run(mode, ours, x)
    with torch.no_grad():
        expected = F.hardtanh(bn(x), -0.5, 0.5)
    torch.testing.assert_close(out, expected, rtol=TOL, atol=TOL)
    torch.testing.assert_close(ours.running_var, bn.running_var, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_inplace_abn_writing_over_input_without_backward(mode):
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    ours = BatchNormAct2d(4, strategy="inplace_abn", inplace=True).double().eval()
    with torch.no_grad():
        expected = F.leaky_relu(nn.BatchNorm2d(4).double().eval()(x), 0.01)
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        x_in = x.clone()
        out = ours(x_in)
    assert out.data_ptr() == x_in.data_ptr()
    torch.testing.assert_close(out, expected, rtol=TOL, atol=TOL)


def test_precision_check_skipped_without_backward():
    """gamma = 0 makes inplace_abn keep x (and warn) when backward can run; without one there is nothing to keep."""
    x = torch.randn(2, 4, 3, 3)
    layer = BatchNormAct2d(4, strategy="inplace_abn")
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckptnorm.PrecisionFallbackWarning)
        with torch.inference_mode():
            layer(x)
        with torch.no_grad():
            layer(x)
    with pytest.warns(ckptnorm.PrecisionFallbackWarning):
        layer(x.requires_grad_())


MODELS = {"preact_resnet": preact_resnet, "postact_resnet": postact_resnet}  # postact: residual sites


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_converted_model_without_backward_equals_original(strategy, model_name, training, mode):
    torch.manual_seed(2)
    original = MODELS[model_name](depth=8, width=4).double()
    converted = convert(original, strategy)
    assert converted.ckptnorm_report  # the sites were converted
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    original.train(training)
    converted.train(training)
    out = _run(mode, converted, x)
    with torch.no_grad():
        expected = original(x)
    torch.testing.assert_close(out, expected, rtol=TOL, atol=TOL)
    for name, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], value, rtol=TOL, atol=TOL, msg=name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_with_validation_under_inference_mode(strategy):
    """train step, validation under inference_mode, train step: gradients and statistics as PyTorch's."""
    torch.manual_seed(3)
    original = postact_resnet(depth=8, width=4).double()
    converted = convert(original, strategy)
    models = (original, converted)
    x1, x2, xv = (torch.randn(2, 3, 8, 8, dtype=torch.float64) for _ in range(3))
    grads = []
    for model in models:
        model.train()
        model(x1).square().sum().backward()
        model.eval()
        with torch.inference_mode():
            model(xv)
        model.train()
        model.zero_grad()
        model(x2).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[1] - grads[0]).norm() <= TOL * grads[0].norm()
    for name, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], value, rtol=TOL, atol=TOL, msg=name)


@pytest.mark.parametrize("strategy", ["checkpoint", "efficient_checkpoint"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_inference_tensor_kept_for_backward_is_refused(strategy, residual):
    """An inference tensor that backward would need: ckptnorm's error with a tip, running statistics untouched."""
    with torch.inference_mode():
        x = torch.randn(2, 4, 3, 3)
        r = torch.randn_like(x) if residual else None
    if residual:  # the input is a normal tensor; the residual is the inference one
        x = x.clone()
    layer = BatchNormAct2d(4, strategy=strategy)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(RuntimeError, match="ckptnorm: the (input|residual) was made under torch.inference_mode"
                       ".*tip:"):
        layer(x, r)
    for name, value in before.items():
        if name != "num_batches_tracked":
            assert torch.equal(layer.state_dict()[name], value), name


def test_inplace_abn_needs_no_inference_input_kept():
    """inplace_abn keeps z, not x: an inference-mode input still trains, with PyTorch's gradients."""
    with torch.inference_mode():
        x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    layer = BatchNormAct2d(4, strategy="inplace_abn").double()
    bn = nn.BatchNorm2d(4).double()
    layer(x).square().sum().backward()
    F.leaky_relu(bn(x.clone()), 0.01).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, bn.weight.grad, rtol=TOL, atol=TOL)
    torch.testing.assert_close(layer.bias.grad, bn.bias.grad, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_functional_under_inference_mode(strategy):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with torch.inference_mode():
        out = batch_norm_act(x, rm, rv, training=True, activation="elu", strategy=strategy)
    expected = F.elu(F.batch_norm(x, rm_ref, rv_ref, training=True))
    torch.testing.assert_close(out, expected, rtol=TOL, atol=TOL)
    torch.testing.assert_close(rv, rv_ref, rtol=TOL, atol=TOL)
