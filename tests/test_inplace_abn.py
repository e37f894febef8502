"""inplace_abn specifics: writing over x, and the precision fallback that keeps x instead of a wrong gradient."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from ckptnorm import PrecisionFallbackWarning, get_activation, reference
from ckptnorm.strategies import InplaceABN
from ckptnorm.torch import BatchNormAct2d, SavedTensorsCounter


def make_layer(gamma, beta, activation="leaky_relu", param=0.01, inplace=False, dtype=torch.float32):
    layer = BatchNormAct2d(len(gamma), strategy="inplace_abn", activation=activation, activation_param=param,
                           inplace=inplace, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(gamma))
        layer.bias.copy_(torch.as_tensor(beta))
    return layer


def run(layer, x, dz):
    """Forward + backward on a non-leaf copy of x; returns z, dx, dgamma, dbeta, the input tensor, saved bytes."""
    leaf = x.clone().requires_grad_()
    inp = leaf * 1
    with SavedTensorsCounter(exclude=[layer, leaf]) as counter:
        z = layer(inp)
    z.backward(dz)
    return z, leaf.grad, layer.weight.grad, layer.bias.grad, inp, counter.saved_bytes


def reference_grads(x, dz, gamma, beta, activation="leaky_relu", param=0.01):
    fwd = reference.forward(x.double().numpy(), None, None, np.asarray(gamma, float), np.asarray(beta, float),
                            activation=activation, activation_param=param)
    return fwd.z, reference.backward(dz.double().numpy(), fwd, np.asarray(gamma, float), np.asarray(beta, float),
                                     activation=activation, activation_param=param)


def rel(a, b):
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else a
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_inplace_true_overwrites_x_and_keeps_only_z():
    g = torch.Generator().manual_seed(0)
    x, dz = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    gamma, beta = [1.0, 0.7, -1.2], [0.1, -0.3, 0.2]
    z_out, dx_out, dg_out, db_out, inp_out, bytes_out = run(make_layer(gamma, beta, inplace=False), x, dz)
    z_in, dx_in, dg_in, db_in, inp_in, bytes_in = run(make_layer(gamma, beta, inplace=True), x, dz)
    assert z_in.data_ptr() == inp_in.data_ptr()  # written over x
    assert z_out.data_ptr() != inp_out.data_ptr()
    torch.testing.assert_close(inp_in, z_in)
    for a, b in ((z_in, z_out), (dx_in, dx_out), (dg_in, dg_out), (db_in, db_out)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same kernels, same order: same bits
    assert bytes_in == bytes_out == x.numel() * 4 + 3 * 8  # z + float64 1/sigma


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("gamma0", [0.0, 1e-4])
def test_small_gamma_falls_back_to_keeping_x(gamma0, inplace):
    g = torch.Generator().manual_seed(1)
    x, dz = torch.randn(8, 3, 6, 6, generator=g) + 2.0, torch.randn(8, 3, 6, 6, generator=g)
    gamma, beta = [gamma0, 1.0, 0.8], [0.5, 0.1, -0.2]
    with pytest.warns(PrecisionFallbackWarning, match="ckptnorm: inplace_abn keeps x for this call: channel 0") \
            as record:
        z, dx, dgamma, dbeta, inp, saved = run(make_layer(gamma, beta, inplace=inplace), x, dz)
    assert record[0].filename == __file__  # the line that called the layer (in run), not autograd's
    z_ref, (dx_ref, dg_ref, db_ref) = reference_grads(x, dz, gamma, beta)
    assert rel(z, z_ref) < 1e-6 and rel(dx, dx_ref) < 1e-5
    assert rel(dgamma, dg_ref) < 1e-5 and rel(dbeta, db_ref) < 1e-5
    assert torch.isfinite(dgamma).all()
    assert saved == x.numel() * 4 + 2 * 3 * 8  # x (a copy when inplace) + float64 mean and 1/sigma
    if inplace:
        torch.testing.assert_close(inp, z)


def test_fallback_threshold_is_needed():
    """What the fallback prevents: from fp32 z, dgamma of a channel with |beta/gamma| = 500 is far off."""
    g = torch.Generator().manual_seed(2)
    x, dz = torch.randn(16, 2, 8, 8, generator=g), torch.randn(16, 2, 8, 8, generator=g)
    gamma, beta = np.array([1e-3, 1.0]), np.array([0.5, 0.5])
    fwd = reference.forward(x.double().numpy(), None, None, gamma, beta, activation="leaky_relu",
                            activation_param=0.01, strategy="inplace_abn")
    exact = reference.backward(dz.double().numpy(), fwd, gamma, beta, activation="leaky_relu",
                               activation_param=0.01, strategy="inplace_abn")
    fwd.kept["z"] = fwd.kept["z"].astype(np.float32).astype(np.float64)  # what an fp32 z really holds
    rounded = reference.backward(dz.double().numpy(), fwd, gamma, beta, activation="leaky_relu",
                                 activation_param=0.01, strategy="inplace_abn")
    err = np.abs(rounded[1] - exact[1]) / np.abs(exact[1])
    unit = 2.0 ** -24
    assert err[0] > 64 * unit and err[0] > 30 * max(err[1], unit)  # channel 0 lost 6+ bits; channel 1 is fine
    leaky = get_activation("leaky_relu")
    assert InplaceABN().fallback_reason(None, None, None, gamma, beta, leaky, None, None, None, None)
    assert not InplaceABN().fallback_reason(None, None, None, np.array([1.0]), np.array([30.0]), leaky, None, None,
                                            None, None)


def test_elu_keeps_z_only_while_its_inverse_is_accurate():
    g = torch.Generator().manual_seed(3)
    x, dz = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    # beta = +1: y >= 1 - 1 * max|xhat| > -3.47, the inverse is accurate, no fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionFallbackWarning)
        z, dx, dgamma, dbeta, _, saved = run(make_layer([1.0, 0.8], [1.0, 1.0], "elu", 1.0), x, dz)
    assert saved == x.numel() * 4 + 2 * 8
    z_ref, (dx_ref, dg_ref, db_ref) = reference_grads(x, dz, [1.0, 0.8], [1.0, 1.0], "elu", 1.0)
    assert rel(dx, dx_ref) < 1e-5 and rel(dgamma, dg_ref) < 1e-5
    # gamma = 3: y reaches about -8, where exp(-y) amplifies z's rounding 3000x: keep x
    with pytest.warns(PrecisionFallbackWarning, match="ELU"):
        z, dx, dgamma, dbeta, _, saved = run(make_layer([3.0, 0.8], [0.0, 1.0], "elu", 1.0), x, dz)
    assert saved == x.numel() * 4 + 2 * 2 * 8
    z_ref, (dx_ref, dg_ref, db_ref) = reference_grads(x, dz, [3.0, 0.8], [0.0, 1.0], "elu", 1.0)
    assert rel(dx, dx_ref) < 1e-5 and rel(dgamma, dg_ref) < 1e-5


def test_eval_mode_elu_check_uses_the_data_range():
    """In eval mode (running statistics) the fallback keeps x -- not only a warning: the saved bytes show x and the
    mean -- and the gradient is the float64 reference's (from z, exp(-y) would amplify z's rounding ~1e10 times
    here); with data above the floor z alone is kept."""
    layer = make_layer([3.0], [0.0], "elu", 1.0).eval()
    g = torch.Generator().manual_seed(4)
    x, dz = torch.randn(4, 1, 5, 5, generator=g) * 3, torch.randn(4, 1, 5, 5, generator=g)
    with pytest.warns(PrecisionFallbackWarning):
        _, dx, _, _, _, saved = run(layer, x, dz)
    assert saved == x.numel() * 4 + 2 * 8  # x (not z), float64 mean and 1/sigma: as efficient_checkpoint
    y = 3.0 * x.double() / math.sqrt(1.0 + 1e-5)  # running mean 0, var 1
    dx_ref = 3.0 / math.sqrt(1.0 + 1e-5) * dz.double() * torch.where(y > 0, 1.0, torch.exp(y))
    assert rel(dx, dx_ref.numpy()) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionFallbackWarning)
        _, _, _, _, _, saved = run(layer, x.abs() * 0.1, dz)  # pre-activations >= 0: no fallback
    assert saved == x.numel() * 4 + 8  # z and 1/sigma only


@pytest.mark.parametrize("activation,param", [("celu", 1.0), ("celu", 0.5), ("selu", None)])
def test_celu_selu_keep_z_only_while_the_inverse_is_accurate(activation, param):
    """celu and selu invert through log1p like elu: z only above the floor of the pre-activation (-ln 32 for selu,
    -alpha ln 32 for celu, whose exponential runs in units of alpha), x kept below it."""
    g = torch.Generator().manual_seed(5)
    x, dz = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    xd = x.double()
    xhat_min = ((xd - xd.mean((0, 2, 3), keepdim=True)) / xd.var((0, 2, 3), unbiased=False, keepdim=True).sqrt()
                ).amin((0, 2, 3)).numpy()
    floor = -math.log(32) * (param if activation == "celu" else 1.0)
    gamma = np.array([1.0, 0.8])
    # lowest pre-activation gamma * xhat_min + beta: half a unit above the floor, then half a unit below it
    for margin, falls_back in ((0.5, False), (-0.5, True)):
        beta = floor + margin - gamma * xhat_min
        layer = make_layer(gamma, beta, activation, param)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            z, dx, dgamma, dbeta, _, saved = run(layer, x, dz)
        fallbacks = [w for w in caught if issubclass(w.category, PrecisionFallbackWarning)]
        assert bool(fallbacks) == falls_back, [str(w.message) for w in fallbacks]
        if falls_back:
            assert f"{activation.upper()}'s inverse" in str(fallbacks[0].message)
            assert f"< {floor:.3g}" in str(fallbacks[0].message)
        assert saved == x.numel() * 4 + (2 * 2 * 8 if falls_back else 2 * 8)  # z [+ x's mean] + 1/sigma
        z_ref, (dx_ref, dg_ref, db_ref) = reference_grads(x, dz, gamma, beta, activation, param)
        assert rel(z, z_ref) < 1e-6
        assert rel(dx, dx_ref) < 1e-5 and rel(dgamma, dg_ref) < 1e-5 and rel(dbeta, db_ref) < 1e-5


def test_celu_selu_inplace_true_z_only():
    """inplace=True with celu and selu: z written over x, and the backward really runs from z alone."""
    g = torch.Generator().manual_seed(6)
    x, dz = torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 3, 6, 6, generator=g)
    gamma, beta = [1.0, 0.7, -1.2], [1.0, 1.5, 2.0]
    for activation, param in (("celu", 2.0), ("selu", None)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrecisionFallbackWarning)
            z, dx, dgamma, dbeta, inp, saved = run(make_layer(gamma, beta, activation, param, inplace=True), x, dz)
        assert z.data_ptr() == inp.data_ptr() and saved == x.numel() * 4 + 3 * 8
        z_ref, (dx_ref, dg_ref, db_ref) = reference_grads(x, dz, gamma, beta, activation, param)
        assert rel(dx, dx_ref) < 1e-5 and rel(dgamma, dg_ref) < 1e-5 and rel(dbeta, db_ref) < 1e-5
