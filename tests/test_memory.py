"""What each strategy keeps for backward: exact saved bytes, an RSS measurement from outside the library, and
running statistics updated exactly once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import ckptnorm
from ckptnorm.torch import BatchNormAct2d, SavedTensorsCounter

STRATEGIES = ckptnorm.STRATEGY_NAMES
N, C, H, W = 2, 8, 16, 16
F32 = 4
A = N * 3 * H * W * F32   # block input, kept by the first conv
B = N * C * H * W * F32   # one activation-sized buffer
PER_CHANNEL_FP32 = C * F32
PER_CHANNEL_FP64 = C * 8

# leaky_relu / identity / ELU (in place in the native path): BN keeps x and fp32 save_mean/save_invstd, and the
# following conv keeps z.  The other strategies keep x once (the conv's z becomes a recipe built from that x, or,
# for inplace_abn, z is what both keep) plus their per-channel float64 statistics.
EXPECTED = {
    "standard": A + 2 * B + 2 * PER_CHANNEL_FP32,
    "checkpoint": A + B,
    "efficient_checkpoint": A + B + 2 * PER_CHANNEL_FP64,
    "inplace_abn": A + B + PER_CHANNEL_FP64,
}


def make_net(strategy, activation="leaky_relu", param=0.01, inplace=False, bn_bias=None, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1),
        BatchNormAct2d(C, activation=activation, activation_param=param, strategy=strategy, inplace=inplace),
        nn.Conv2d(C, 4, 3, padding=1),
    )
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.2, 0.2) if bn_bias is None else net[1].bias.fill_(bn_bias)
    return net


def make_input(channels_last=False, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(N, 3, H, W)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def saved_bytes_and_grads(net, x):
    with SavedTensorsCounter(exclude=net) as counter:
        out = net(x)
    saved = counter.saved_bytes
    torch.manual_seed(2)
    (out * torch.randn_like(out)).sum().backward()
    return saved, {name: p.grad.clone() for name, p in net.named_parameters()}


def assert_grads_close(got, ref, rtol=1e-4):
    overall = max(g.abs().max().item() for g in ref.values())
    for name in ref:
        scale = ref[name].abs().max().item()
        if scale < 1e-3 * overall:  # zero in exact arithmetic (the conv bias before BN): rounding noise only
            scale = overall
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=rtol * scale, msg=name)


# -- exact saved bytes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["nchw", "channels_last", "inplace"])
def test_saved_bytes_leaky_relu(variant):
    channels_last = variant == "channels_last"
    results = {}
    for strategy in STRATEGIES:
        inplace = variant == "inplace" and strategy == "inplace_abn"
        if variant == "inplace" and not inplace and strategy != "standard":
            continue
        net = make_net(strategy, inplace=inplace)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ckptnorm.PrecisionFallbackWarning)
            results[strategy] = saved_bytes_and_grads(net, make_input(channels_last))
    std_bytes, std_grads = results["standard"]
    for strategy, (saved, grads) in results.items():
        assert saved == EXPECTED[strategy], (strategy, saved, EXPECTED[strategy])
        if strategy != "standard":
            # exactly one activation-sized buffer less, up to the per-channel statistics
            assert abs((std_bytes - saved) - B) <= 2 * PER_CHANNEL_FP64, (strategy, std_bytes, saved)
            assert_grads_close(grads, std_grads)


@pytest.mark.parametrize("strategy", ["standard", "checkpoint", "efficient_checkpoint", "inplace_abn"])
def test_saved_bytes_identity(strategy):
    net = make_net(strategy, activation="identity", param=None)
    saved, grads = saved_bytes_and_grads(net, make_input())
    # identity: BN's output is z; the conv keeps it, BN keeps x -- the same as leaky_relu
    assert saved == EXPECTED[strategy]
    _, std_grads = saved_bytes_and_grads(make_net("standard", activation="identity", param=None), make_input())
    assert_grads_close(grads, std_grads)


@pytest.mark.parametrize("strategy", ["standard", "checkpoint", "efficient_checkpoint"])
def test_saved_bytes_silu(strategy):
    net = make_net(strategy, activation="silu", param=None)
    saved, grads = saved_bytes_and_grads(net, make_input())
    # native SiLU is not in place: standard keeps x (BN), y (SiLU) and z (conv); the others are unchanged
    expected = {"standard": A + 3 * B + 2 * PER_CHANNEL_FP32}.get(strategy, EXPECTED[strategy])
    assert saved == expected
    _, std_grads = saved_bytes_and_grads(make_net("standard", activation="silu", param=None), make_input())
    assert_grads_close(grads, std_grads)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_saved_bytes_elu(strategy):
    # beta = 2 keeps every pre-activation well above ELU's precision floor (-ln 32): no inplace_abn fallback
    net = make_net(strategy, activation="elu", param=1.0, bn_bias=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckptnorm.PrecisionFallbackWarning)
        saved, grads = saved_bytes_and_grads(net, make_input())
    assert saved == EXPECTED[strategy]
    _, std_grads = saved_bytes_and_grads(make_net("standard", activation="elu", param=1.0, bn_bias=2.0),
                                         make_input())
    assert_grads_close(grads, std_grads)


@pytest.mark.parametrize("inplace", [False, True])
def test_saved_bytes_elu_inplace_abn_precision_fallback(inplace):
    # beta = -3 pushes some pre-activation below -ln 32: inplace_abn keeps x (a copy when inplace) plus mean and
    # invstd for this call, and the conv keeps z -- one buffer more than usual, the price of an accurate gradient.
    net = make_net("inplace_abn", activation="elu", param=1.0, bn_bias=-3.0, inplace=inplace)
    with pytest.warns(ckptnorm.PrecisionFallbackWarning, match="inplace_abn keeps x"):
        saved, grads = saved_bytes_and_grads(net, make_input())
    assert saved == A + 2 * B + 2 * PER_CHANNEL_FP64
    _, std_grads = saved_bytes_and_grads(make_net("standard", activation="elu", param=1.0, bn_bias=-3.0),
                                         make_input())
    assert_grads_close(grads, std_grads)


# -- outside-the-library measurement: process RSS -------------------------------------------------------------------
RSS_SCRIPT = textwrap.dedent("""
    import gc, json, os, sys
    import torch
    from torch import nn
    from ckptnorm.torch import BatchNormAct2d

    torch.set_num_threads(1)
    N, C, H, W = 4, 64, 128, 128            # one activation buffer: 16 MiB in float32
    PAGE = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    torch.manual_seed(0)
    x = torch.randn(N, 3, H, W)
    held = {}
    for strategy in sys.argv[1:]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, C, 1), BatchNormAct2d(C, strategy=strategy), nn.Conv2d(C, 4, 1))
        for _ in range(2):                  # warm-up: JIT, allocator, gradient buffers
            net(x).sum().backward()
        samples = []
        for _ in range(3):
            gc.collect()
            before = rss()
            out = net(x)                    # output and graph (with whatever it keeps) stay alive
            samples.append(rss() - before)
            out.sum().backward()
            del out
        held[strategy] = min(samples)
    print(json.dumps({"buffer": N * C * H * W * 4, "held": held}))
""")


@pytest.mark.serial  # process RSS
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_rss_held_after_forward():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *STRATEGIES], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    buffer, held = report["buffer"], report["held"]
    assert buffer >= 16 * 2 ** 20
    # standard holds x and z (plus the small conv output)
    assert held["standard"] >= 1.7 * buffer, report
    for strategy in ("checkpoint", "efficient_checkpoint", "inplace_abn"):
        saving = held["standard"] - held[strategy]
        assert 0.7 * buffer <= saving <= 1.3 * buffer, (strategy, report)


# -- running statistics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("strategy, inplace, rerun", [(s, False, r) for s in STRATEGIES for r in (False, True)]
                         + [("inplace_abn", True, False)])
def test_running_stats_updated_once(strategy, inplace, momentum, rerun):
    """Once per forward, also when backward recomputes: the consumer (a square) keeps z, so a rematerializing
    strategy's recipe runs in backward, and under torch.utils.checkpoint (``rerun``) the whole forward runs again
    there.  (Not inplace=True under torch.utils.checkpoint: writing over the checkpoint's own input breaks its
    re-run for any in-place op, PyTorch's included.)"""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W) * 3 + 1
    ref = nn.BatchNorm2d(C, momentum=momentum)
    ref(x)
    m = BatchNormAct2d(C, momentum=momentum, strategy=strategy, inplace=inplace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckptnorm.PrecisionFallbackWarning)
        a = x.clone().requires_grad_()
        out = checkpoint(m, a * 1.0, use_reentrant=False) if rerun else m(a * 1.0)
        (out * out).sum().backward()
    assert int(m.num_batches_tracked) == 1
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-6, atol=1e-7)
    if momentum is not None:  # and not twice: a second update would move them visibly further
        ref(x)
        assert (m.running_var - ref.running_var).abs().max() > 1e-2
    # eval mode and a second training step behave like nn.BatchNorm2d too
    m.eval(), ref.eval()
    before = (m.running_mean.clone(), m.running_var.clone())
    m(x)
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])
    assert int(m.num_batches_tracked) == 1


# -- nothing activation-sized held by the autograd node outside save_for_backward ------------------------------------
def _tensors_held(obj, seen=None, depth=0):
    """Every tensor reachable from ``obj`` through attributes, __slots__, containers and weak references' targets
    (not through saved_tensors: what save_for_backward keeps is counted by SavedTensorsCounter)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6 or isinstance(obj, (str, bytes, int, float, type, nn.Module)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    children = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        for cls in type(obj).__mro__:
            children += [getattr(obj, s, None) for s in getattr(cls, "__slots__", ()) if isinstance(s, str)]
    return [t for child in children for t in _tensors_held(child, seen, depth + 1)]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("strategy, inplace", [(s, False) for s in STRATEGIES] + [("inplace_abn", True)])
def test_autograd_node_holds_no_activation_outside_save_for_backward(strategy, inplace, channels_last, residual):
    """The exact byte counts see save_for_backward only; a tensor kept as an attribute of the node (ctx) would be
    memory they miss.  Walk what the node holds besides its saved tensors: nothing activation-sized, in every
    strategy, layout, in place or not, with a residual or not."""
    from ckptnorm.torch import batch_norm_act
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W) * 2 + 0.5
    r = torch.randn(N, C, H, W) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        r = None if r is None else r.contiguous(memory_format=torch.channels_last)
    w, b = (torch.rand(C) + 0.5).requires_grad_(), (torch.rand(C) * 0.1).requires_grad_()
    a = x.clone().requires_grad_()
    z = batch_norm_act(a * 1.0, torch.zeros(C), torch.ones(C), w, b, True, 0.1, 1e-5, "leaky_relu", 0.01, strategy,
                       inplace, residual=r)
    node = z.grad_fn
    held = [t for t in _tensors_held(node) if t.numel() >= x.numel()]
    assert not held, f"{len(held)} activation-sized tensor(s) held by {type(node).__name__} outside save_for_backward"
    z.sum().backward()
