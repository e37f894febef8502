"""Residual sites: z = phi(BN(x) + r) fused into one layer (design note, "Residual sites").

Checked against (a) the float64 NumPy reference with a residual, (b) PyTorch's own BN -> add -> act, (c) exact bytes
kept by a post-activation block (standard 5 buffers, the other strategies 3) and by a stage of such blocks (the chain
of recipes, rule 6 of ``_recompute``), and through ``convert`` on a post-activation ResNet with projection shortcuts
(a BN on both sides of the add).
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckptnorm import PrecisionFallbackWarning, reference
from ckptnorm.torch.models import postact_resnet
from ckptnorm.torch import BatchNormAct2d, SavedTensorsCounter, batch_norm_act, convert, find_sites

STRATEGIES = ["standard", "checkpoint", "efficient_checkpoint", "inplace_abn"]
ACTS = [("identity", None), ("leaky_relu", 0.1), ("elu", 1.0), ("relu", None), ("silu", None)]


def _inputs(dtype=torch.float64, channels_last=False, seed=0, shape=(3, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 1
    r = torch.randn(shape, generator=g, dtype=dtype)
    dz = torch.randn(shape, generator=g, dtype=dtype)
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.5)
    b = (torch.rand(c, generator=g, dtype=dtype) - 0.5) * 0.5
    if channels_last:
        x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    return x, r, dz, w, b


def _run(strategy, act, param, x, r, dz, w, b, training=True, inplace=False):
    xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
    wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
    rm, rv = torch.zeros_like(w), torch.ones_like(w) * 1.5
    src = xi * 1 if inplace else xi  # in place needs a non-leaf
    z = batch_norm_act(src, rm, rv, wi, bi, training, 0.1, 1e-5, act, param, strategy, inplace, residual=ri)
    z.backward(dz)
    return z.detach(), xi.grad, ri.grad, wi.grad, bi.grad, rm, rv


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act,param", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_float64_reference(strategy, act, param, channels_last, training):
    if strategy == "inplace_abn" and act in ("relu", "silu"):
        pytest.skip("inplace_abn needs an invertible activation")
    x, r, dz, w, b = _inputs(channels_last=channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionFallbackWarning)  # ELU's fallback is checked below
        z, dx, dr, dw, db, rm, rv = _run(strategy, act, param, x, r, dz, w, b, training)
    fwd = reference.forward(x.numpy(), np.zeros(4), np.full(4, 1.5), w.numpy(), b.numpy(), training=training,
                            activation=act, activation_param=param, strategy="efficient_checkpoint",
                            residual=r.numpy())
    want = reference.backward(dz.numpy(), fwd, w.numpy(), b.numpy(), training=training, activation=act,
                              activation_param=param, strategy="efficient_checkpoint")
    np.testing.assert_allclose(z.numpy(), fwd.z, rtol=1e-10, atol=1e-10)
    for got, ref in zip((dx, dw, db, dr), want):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(rm.numpy(), fwd.running_mean, rtol=1e-12)
    np.testing.assert_allclose(rv.numpy(), fwd.running_var, rtol=1e-12)


@pytest.mark.parametrize("act,param", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", None)])
def test_reference_strategies_agree_with_autograd(act, param):
    """The reference's residual formulas (all four strategies) against torch autograd of BN -> add -> act."""
    x, r, dz, w, b = _inputs()
    xi, ri, wi, bi = (t.clone().requires_grad_() for t in (x, r, w, b))
    y = F.batch_norm(xi, None, None, wi, bi, True, 0.1, 1e-5) + ri
    z = {"identity": y, "leaky_relu": F.leaky_relu(y, param or 0.0), "elu": F.elu(y, param or 1.0)}[act]
    z.backward(dz)
    for strategy in STRATEGIES:
        fwd = reference.forward(x.numpy(), w.numpy() * 0, w.numpy() * 0 + 1, w.numpy(), b.numpy(), activation=act,
                                activation_param=param, strategy=strategy, residual=r.numpy())
        np.testing.assert_allclose(fwd.z, z.detach().numpy(), rtol=1e-12, atol=1e-12)
        got = reference.backward(dz.numpy(), fwd, w.numpy(), b.numpy(), activation=act, activation_param=param,
                                 strategy=strategy)
        for g, want in zip(got, (xi.grad, wi.grad, bi.grad, ri.grad)):
            np.testing.assert_allclose(g, want.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_float32_matches_native(strategy, channels_last):
    x, r, dz, w, b = _inputs(torch.float32, channels_last, shape=(8, 16, 12, 12))
    native = _run("standard", "leaky_relu", 0.01, x, r, dz, w, b)
    ours = _run(strategy, "leaky_relu", 0.01, x, r, dz, w, b)
    for got, want in zip(ours, native):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_odd_residual_strides_and_no_grad_residual(strategy):
    """An expanded (stride-0) residual, a permuted one, and a residual that needs no gradient."""
    x, r, dz, w, b = _inputs()
    per_channel = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    for res in (per_channel.expand_as(x), r.transpose(2, 3).contiguous().transpose(2, 3)):
        want = _run("standard", "leaky_relu", 0.1, x, res.contiguous(), dz, w, b)
        got = _run(strategy, "leaky_relu", 0.1, x, res, dz, w, b)
        for g, ref in zip(got, want):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10)
    xi = x.clone().requires_grad_()
    z = batch_norm_act(xi, None, None, w, b, True, 0.1, 1e-5, "leaky_relu", 0.1, strategy, residual=r)
    z.backward(dz)
    assert xi.grad is not None


def test_inplace_writes_over_x_and_leaves_the_residual_alone():
    x, r, dz, w, b = _inputs()
    want = _run("standard", "leaky_relu", 0.1, x, r, dz, w, b)
    got = _run("inplace_abn", "leaky_relu", 0.1, x, r, dz, w, b, inplace=True)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10)
    xi = x.clone().requires_grad_()
    src = xi * 1
    r_before = r.clone()
    z = batch_norm_act(src, None, None, w, b, True, 0.1, 1e-5, "leaky_relu", 0.1, "inplace_abn", True, residual=r)
    assert z.data_ptr() == src.data_ptr() and torch.equal(r, r_before)
    with pytest.raises(ValueError, match="^ckptnorm: inplace=True would overwrite the residual"):
        y = x.clone()
        batch_norm_act(y, None, None, w, b, True, 0.1, 1e-5, "leaky_relu", 0.1, "inplace_abn", True, residual=y)


def test_residual_errors():
    x, r, dz, w, b = _inputs()
    with pytest.raises(ValueError, match="^ckptnorm: residual must match the input.*tip:"):
        batch_norm_act(x, None, None, w, b, True, residual=r[:, :2])
    with pytest.raises(ValueError, match="^ckptnorm: residual must match the input"):
        batch_norm_act(x, None, None, w, b, True, residual=r.float())
    with pytest.raises(TypeError, match="^ckptnorm: residual must be a torch.Tensor"):
        batch_norm_act(x, None, None, w, b, True, residual=r.numpy())


def test_inplace_abn_falls_back_when_the_residual_dwarfs_gamma():
    """y = phi^-1(z) - r carries r's rounding: a residual much larger than |gamma| makes inplace_abn keep x."""
    x, r, dz, w, b = _inputs(torch.float32)
    big = r * 100.0
    with pytest.warns(PrecisionFallbackWarning, match="max\\|residual\\|"):
        got = _run("inplace_abn", "leaky_relu", 0.1, x, big, dz, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionFallbackWarning)
        _run("inplace_abn", "leaky_relu", 0.1, x, r, dz, w, b)  # |r| ~ 3 vs gamma ~ 1: no fallback
    truth = _run("standard", "leaky_relu", 0.1, *(t.double() for t in (x, big, dz, w, b)))
    for g, t in zip(got[1:5], truth[1:5]):
        assert float((g.double() - t).norm() / t.norm()) < 1e-5


# -- a post-activation block: exact bytes kept -----------------------------------------------------------------------
class PostActBlock(nn.Module):
    """conv -> BN -> leaky -> conv -> BN -> + r -> leaky, followed by a 1x1 conv that keeps the block output."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, r):
        out = self.bn2(self.conv2(F.leaky_relu(self.bn1(self.conv1(r)), 0.01)))
        return self.head(F.leaky_relu(out + r, 0.01))


@pytest.mark.parametrize("strategy,buffers", [("standard", 5), ("checkpoint", 3), ("efficient_checkpoint", 3),
                                              ("inplace_abn", 3)])
def test_postact_block_saved_bytes(strategy, buffers):
    """Per buffer B (the block input r included): standard keeps r, x1, z1, x2, z2; the recompute strategies keep
    r, x1, x2 (z2's recipe holds x2 and r, both kept anyway); inplace_abn keeps r, z1, z2."""
    torch.manual_seed(0)
    model = convert(PostActBlock(8), strategy)
    assert model.ckptnorm_report[1].reason.startswith("residual site: add and activation fused")
    r = torch.randn(2, 8, 16, 16, requires_grad=True)
    inp = r * 1  # the block input as an activation (not a leaf the counter excludes)
    with SavedTensorsCounter(exclude=[model, r]) as counter:
        out = model(inp)
    buffer = inp.numel() * inp.element_size()
    assert counter.saved_bytes // buffer == buffers
    assert counter.saved_bytes - buffers * buffer < buffer // 16  # the rest: per-channel statistics
    out.sum().backward()


# -- convert on a post-activation ResNet with projection shortcuts --------------------------------------------------
def _randomized(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model


def test_postact_resnet_sites():
    sites = {s.name: s for s in find_sites(postact_resnet(depth=8, width=4))}
    assert sites["layer1.0.bn2"].fused_residual and sites["layer1.0.bn2"].activation.name == "leaky_relu"
    # layer2.0: the projection shortcut (a Sequential ending in a BN) is r; bn2 takes the site, in the block's graph
    assert sites["layer2.0.bn2"].fused_residual and sites["layer2.0.bn2"].owner == "layer2.0"
    assert sites["layer2.0.bn2"].residual_node == "shortcut"  # the call of the shortcut module
    assert not sites["layer2.0.shortcut.1"].residual and sites["layer2.0.shortcut.1"].activation.name == "identity"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_postact_resnet_converted_gradients_match(strategy):
    torch.manual_seed(0)
    model = _randomized(postact_resnet(depth=8, width=4)).double()
    conv = convert(model, strategy)
    assert all(d.applied == strategy for d in conv.ckptnorm_report)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    grads = []
    trained = copy.deepcopy(model)
    for m in (trained, conv):
        m.train()
        F.cross_entropy(m(x), torch.arange(3)).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
        m.eval()
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(conv(x), trained(x), rtol=1e-10, atol=0)  # running statistics updated alike
    torch.testing.assert_close(conv.state_dict()["layer2.0.bn2.running_var"],
                               trained.state_dict()["layer2.0.bn2.running_var"])


def test_postact_resnet_recompute_and_inplace_abn_keep_one_buffer_per_site():
    """At residual sites too, efficient_checkpoint keeps x (z's recipe holds x and r) and inplace_abn keeps z: the
    two differ by per-channel statistics only (efficient_checkpoint keeps the mean as well)."""
    torch.manual_seed(0)
    model = postact_resnet(depth=8, width=8)
    x = torch.randn(2, 3, 16, 16)
    saved = {}
    for strategy in ("standard", "efficient_checkpoint", "inplace_abn"):
        conv = convert(model, strategy)
        with SavedTensorsCounter(exclude=[conv, x]) as counter:
            loss = conv(x).sum()
        saved[strategy] = counter.saved_bytes
        loss.backward()
    channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert saved["efficient_checkpoint"] - saved["inplace_abn"] == channels * 8  # the float64 mean per channel
    assert saved["efficient_checkpoint"] < 0.6 * saved["standard"]


# -- a stage of residual blocks: the chain of recipes (rule 6 of _recompute) ------------------------------------------
class ReluBlock(PostActBlock):
    """conv -> BN -> leaky -> conv -> BN -> +r -> ReLU, without the head: ReLU after the add is not invertible
    (timm's TResNet)."""

    def __init__(self, c):
        super().__init__(c)
        del self.head

    def forward(self, r):
        out = self.bn2(self.conv2(F.leaky_relu(self.bn1(self.conv1(r)), 0.01)))
        return F.relu(out + r)


def _stage(blocks, c=4):
    torch.manual_seed(0)
    return _randomized(nn.Sequential(*[ReluBlock(c) for _ in range(blocks)], nn.Conv2d(c, c, 1, bias=False)))


def _saved_buffers(model, shape=(2, 4, 8, 8), dtype=torch.float32):
    r = torch.randn(shape, dtype=dtype, requires_grad=True)
    inp = r * 1
    with SavedTensorsCounter(exclude=[model, r]) as counter:
        out = model(inp)
    buffer = inp.numel() * inp.element_size()
    out.sum().backward()
    return counter.saved_bytes / buffer


@pytest.mark.parametrize("strategy", ["checkpoint", "efficient_checkpoint"])
def test_residual_chain_keeps_one_buffer_per_site(strategy):
    """n blocks keep the stage input and x1, x2 per block: 1 + 2n buffers, not 1 + 3n (without the chain: each
    block's output kept as well) nor the original's 1 + 5n (x1, y1 and z1 of the out-of-place leaky_relu, x2, z2)."""
    blocks = 5
    conv = convert(_stage(blocks), strategy)
    assert sum(d.reason.startswith("residual site") for d in conv.ckptnorm_report) == blocks
    assert int(_saved_buffers(conv)) == 1 + 2 * blocks
    assert int(_saved_buffers(_stage(blocks))) == 1 + 5 * blocks


def test_residual_chain_longer_than_the_bound_keeps_one_output_in_so_many(monkeypatch):
    from ckptnorm.torch import _recompute
    monkeypatch.setattr(_recompute, "MAX_RESIDUAL_CHAIN", 2)
    blocks = 5  # chain depths 1, 2, 3 (over the bound: its output is kept, the next chain starts), 1, 2
    assert int(_saved_buffers(convert(_stage(blocks), "efficient_checkpoint"))) == 1 + 2 * blocks + 1


@pytest.mark.parametrize("bound", [16, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_residual_chain_gradients_equal_the_original_in_float64(strategy, bound, monkeypatch):
    """The whole gradient, outputs and running statistics of a 4-block stage, recomputed through the chain (and
    through a chain cut by the bound), equal the unconverted stage's in float64."""
    from ckptnorm.torch import _recompute
    monkeypatch.setattr(_recompute, "MAX_RESIDUAL_CHAIN", bound)
    model = _stage(4).double()
    conv = convert(model, strategy)  # inplace_abn: the ReLU sites fall back to efficient_checkpoint
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads, outs = [], []
    for m in (model, conv):
        m.train()
        out = m(x * 1)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        outs.append(out.detach())
    assert (grads[1] - grads[0]).norm() <= 1e-10 * grads[0].norm()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for name, buf in model.state_dict().items():
        torch.testing.assert_close(conv.state_dict()[name], buf, rtol=1e-12, atol=1e-12)


def test_module_takes_a_residual():
    layer = BatchNormAct2d(4, activation="leaky_relu", strategy="inplace_abn")
    x, r, dz, w, b = _inputs(torch.float32)
    torch.testing.assert_close(layer(x, r), F.leaky_relu(F.batch_norm(x, None, None, layer.weight, layer.bias,
                                                                      True) + r, 0.01), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_kernels_through_the_adapter(strategy, channels_last):
    """Residual sites on the CUDA backend (simulated on CPU tensors without a GPU) equal the CPU backend's."""
    from ckptnorm.torch import use_backend
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, r, dz, w, b = (t.to(device) for t in _inputs(channels_last=channels_last, shape=(2, 3, 3, 4)))
    act, param = ("leaky_relu", 0.1)
    want = _run("standard", act, param, x, r, dz, w, b)
    with use_backend("cuda"):
        got = _run(strategy, act, param, x, r, dz, w, b, inplace=strategy == "inplace_abn")
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10)


def test_plan_on_a_postact_resnet_fits_its_budget_as_measured():
    from ckptnorm.torch import Plan, plan
    torch.manual_seed(0)
    model = postact_resnet(depth=8, width=4)
    x = torch.randn(2, 3, 8, 8)
    result = plan(model, x, 0.7, repeats=1)
    assert result.measured_bytes is not None and result.measured_bytes <= result.budget_bytes
    conv = result.apply(model)
    from ckptnorm.torch.harness import saved_bytes  # the step the planner measures (forward and loss)
    assert saved_bytes(conv.train(), (x,)) == result.measured_bytes
    assert Plan.from_json(result.to_json()).measured_bytes == result.measured_bytes
    assert "plan (measured)" in str(result)


@pytest.mark.parametrize("slots", [0, 2])
def test_backward_reuses_recent_chain_outputs(slots, monkeypatch):
    """Rule 7: each block's output is recomputed for the next block's residual site and again for its first conv,
    and the walk passes the block before on its way.  Holding the last two recomputed outputs makes the walks of a
    5-block stage (and its head) cost 9 residual-site recomputations instead of 25 (n^2 with none held), and never
    holds more than two."""
    from ckptnorm.torch import _recompute
    monkeypatch.setattr(_recompute, "RECENT_CHAIN_OUTPUTS", slots)
    computed, most_held = [0], [0]
    real = _recompute.HookState.hold_recent

    def counting(self, recipe, z):
        computed[0] += 1
        real(self, recipe, z)
        most_held[0] = max(most_held[0], sum(r() is not None and r().held is not None for r in self._thread.recent))

    monkeypatch.setattr(_recompute.HookState, "hold_recent", counting)
    model = convert(_stage(5).double(), "efficient_checkpoint")
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    model(x * 1).square().sum().backward()
    assert computed[0] == (9 if slots else 25) and most_held[0] == slots
