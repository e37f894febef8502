"""Framework-agnostic core: activations, strategy registry, the float64 reference (no torch needed here)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import ckptnorm
from ckptnorm import Activation, get_activation, get_strategy, reference
from ckptnorm.strategies import Checkpoint, EfficientCheckpoint, InplaceABN, Standard, Strategy

STRATEGIES = ["standard", "checkpoint", "efficient_checkpoint", "inplace_abn"]


def test_import_without_torch():
    """``import ckptnorm`` (and the reference, the CPU backend) must work where torch is not installed."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` raise ImportError
        "import ckptnorm, ckptnorm.reference, ckptnorm.backends, ckptnorm.planning\n"
        "import numpy as np\n"
        "be = ckptnorm.backends.get_backend('cpu')\n"
        "m, v, lo, hi = be.channel_stats(np.arange(24.0).reshape(2, 3, 4), 'ncs')\n"
        "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'\n"
        "plan = ckptnorm.planning.solve({'a': {'standard': (0, 0.0), 'checkpoint': (-5, 1.0)}}, 10, 1.0, 6)\n"
        "assert plan.strategies == {'a': 'checkpoint'}, plan.strategies\n"
        "print('ok', m[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok 7.5")


def test_backend_registry():
    from ckptnorm.backends import Backend, backend_names, get_backend, register_backend
    assert get_backend("cpu") is get_backend("cpu")  # the shared default instance
    assert {"cpu", "cuda"} <= set(backend_names())
    with pytest.raises(ValueError, match="^ckptnorm: no backend called 'tpu'; tip: use one of cpu, cuda"):
        get_backend("tpu")

    class Recording(type(get_backend("cpu"))):
        def __init__(self, tag="default"):
            self.tag = tag

    register_backend("recording", Recording)
    try:
        assert isinstance(get_backend("recording"), Backend) and get_backend("recording").tag == "default"
        assert get_backend("recording", tag="per call").tag == "per call"  # options: a new instance
        assert get_backend("recording") is get_backend("recording")
    finally:
        from ckptnorm import backends
        backends._FACTORIES.pop("recording"), backends._DEFAULTS.pop("recording", None)


def test_cpu_backend_rejects_an_unknown_layout():
    act = get_activation("silu")
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="^ckptnorm: unknown layout 'nhwc'; tip:"):
        ckptnorm.backends.get_backend("cpu").normalize_act(x, x, "nhwc", np.zeros(3), np.ones(3), np.zeros(3), act)


def test_old_models_module_warns_and_forwards():
    pytest.importorskip("torch")
    import ckptnorm.models
    from ckptnorm.torch import models
    with pytest.warns(DeprecationWarning, match="ckptnorm.models.get_model moved to ckptnorm.torch.models"):
        assert ckptnorm.models.get_model is models.get_model
    with pytest.raises(AttributeError):
        ckptnorm.models.no_such_model


def test_import_is_light():
    code = "import sys, ckptnorm; print('numba' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_cuda_kernels_import_from_a_source_checkout():
    """Run from the working tree without ``pip install`` (PYTHONPATH=., as on a lent GPU machine), ``src_cuda/`` is
    ``ckptnorm._cuda``: simulated here by removing the editable install's finder before the first import."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        f"sys.path.insert(0, {root!r})\n"
        "import ckptnorm\n"
        "assert 'numba' not in sys.modules\n"
        "import ckptnorm._cuda.geometry as geometry\n"
        "print(geometry.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, NUMBA_ENABLE_CUDASIM="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.join(root, "src_cuda", "geometry.py")
    finder = ckptnorm._source_checkout.SourceTreeCuda(os.path.join(root, "src_cuda"))
    spec = finder.find_spec("ckptnorm._cuda")
    assert spec.origin == os.path.join(root, "src_cuda", "__init__.py")
    assert spec.submodule_search_locations == [os.path.join(root, "src_cuda")]
    assert finder.find_spec("ckptnorm.other") is None  # no other module is redirected


# -- activations -------------------------------------------------------------------------------------------------
ALL_ACTS = [("identity", None), ("leaky_relu", 0.01), ("leaky_relu", 0.2), ("elu", 1.0), ("elu", 0.5),
            ("relu", None), ("silu", None), ("gelu", None), ("celu", 1.0), ("celu", 0.5), ("selu", None),
            ("relu6", None), ("hardswish", None), ("hardsigmoid", None), ("mish", None), ("gelu_tanh", None),
            ("tanh", None), ("sigmoid", None)]
# kinks of the piecewise activations, where no finite difference converges
KINKS = np.array([-3.0, 0.0, 3.0, 6.0])


@pytest.mark.parametrize("name,param", ALL_ACTS)
def test_activation_derivative_matches_finite_difference(name, param):
    act = get_activation(name, param)
    y = np.linspace(-8, 8, 1601)
    y = y[np.abs(y[:, None] - KINKS).min(axis=1) > 1e-3]  # away from the kinks
    h = 1e-6
    numeric = (act.forward(y + h) - act.forward(y - h)) / (2 * h)
    # hardsigmoid: PyTorch's slope is the float32 1/6 (3e-8 off), which the tolerance allows
    np.testing.assert_allclose(act.derivative(y), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name,param", [a for a in ALL_ACTS if get_activation(*a).invertible])
def test_activation_inverse(name, param):
    act = get_activation(name, param)
    y = np.linspace(-8, 8, 1601) * (param if name == "celu" else 1.0)  # celu: exp(y / alpha)
    z = act.forward(y)
    np.testing.assert_allclose(act.inverse(z), y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(act.derivative_from_output(z), act.derivative(y), rtol=1e-12, atol=1e-15)


def test_activation_invertibility_and_aliases():
    assert [get_activation(n, p).invertible for n, p in ALL_ACTS] == [True, True, True, True, True, False, False,
                                                                      False, True, True, True] + [False] * 7
    assert not get_activation("leaky_relu", 0.0).invertible
    assert not get_activation("leaky_relu", -0.1).invertible
    assert not get_activation("elu", 0.0).invertible
    assert not get_activation("celu", -0.5).invertible
    assert get_activation("hard-swish") == get_activation("hswish") == Activation("hardswish")
    assert get_activation("gelu_approx_tanh").name == "gelu_tanh"
    assert get_activation("LeakyReLU") == Activation("leaky_relu", 0.01)
    assert get_activation("lrelu", 0.1) == Activation("leaky_relu", 0.1)
    assert get_activation(None) == get_activation("none") == Activation("identity")
    assert get_activation("swish").name == "silu"
    assert get_activation(Activation("elu", 2.0)).param == 2.0
    with pytest.raises(ValueError, match=r"^ckptnorm: unknown activation 'prelu'.*tip:"):
        get_activation("prelu")
    with pytest.raises(ValueError, match="ckptnorm: .*not invertible.*tip:"):
        get_activation("relu").inverse(np.zeros(3))


# -- strategies --------------------------------------------------------------------------------------------------
def test_registry_names_aliases_classes_instances():
    assert ckptnorm.STRATEGY_NAMES == tuple(STRATEGIES)
    for spec, cls in [("standard", Standard), ("native", Standard), ("ckpt", Checkpoint),
                      ("Efficient-Checkpoint", EfficientCheckpoint), ("efficient", EfficientCheckpoint),
                      ("inplace", InplaceABN), ("inplace-abn", InplaceABN), (InplaceABN, InplaceABN),
                      (Checkpoint(), Checkpoint)]:
        assert isinstance(get_strategy(spec), cls), spec
    custom = Checkpoint()
    assert get_strategy(custom) is custom
    with pytest.raises(ValueError, match=r"^ckptnorm: unknown strategy 'fast'; tip: use one of standard"):
        get_strategy("fast")
    with pytest.raises(TypeError, match="^ckptnorm: .*tip:"):
        get_strategy(3)


def test_strategies_declare_what_they_keep():
    s = {name: get_strategy(name) for name in STRATEGIES}
    assert s["checkpoint"].keeps == ("x",) and "mean" in s["checkpoint"].recomputes
    assert s["efficient_checkpoint"].keeps == ("x", "mean", "invstd")
    assert "mean" not in " ".join(s["efficient_checkpoint"].recomputes)
    assert s["inplace_abn"].keeps == ("z", "invstd")
    assert [s[n].requires_invertible for n in STRATEGIES] == [False, False, False, True]
    assert [s[n].may_overwrite_input for n in STRATEGIES] == [False, False, False, True]
    assert [s[n].rematerializes_output for n in STRATEGIES] == [False, True, True, False]
    assert all(isinstance(v, Strategy) for v in s.values())


# -- the float64 reference ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name,param", [("identity", None), ("leaky_relu", 0.1), ("elu", 1.0), ("celu", 0.5),
                                        ("selu", None)])
def test_reference_strategies_agree(name, param, training):
    """The xhat-free inplace_abn backward and the recompute paths equal the textbook backward (design note check)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5, 6)) * 2 + 1
    dz = rng.standard_normal(x.shape)
    gamma, beta = rng.uniform(0.5, 1.5, 4) * np.array([1, -1, 1, 1]), rng.uniform(-0.5, 0.5, 4)
    rm, rv = rng.standard_normal(4) * 0.1, rng.uniform(0.5, 1.5, 4)
    results = {}
    for strategy in STRATEGIES:
        fwd = reference.forward(x, rm, rv, gamma, beta, training=training, activation=name, activation_param=param,
                                strategy=strategy)
        results[strategy] = (fwd.z,) + reference.backward(dz, fwd, gamma, beta, training=training, activation=name,
                                                          activation_param=param, strategy=strategy)
    for strategy in STRATEGIES[1:]:
        for got, want in zip(results[strategy], results["standard"]):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_reference_running_stats_momentum_none_is_cumulative_average():
    rng = np.random.default_rng(1)
    rm, rv, nbt = np.zeros(3), np.ones(3), 0
    batches = [rng.standard_normal((8, 3)) * (i + 1) + i for i in range(4)]
    for x in batches:
        fwd = reference.forward(x, rm, rv, momentum=None, num_batches_tracked=nbt)
        rm, rv, nbt = fwd.running_mean, fwd.running_var, fwd.num_batches_tracked
    assert nbt == 4
    np.testing.assert_allclose(rm, np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-12)
    np.testing.assert_allclose(rv, np.mean([b.var(0, ddof=1) for b in batches], axis=0), rtol=1e-12)


def test_reference_keeps_what_the_strategy_keeps():
    x = np.random.default_rng(2).standard_normal((4, 3))
    kept = {s: set(reference.forward(x, strategy=s).kept) for s in STRATEGIES}
    assert kept == {"standard": {"x", "mean", "invstd"}, "checkpoint": {"x"},
                    "efficient_checkpoint": {"x", "mean", "invstd"}, "inplace_abn": {"z", "invstd"}}
