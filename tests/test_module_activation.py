"""Activation modules without a kernel (``activation=nn.Hardtanh(-2., 2.)``, a user's own ``nn.Module``, a callable):
z = f(BN(x) [+ r]) equals native BN + f, keeps no more than a kernel activation under the same strategy, and the
rules (no state, elementwise, not inplace_abn) are enforced."""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ckptnorm.torch import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, SavedTensorsCounter, batch_norm_act
from ckptnorm.channel_stats import Reducer
from ckptnorm.torch import module_call

F64 = torch.float64
STRATEGIES = ("standard", "checkpoint", "efficient_checkpoint")
RECOMPUTING = ("checkpoint", "efficient_checkpoint")
N, C, H, W = 2, 8, 16, 16
F32 = 4
A = N * 3 * H * W * F32   # block input, kept by the first conv
B = N * C * H * W * F32   # one activation-sized buffer


class MySwish(nn.Module):
    """A user's own elementwise activation, x * sigmoid(1.7 x)."""

    def forward(self, t):
        return t * torch.sigmoid(1.7 * t)


class ClampInPlace(nn.Module):
    """Modifies its input in place without an ``inplace`` attribute."""

    def forward(self, t):
        return t.clamp_(-0.5, 0.8)


ACTIVATIONS = {
    "hardtanh": lambda: nn.Hardtanh(-2.0, 2.0),
    "softplus": lambda: nn.Softplus(beta=2.0),
    "tanhshrink": lambda: nn.Tanhshrink(),
    "myswish": lambda: MySwish(),
}


def normwise_close(got, ref, tol=1e-12, what="", floor=1e-300):
    """|got - ref| <= tol |ref| (2-norms); ``floor``: the smallest |ref| (for gradients that are zero in exact
    arithmetic, such as the bias of a conv feeding a BN in training: rounding noise only)."""
    err = (got - ref).norm().item()
    scale = max(ref.norm().item(), floor)
    assert err <= tol * scale, f"{what}: normwise error {err / scale:.3g}"


def grads_close(grads, grads_ref, tol=1e-12):
    assert list(grads) == list(grads_ref)
    overall = max(g.norm().item() for g in grads_ref.values())
    for name in grads:
        normwise_close(grads[name], grads_ref[name], tol, what=name, floor=1e-3 * overall)


def block(strategy, activation, channels=C, seed=0, dtype=F64, native=False):
    """conv -> layer -> conv, or conv -> nn.BatchNorm2d -> activation -> conv with ``native`` (same weights)."""
    torch.manual_seed(seed)
    conv1, conv2 = nn.Conv2d(3, channels, 3, padding=1), nn.Conv2d(channels, 4, 3, padding=1)
    if native:
        bn = nn.BatchNorm2d(channels)
        mid = [("bn", bn), ("act", activation)]
    else:
        bn = BatchNormAct2d(channels, activation=activation, strategy=strategy)
        mid = [("bn", bn)]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
    # named children: both blocks have the same state_dict keys (the activation module adds none)
    return nn.Sequential(OrderedDict([("conv1", conv1), *mid, ("conv2", conv2)])).to(dtype)


def bn_of(net):
    return net.bn


def run(net, x, seed=2):
    x = x.detach().clone().requires_grad_()
    out = net(x)
    torch.manual_seed(seed)
    (out * torch.randn_like(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    return out.detach(), x.grad, grads


def data(channels_last=False, dtype=F64, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(N, 3, H, W, dtype=dtype) * 2 + 0.5
    return x.to(memory_format=torch.channels_last) if channels_last else x


# -- equivalence with native BN + the module ---------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_native_bn_plus_module(strategy, act, channels_last, training):
    ours = block(strategy, ACTIVATIONS[act]())
    ref = block(strategy, ACTIVATIONS[act](), native=True)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same keys: the activation adds none
    if not training:
        with torch.no_grad():  # non-trivial running statistics for eval mode
            bn_of(ours).running_mean.uniform_(-0.5, 0.5)
            bn_of(ours).running_var.uniform_(0.5, 2.0)
        ref.load_state_dict(ours.state_dict(), strict=True)
        ours.eval(), ref.eval()
    x = data(channels_last)
    if channels_last:
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
    out, dx, grads = run(ours, x)
    out_ref, dx_ref, grads_ref = run(ref, x)
    normwise_close(out, out_ref, what="output")
    normwise_close(dx, dx_ref, what="dx")
    # dgamma, dbeta ("bn.weight", "bn.bias") and the convs' gradients, the second conv's through a recomputed z
    grads_close(grads, grads_ref)
    mine, theirs = bn_of(ours), bn_of(ref)
    normwise_close(mine.running_mean, theirs.running_mean, what="running_mean")
    normwise_close(mine.running_var, theirs.running_var, what="running_var")
    assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("strategy", RECOMPUTING)
def test_consumer_recomputes_z_by_rerunning_the_module(strategy, monkeypatch):
    calls = []
    original = module_call.ModuleCall.rerun
    monkeypatch.setattr(module_call.ModuleCall, "rerun", lambda self, y: calls.append(1) or original(self, y))
    net = block(strategy, MySwish())
    run(net, data())
    assert len(calls) == 1  # the second conv's backward unpacked z from the recipe


@pytest.mark.parametrize("layer_cls, shape", [(BatchNormAct1d, (6, 5)), (BatchNormAct1d, (3, 5, 7)),
                                              (BatchNormAct3d, (2, 5, 3, 4, 3))])
@pytest.mark.parametrize("strategy", RECOMPUTING)
def test_1d_and_3d_layers(strategy, layer_cls, shape):
    torch.manual_seed(0)
    layer = layer_cls(5, activation=nn.Softplus(beta=2.0), strategy=strategy).to(F64)
    bn = {BatchNormAct1d: nn.BatchNorm1d, BatchNormAct3d: nn.BatchNorm3d}[layer_cls](5).to(F64)
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    z, z2 = layer(x), nn.functional.softplus(bn(x2), beta=2.0)
    g = torch.randn_like(z)
    z.backward(g), z2.backward(g)
    normwise_close(z, z2, what="output")
    normwise_close(x.grad, x2.grad, what="dx")
    normwise_close(layer.weight.grad, bn.weight.grad, what="dgamma")
    normwise_close(layer.bias.grad, bn.bias.grad, what="dbeta")


# -- memory: z is not kept ---------------------------------------------------------------------------------------------
def saved_bytes(net, x):
    with SavedTensorsCounter(exclude=net) as counter:
        out = net(x)
    out.sum().backward()
    return counter.saved_bytes


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("strategy", RECOMPUTING)
def test_saved_bytes_equal_those_of_a_kernel_activation(strategy, act, channels_last):
    x = data(channels_last, dtype=torch.float32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    got = saved_bytes(block(strategy, ACTIVATIONS[act](), dtype=torch.float32).to(memory_format=fmt), x)
    kernel = saved_bytes(block(strategy, "leaky_relu", dtype=torch.float32).to(memory_format=fmt), x)
    assert got == kernel == {"checkpoint": A + B, "efficient_checkpoint": A + B + 2 * C * 8}[strategy]


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_standard_saves_what_the_original_model_saves(act):
    x = data(dtype=torch.float32)
    got = saved_bytes(block("standard", ACTIVATIONS[act](), dtype=torch.float32), x)
    original = saved_bytes(block("standard", ACTIVATIONS[act](), dtype=torch.float32, native=True), x)
    assert got == original


# -- residual sites: z = f(BN(x) + r) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_residual(strategy, channels_last):
    torch.manual_seed(0)
    layer = BatchNormAct2d(5, activation=nn.Tanhshrink(), strategy=strategy).to(F64)
    bn = nn.BatchNorm2d(5).to(F64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    bn.load_state_dict(layer.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 5, 4, 6, dtype=F64).to(memory_format=fmt).requires_grad_()
    r = torch.randn(3, 5, 4, 6, dtype=F64).to(memory_format=fmt).requires_grad_()
    x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    z, z2 = layer(x, residual=r), nn.functional.tanhshrink(bn(x2) + r2)
    g = torch.randn_like(z)
    z.backward(g), z2.backward(g)
    for got, ref, what in ((z, z2, "output"), (x.grad, x2.grad, "dx"), (r.grad, r2.grad, "dr"),
                           (layer.weight.grad, bn.weight.grad, "dgamma"), (layer.bias.grad, bn.bias.grad, "dbeta"),
                           (layer.running_var, bn.running_var, "running_var")):
        normwise_close(got, ref, what=what)


# -- gradcheck ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("strategy", RECOMPUTING)
def test_gradcheck(strategy, training):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 2, 2, dtype=F64, requires_grad=True)
    w = (torch.rand(2, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=F64, requires_grad=True)
    r = torch.randn(2, 2, 2, 2, dtype=F64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=F64), torch.rand(2, dtype=F64) + 0.5
    stats = (None, None) if training else (rm, rv)

    def f(x, w, b, r):
        plain = batch_norm_act(x, *stats, w, b, training=training, activation=nn.Softplus(beta=2.0),
                               strategy=strategy)
        return plain + batch_norm_act(x, *stats, w, b, training=training, activation=MySwish(), strategy=strategy,
                                      residual=r)

    assert torch.autograd.gradcheck(f, (x, w, b, r))


class SameProcessReducer(Reducer):
    """A 'synchronized' BN over one process: exercises the synced code paths, results as unsynchronized."""

    def merge_stats(self, count, mean, var, extrema=()):
        return count, mean, var, extrema

    def sum_channels(self, *arrays):
        return arrays


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reducer_path(strategy):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
    w, b = torch.rand(3, dtype=F64) + 0.5, torch.randn(3, dtype=F64)
    w.requires_grad_(), b.requires_grad_()
    results = []
    for reducer in (SameProcessReducer(), None):
        rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
        z = batch_norm_act(x, rm, rv, w, b, training=True, activation=MySwish(), strategy=strategy,
                           reducer=reducer)
        grads = torch.autograd.grad((z * torch.linspace(-1, 2, z.numel(), dtype=F64).view_as(z)).sum(), (x, w, b))
        results.append((z.detach(), rv, *grads))
    for got, ref in zip(*results):
        normwise_close(got, ref)


# -- stochastic modules: the recomputations replay the forward's random numbers ---------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rrelu_same_seed_same_gradient_as_native(strategy):
    ours = block(strategy, nn.RReLU(0.1, 0.4))
    ref = block(strategy, nn.RReLU(0.1, 0.4), native=True)
    ref.load_state_dict(ours.state_dict())
    x = data()
    results = []
    for net in (ours, ref):
        torch.manual_seed(123)
        xi = x.clone().requires_grad_()
        out = net(xi)
        torch.rand(7)  # draws between forward and backward do not change what the recomputation replays
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        after = torch.rand(3)  # and the recomputations leave the global stream alone
        results.append((out.detach(), xi.grad, [p.grad for p in net.parameters()], after))
    (out, dx, grads, after), (out_ref, dx_ref, grads_ref, after_ref) = results
    normwise_close(out, out_ref, what="output")
    normwise_close(dx, dx_ref, what="dx")
    grads_close(dict(enumerate(grads)), dict(enumerate(grads_ref)))
    assert torch.equal(after, after_ref)
    # eval mode: .eval() reaches the registered activation, which is then deterministic
    ours.eval()
    assert not bn_of(ours).activation.training
    torch.manual_seed(0)
    a = ours(x)
    torch.manual_seed(1)
    assert torch.equal(a, ours(x))


def test_deterministic_module_skips_rng_restoring():
    call = module_call.ModuleCall(nn.Softplus())
    call.first_run(torch.randn(4, 3))
    assert call.rng is None
    call = module_call.ModuleCall(nn.RReLU())
    call.first_run(torch.randn(4, 3))
    assert call.rng is not None


# -- torch.utils.checkpoint: running statistics updated once ----------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_under_torch_utils_checkpoint(strategy, use_reentrant):
    ours = block(strategy, nn.RReLU(0.1, 0.4))
    ref = block(strategy, nn.RReLU(0.1, 0.4), native=True)
    ref.load_state_dict(ours.state_dict())
    x = data().requires_grad_()
    torch.manual_seed(5)
    out = checkpoint(ours, x, use_reentrant=use_reentrant)
    out.sum().backward()
    torch.manual_seed(5)
    ref(x.detach()).sum().backward()
    assert int(bn_of(ours).num_batches_tracked) == 1
    normwise_close(bn_of(ours).running_mean, bn_of(ref).running_mean, what="running_mean")
    normwise_close(bn_of(ours).running_var, bn_of(ref).running_var, what="running_var")
    grads_close({n: p.grad for n, p in ours.named_parameters()}, {n: p.grad for n, p in ref.named_parameters()})


# -- in-place modules and plain callables ---------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: nn.Hardtanh(-0.5, 0.8, inplace=True), ClampInPlace],
                         ids=["inplace_attribute", "silently_inplace"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_in_place_module(strategy, make):
    ours = block(strategy, make())
    ref = block(strategy, nn.Hardtanh(-0.5, 0.8), native=True)
    ref.load_state_dict(ours.state_dict())
    x = data()
    out, dx, grads = run(ours, x)
    out_ref, dx_ref, grads_ref = run(ref, x)
    normwise_close(out, out_ref, what="output")
    normwise_close(dx, dx_ref, what="dx")
    grads_close(grads, grads_ref)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plain_callable(strategy):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
    z = batch_norm_act(x, None, None, training=True, activation=torch.tanh, strategy=strategy)
    z_ref = torch.tanh(nn.functional.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-14)
    (gx,) = torch.autograd.grad(z.sum(), x)
    (gx_ref,) = torch.autograd.grad(z_ref.sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-11, atol=1e-13)
    layer = BatchNormAct1d(3, activation=lambda t: t * torch.sigmoid(t), strategy=strategy).to(F64)
    copy.deepcopy(layer)(x).sum().backward()
    assert "activation=test_plain_callable.<locals>.<lambda>, strategy=" in repr(layer)


# -- the module's attributes, state and modes ------------------------------------------------------------------------
def test_attributes_state_dict_deepcopy_dtype_and_modes():
    act = nn.Hardtanh(-2.0, 2.0)
    layer = BatchNormAct2d(6, activation=act, strategy="checkpoint")
    assert layer.activation is act and layer.activation_param is None and layer.strategy == "checkpoint"
    assert dict(layer.named_children()) == {"activation": act}
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.running_var.uniform_(0.5, 1.5)
    assert list(layer.state_dict()) == list(bn.state_dict())
    layer.load_state_dict(bn.state_dict(), strict=True)
    nn.BatchNorm2d(6).load_state_dict(layer.state_dict(), strict=True)
    assert repr(layer) == (
        "BatchNormAct2d(\n  6, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, "
        "activation=Hardtanh(min_val=-2.0, max_val=2.0), strategy=checkpoint\n"
        "  (activation): Hardtanh(min_val=-2.0, max_val=2.0)\n)")
    twin = copy.deepcopy(layer)
    assert twin.activation is not act and isinstance(twin.activation, nn.Hardtanh)
    assert twin.activation.min_val == -2.0
    twin = twin.to(F64)
    x = torch.randn(2, 6, 3, 3, dtype=F64, requires_grad=True)
    twin(x).sum().backward()
    assert twin.weight.grad.dtype == F64
    layer.eval()
    assert not layer.activation.training
    layer.train()
    assert layer.activation.training
    # switching the activation by attribute, both ways
    layer.activation = "relu"
    assert "activation" not in dict(layer.named_children()) and layer.activation == "relu"
    assert "activation=relu" in repr(layer)
    layer.activation = nn.Softplus()
    layer(torch.randn(2, 6, 3, 3)).sum().backward()
    # named activations are unchanged
    named = BatchNormAct2d(6, activation="elu", activation_param=0.5)
    assert (named.activation, named.activation_param) == ("elu", 0.5) and not list(named.children())


def test_torch_save_round_trip(tmp_path):
    layer = BatchNormAct2d(4, activation=MySwish(), strategy="efficient_checkpoint")
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert isinstance(loaded.activation, MySwish)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(loaded(x), layer(x))


# -- the rules ---------------------------------------------------------------------------------------------------------
class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, t):
        return t * self.scale


def test_inplace_abn_refused():
    with pytest.raises(ValueError, match=r"^ckptnorm: .*inplace_abn.*tip: use strategy='efficient_checkpoint'"):
        BatchNormAct2d(4, activation=nn.Hardtanh(), strategy="inplace_abn")
    with pytest.raises(ValueError, match=r"^ckptnorm: .*no known inverse.*tip: "):
        batch_norm_act(torch.randn(2, 4, 3, 3), None, None, training=True, activation=nn.Softplus(),
                       strategy="inplace_abn")
    layer = BatchNormAct2d(4, activation=nn.Softplus())
    layer.strategy = "inplace_abn"
    with pytest.raises(ValueError, match="efficient_checkpoint"):
        layer(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("make", [lambda: nn.PReLU(), WithBuffer], ids=["parameters", "buffers"])
def test_module_with_state_refused(make):
    with pytest.raises(ValueError, match=r"^ckptnorm: .*parameters or buffers.*tip: keep it as a separate module"):
        BatchNormAct2d(4, activation=make())
    with pytest.raises(ValueError, match=r"^ckptnorm: .*parameters or buffers"):
        batch_norm_act(torch.randn(2, 4, 3, 3), None, None, training=True, activation=make(), strategy="standard")


def test_other_misuse():
    with pytest.raises(TypeError, match=r"^ckptnorm: .*is a class; tip: pass an instance, e.g. activation=Tanh\(\)"):
        BatchNormAct2d(4, activation=nn.Tanh)
    with pytest.raises(ValueError, match=r"^ckptnorm: activation_param=.*tip: configure the module itself"):
        batch_norm_act(torch.randn(2, 4, 3), None, None, training=True, activation=nn.ELU(), activation_param=0.5)
    with pytest.raises(ValueError, match=r"^ckptnorm: activation_param=.*tip: configure the module itself"):
        BatchNormAct2d(4, activation=nn.ELU(), activation_param=0.5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fn", [lambda t: t.mean(1, keepdim=True), lambda t: t.sum(), lambda t: (t > 0)],
                         ids=["reduces", "scalar", "boolean"])
def test_non_elementwise_module_refused_at_runtime(strategy, fn):
    layer = BatchNormAct2d(4, activation=fn, strategy=strategy)
    with pytest.raises(ValueError, match=r"^ckptnorm: activation .* must be elementwise.*tip: "):
        layer(torch.randn(2, 4, 3, 3, requires_grad=True))


# -- mixed precision ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", RECOMPUTING)
def test_cpu_autocast_bfloat16_matches_standard(strategy):
    x = data(dtype=torch.float32)
    grads = {}
    for s in ("standard", strategy):
        net = block(s, nn.Softplus(beta=2.0), dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        grads[s] = [p.grad for p in net.parameters()]
    for g, g_ref in zip(grads[strategy], grads["standard"]):
        assert (g - g_ref).norm() <= 0.05 * g_ref.norm()
