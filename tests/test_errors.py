"""Bad inputs get a clear ckptnorm error ("ckptnorm: ..." with a "tip: ..."), and misuse never yields silently
wrong gradients."""
from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from torch import nn

import ckptnorm
from ckptnorm.torch import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, batch_norm_act

STRATEGIES = ckptnorm.STRATEGY_NAMES
RECOMPUTING = ("checkpoint", "efficient_checkpoint")
MODULES = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
NON_INVERTIBLE = [("relu", None), ("silu", None), ("gelu", None), ("leaky_relu", 0.0), ("leaky_relu", -0.1),
                  ("elu", 0.0), ("elu", -1.0)]
C = 4


@pytest.fixture(autouse=True)
def no_hooks_left_behind():
    """Tests start and end with no default saved-tensor hooks (ckptnorm pops its own once its outputs die)."""
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    yield
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        gc.collect()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


@contextlib.contextmanager
def ck_raises(exc, match):
    """pytest.raises plus: the message is ckptnorm's own and says what to do instead."""
    with pytest.raises(exc, match=match) as info:
        yield info
    msg = str(info.value)
    assert msg.startswith("ckptnorm:"), msg
    assert "tip:" in msg, msg


def bna(x, *, channels=C, training=True, running=True, affine=True, **kw):
    """Functional call with per-channel tensors matching ``channels`` (each overridable through ``kw``)."""
    args = dict(
        running_mean=torch.zeros(channels, dtype=x.dtype) if running else None,
        running_var=torch.ones(channels, dtype=x.dtype) if running else None,
        weight=torch.ones(channels, dtype=x.dtype) if affine else None,
        bias=torch.zeros(channels, dtype=x.dtype) if affine else None,
        training=training, activation="leaky_relu", activation_param=0.01)
    args.update(kw)
    return batch_norm_act(x, **args)


# -- shapes -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims, shape", [
    (1, (C,)), (1, (2, C, 3, 3)), (1, (2, C, 3, 3, 3)),
    (2, (2, C)), (2, (2, C, 3)), (2, (2, C, 3, 3, 3)),
    (3, (2, C)), (3, (2, C, 3)), (3, (2, C, 3, 3)),
])
@pytest.mark.parametrize("strategy", ["standard", "efficient_checkpoint"])
def test_wrong_ndim_module(dims, shape, strategy):
    m = MODULES[dims](C, strategy=strategy)
    with ck_raises(ValueError, match=rf"{MODULES[dims].__name__} expects .*got a {len(shape)}-D input"):
        m(torch.randn(*shape))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_wrong_ndim_functional(strategy):
    with ck_raises(ValueError, match=r"shape \(N, C, \.\.\.\), got 1-D"):
        bna(torch.randn(C), strategy=strategy)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_channel_count_mismatch_module(dims, strategy):
    m = MODULES[dims](C, strategy=strategy)
    x = torch.randn(2, C + 1, *([3] * dims))
    with ck_raises(ValueError, match=rf"input has {C + 1} channels but weight has shape \({C},\)"):
        m(x)
    # without affine parameters the running statistics reveal the mismatch
    m = MODULES[dims](C, affine=False, strategy=strategy)
    with ck_raises(ValueError, match=rf"input has {C + 1} channels but running_mean has shape"):
        m(x)
    with ck_raises(ValueError, match=r"running_mean has shape"):
        m.eval()(x)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_channel_count_mismatch_functional(strategy):
    x = torch.randn(2, C, 3, 3)
    for name in ("weight", "bias", "running_mean", "running_var"):
        kw = {name: torch.ones(C + 2)}
        with ck_raises(ValueError, match=rf"input has {C} channels but {name} has shape \({C + 2},\)"):
            bna(x, strategy=strategy, **kw)
    with ck_raises(ValueError, match=r"weight has shape \(1, 4\)"):
        bna(x, strategy=strategy, weight=torch.ones(1, C))


@pytest.mark.parametrize("dims, shape", [(1, (1, C)), (1, (1, C, 1)), (2, (1, C, 1, 1)), (3, (1, C, 1, 1, 1))])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_value_per_channel_in_training(dims, shape, strategy):
    m = MODULES[dims](C, strategy=strategy)
    with ck_raises(ValueError, match=r"more than 1 value per channel when training"):
        m(torch.randn(*shape))
    with ck_raises(ValueError, match=r"more than 1 value per channel"):
        bna(torch.randn(*shape), strategy=strategy)
    # eval mode uses the running statistics: one value per channel is fine there
    out = m.eval()(torch.randn(*shape))
    assert out.shape == shape


# -- dtypes and devices -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64,
                                   torch.complex128])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_floating_input(dtype, strategy):
    x = torch.ones(2, C, 3, 3, dtype=dtype)
    with ck_raises(TypeError, match=r"needs a floating-point input, got " + str(dtype).replace(".", r"\.")):
        BatchNormAct2d(C, strategy=strategy)(x)
    with ck_raises(TypeError, match=r"floating-point input"):
        bna(x, strategy=strategy, running=False, affine=False)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_parameter_dtype_mismatch(strategy):
    x = torch.randn(2, C, 3, 3)
    with ck_raises(TypeError, match=r"weight is torch\.float64 but the input is torch\.float32"):
        bna(x, strategy=strategy, weight=torch.ones(C, dtype=torch.float64))
    with ck_raises(TypeError, match=r"running_var is torch\.float16 but the input is torch\.float32"):
        bna(x, strategy=strategy, running_var=torch.ones(C, dtype=torch.float16))
    with ck_raises(TypeError, match=r"weight is torch\.float64 but the input is torch\.float32; tip: convert"):
        BatchNormAct2d(C, strategy=strategy).double()(x)
    with ck_raises(TypeError, match=r"weight is torch\.float64 but the input is torch\.bfloat16"):
        bna(x.bfloat16(), strategy=strategy, weight=torch.ones(C, dtype=torch.float64))


@pytest.mark.parametrize("strategy", ["checkpoint", "efficient_checkpoint", "inplace_abn"])
def test_unsupported_float_dtype(strategy):
    x = torch.randn(2, C, 3, 3).to(torch.float8_e5m2)
    with ck_raises(TypeError, match=r"torch\.float8_e5m2 inputs are not supported"):
        bna(x, strategy=strategy, running=False, affine=False)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_parameter_device_mismatch(strategy):
    x = torch.randn(2, C, 3, 3)
    with ck_raises(ValueError, match=r"weight is on meta but the input is on cpu; tip: move the module"):
        bna(x, strategy=strategy, weight=torch.ones(C, device="meta"))
    with ck_raises(ValueError, match=r"running_mean is on meta"):
        bna(x, strategy=strategy, running_mean=torch.zeros(C, device="meta"))
    with ck_raises(ValueError, match=r"is on meta but the input is on cpu"):
        BatchNormAct2d(C, strategy=strategy, device="meta")(x)


@pytest.mark.parametrize("strategy", ["checkpoint", "efficient_checkpoint", "inplace_abn"])
def test_non_cpu_input_for_kernel_strategies(strategy):
    # Only a CPU backend exists: another device is refused with a ckptnorm error (the meta device stands in here).
    m = BatchNormAct2d(C, strategy=strategy, device="meta")
    with ck_raises(NotImplementedError, match=r"strategy='standard'"):
        m(torch.randn(2, C, 3, 3, device="meta"))


# -- strategy and activation names -------------------------------------------------------------------------------------
def test_unknown_strategy():
    with ck_raises(ValueError, match=r"unknown strategy 'fast'; tip: use one of standard, checkpoint"):
        ckptnorm.get_strategy("fast")
    with ck_raises(ValueError, match=r"unknown strategy"):
        BatchNormAct2d(C, strategy="inplace-abn-v2")
    with ck_raises(ValueError, match=r"unknown strategy"):
        bna(torch.randn(2, C, 3, 3), strategy="")
    for spec in (3, None, 1.5, nn.Module, ["standard"]):
        with ck_raises(TypeError, match=r"a strategy is a name, a Strategy class or instance"):
            ckptnorm.get_strategy(spec)
    with ck_raises(TypeError, match=r"got int"):
        BatchNormAct2d(C, strategy=3)
    # names are forgiving: case, dashes and aliases, classes and instances
    assert ckptnorm.get_strategy(" Efficient-Checkpoint ").name == "efficient_checkpoint"
    assert ckptnorm.get_strategy("iabn").name == "inplace_abn"
    assert ckptnorm.get_strategy(ckptnorm.Checkpoint).name == "checkpoint"
    assert ckptnorm.get_strategy(ckptnorm.Standard()).name == "standard"


def test_unknown_activation():
    with ck_raises(ValueError, match=r"unknown activation 'softsign'; tip: use one of identity, leaky_relu"):
        ckptnorm.get_activation("softsign")
    with ck_raises(ValueError, match=r"unknown activation 'prelu'"):
        BatchNormAct2d(C, activation="prelu")
    with ck_raises(ValueError, match=r"unknown activation"):
        bna(torch.randn(2, C, 3, 3), activation="softsign")
    for spec in (3, 1.0, nn.ReLU(), torch.relu):
        with ck_raises(TypeError, match=r"activation must be a name or an Activation"):
            ckptnorm.get_activation(spec)
    assert ckptnorm.get_activation("LeakyReLU", 0.2) == ckptnorm.Activation("leaky_relu", 0.2)
    assert ckptnorm.get_activation(None).name == "identity"


@pytest.mark.parametrize("act, param", NON_INVERTIBLE)
def test_inplace_abn_needs_invertible_activation(act, param):
    with ck_raises(ValueError, match=r"strategy 'inplace_abn' needs an invertible activation.*tip: use identity"):
        BatchNormAct2d(C, activation=act, activation_param=param, strategy="inplace_abn")
    with ck_raises(ValueError, match=r"needs an invertible activation"):
        BatchNormAct2d(C, activation=act, activation_param=param, strategy=ckptnorm.InplaceABN, inplace=True)
    a = torch.randn(2, C, 3, 3, requires_grad=True)
    with ck_raises(ValueError, match=r"needs an invertible activation"):
        bna(a * 1.0, activation=act, activation_param=param, strategy="inplace_abn")
    with ck_raises(ValueError, match=r"needs an invertible activation"):
        bna(a * 1.0, activation=act, activation_param=param, strategy=ckptnorm.InplaceABN(), inplace=True)
    # the same activation is fine with the other strategies
    for strategy in ("standard", "checkpoint", "efficient_checkpoint"):
        BatchNormAct2d(C, activation=act, activation_param=param, strategy=strategy)


@pytest.mark.parametrize("act, param", [("identity", None), ("leaky_relu", 0.01), ("leaky_relu", 1e-6),
                                        ("elu", 1.0), ("elu", 0.1)])
def test_inplace_abn_accepts_invertible_activation(act, param):
    m = BatchNormAct2d(C, activation=act, activation_param=param, strategy="inplace_abn", inplace=True)
    assert m(torch.randn(2, C, 3, 3)).shape == (2, C, 3, 3)


# -- numeric arguments and flags ------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eps_must_be_positive(eps, strategy):
    with ck_raises(ValueError, match=r"eps must be positive.*tip: use the default 1e-5"):
        BatchNormAct2d(C, eps=eps, strategy=strategy)
    with ck_raises(ValueError, match=r"eps must be positive"):
        bna(torch.randn(2, C, 3, 3), eps=eps, strategy=strategy)
    with ck_raises(ValueError, match=r"eps must be positive"):
        bna(torch.randn(2, C, 3, 3), eps=eps, strategy=strategy, training=False)


def test_inplace_on_leaf_requiring_grad():
    leaf = torch.randn(2, C, 3, 3, requires_grad=True)
    with ck_raises(RuntimeError, match=r"inplace=True would overwrite a leaf tensor that requires grad"):
        bna(leaf, strategy="inplace_abn", inplace=True)
    with ck_raises(RuntimeError, match=r"leaf tensor that requires grad; tip: use inplace=False"):
        BatchNormAct2d(C, strategy="inplace_abn", inplace=True)(leaf)
    assert leaf.grad_fn is None and leaf._version == 0  # left untouched
    # a leaf that does not require grad may be overwritten (like nn.ReLU(inplace=True))
    data = torch.randn(2, C, 3, 3)
    out = BatchNormAct2d(C, strategy="inplace_abn", inplace=True)(data)
    assert out.data_ptr() == data.data_ptr()


@pytest.mark.parametrize("strategy", ["standard", "checkpoint", "efficient_checkpoint"])
def test_inplace_needs_inplace_strategy(strategy):
    with ck_raises(ValueError, match=rf"inplace=True is only meaningful with strategy='inplace_abn', got '{strategy}'"):
        BatchNormAct2d(C, strategy=strategy, inplace=True)
    a = torch.randn(2, C, 3, 3, requires_grad=True)
    with ck_raises(ValueError, match=r"tip: drop inplace=True"):
        bna(a * 1.0, strategy=strategy, inplace=True)


def test_inplace_needs_supported_layout():
    a = torch.randn(2, C, 3, 5, requires_grad=True)
    x = (a * 1.0).transpose(2, 3)  # neither NCHW-contiguous nor channels_last
    with ck_raises(ValueError, match=r"inplace=True needs an NCHW-contiguous or channels_last input"):
        bna(x, strategy="inplace_abn", inplace=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eval_without_running_stats(strategy):
    with ck_raises(ValueError, match=r"eval mode \(training=False\) needs running statistics"):
        bna(torch.randn(2, C, 3, 3), strategy=strategy, training=False, running=False)


# -- misuse after forward: an error, never silently wrong gradients ---------------------------------------------------
@pytest.mark.parametrize("act, param", [("leaky_relu", 0.01), ("identity", None), ("elu", 1.0)])
def test_reuse_of_an_input_overwritten_by_inplace_abn(act, param):
    a = torch.randn(2, C, 3, 3, requires_grad=True)
    x = a * 2
    w = x.pow(2)  # keeps x for its backward
    z = bna(x, strategy="inplace_abn", inplace=True, activation=act, activation_param=param)
    assert z.data_ptr() == x.data_ptr()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (w.sum() + z.sum()).backward()


def test_inplace_abn_inplace_gradients_match_out_of_place():
    torch.manual_seed(0)
    a = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, C, 3, 3, dtype=torch.float64)
    grads = []
    for inplace in (False, True):
        a.grad = None
        z = bna(a * 2, strategy="inplace_abn", inplace=inplace)
        (z * g).sum().backward()
        grads.append(a.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def _keep_hooks_alive():
    """An efficient_checkpoint output that requires grad: while it lives, ckptnorm's saved-tensor hooks are on."""
    keep = bna(torch.randn(2, C, 3, 3, requires_grad=True) * 1.0, strategy="efficient_checkpoint")
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    return keep


@pytest.mark.parametrize("hooks_already_on", [False, True], ids=["first-layer", "later-layer"])
@pytest.mark.parametrize("strategy", RECOMPUTING)
def test_input_modified_in_place_after_forward(strategy, hooks_already_on):
    torch.manual_seed(0)
    keep = _keep_hooks_alive() if hooks_already_on else None
    conv = nn.Conv2d(C, 3, 3, padding=1)
    a = torch.randn(2, C, 5, 5, requires_grad=True)
    x = a * 2
    z = BatchNormAct2d(C, strategy=strategy)(x)
    out = conv(z)  # keeps z (as a recipe built from x)
    del z
    x.mul_(3)      # not shift-invariant: a recomputation from this x would give a different z
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation|ckptnorm: the input .* was modified in "
                                           r"place"):
        out.sum().backward()
    del keep


def _backward_outcome(build, strategy=None):
    """With ckptnorm's hooks kept on, run ``build(strategy)`` -> loss and its backward: "raised" if autograd or
    ckptnorm reported the in-place modification, else "silent".  Every tensor lives and dies in this frame, so a
    failing test's traceback keeps none of them (nor ckptnorm's hooks) alive."""
    keep = _keep_hooks_alive()
    loss = build(strategy)
    try:
        loss.backward()
    except RuntimeError as e:
        if "modified by an inplace operation" in str(e) or "modified in place" in str(e):
            return "raised"
        raise
    finally:
        del keep, loss
    return "silent"


def _input_modified_no_consumer(strategy):
    a = torch.randn(2, C, 5, 5, requires_grad=True)
    x = a * 2
    z = bna(x, strategy=strategy)
    g = torch.randn_like(z)
    x.mul_(3)
    return (z * g).sum()  # no op keeps z: the only guard is the version check of the x the Function saved


def _unrelated_in_place_misuse(_):
    b = torch.randn(5, requires_grad=True)
    s = torch.sigmoid(b)  # keeps its output
    s.mul_(3)             # plain PyTorch raises in backward; with ckptnorm's hooks on, b.grad is silently wrong
    return s.sum()


@pytest.mark.parametrize("strategy", RECOMPUTING)
def test_input_modified_in_place_after_forward_no_consumer(strategy):
    torch.manual_seed(0)
    assert _backward_outcome(_input_modified_no_consumer, strategy) == "raised"


def test_unrelated_in_place_misuse_still_detected_while_ckptnorm_hooks_are_on():
    assert _backward_outcome(_unrelated_in_place_misuse) == "raised"


def test_unrelated_in_place_misuse_detected_without_ckptnorm_hooks():
    # the control: same misuse, no ckptnorm output alive
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _unrelated_in_place_misuse(None).backward()


# -- every message says what to do instead ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["running_mean_only", "non_finite_activation_param", "non_tensor_input"])
def test_remaining_errors_have_a_tip(case):
    calls = {
        "running_mean_only": (ValueError, lambda: bna(torch.randn(2, C, 3, 3), running_var=None)),
        "non_finite_activation_param": (ValueError, lambda: ckptnorm.get_activation("elu", float("nan"))),
        "non_tensor_input": (TypeError, lambda: batch_norm_act([[1.0, 2.0]], None, None, training=True)),
    }
    exc, call = calls[case]
    with ck_raises(exc, match=r"ckptnorm:"):
        call()


def test_output_modified_in_place_after_a_consumer_saved_it():
    """A consumer keeps a recipe for z; z changed in place afterwards must raise, as autograd would."""
    for strategy in ("checkpoint", "efficient_checkpoint"):
        conv = torch.nn.Conv2d(C, C, 1)
        z = bna(torch.randn(2, C, 5, 5, requires_grad=True) * 1, strategy=strategy)
        out = conv(z)
        z.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("strategy", ["checkpoint", "efficient_checkpoint", "inplace_abn"])
def test_second_derivative_raises(strategy):
    """The Function's backward records no graph: under create_graph its first-order gradients are PyTorch's, and
    differentiating them again raises a ckptnorm error (strategy, channels, what to do) instead of giving a wrong
    answer."""
    torch.manual_seed(0)
    x = torch.randn(4, C, 3, 3, dtype=torch.float64)
    dz = torch.randn_like(x).requires_grad_()  # a gradient that itself depends on parameters
    grads = []
    for strat in ("standard", strategy):
        layer = BatchNormAct2d(C, dtype=torch.float64, strategy=strat)
        xs = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(layer(xs), xs, dz, create_graph=True)
        grads.append(gx)
    torch.testing.assert_close(grads[1], grads[0])
    assert grads[1].requires_grad
    with ck_raises(RuntimeError, match=f"second derivative through a BatchNormAct layer \\({strategy}, {C} channels"):
        grads[1].sum().backward()
