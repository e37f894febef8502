"""Site discovery (``find_sites``) and model conversion (``convert``)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckptnorm.torch import (
    BatchNormAct1d,
    BatchNormAct2d,
    ConversionReport,
    SiteDiscoveryWarning,
    convert,
    find_sites,
)

STRATEGIES = ["standard", "checkpoint", "efficient_checkpoint", "inplace_abn"]


# -- models ---------------------------------------------------------------------------------------------------------
def sequential_model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.PReLU(),
        nn.Conv2d(5, 5, 1), nn.BatchNorm2d(5))


class PreActBlock(nn.Module):
    """BN -> LeakyReLU -> conv, twice; the block input feeds both bn1 and the identity shortcut."""

    def __init__(self, c):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.LeakyReLU(0.01)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(self.act1(self.bn1(x)))
        out = self.conv2(F.leaky_relu(self.bn2(out), 0.01, inplace=True))
        return out + x


class PreActResNet(nn.Module):
    def __init__(self, c=4, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(PreActBlock(c), PreActBlock(c))
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        out = self.layer1(self.stem(x))
        out = F.elu(self.bn(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Bottleneck(nn.Module):
    """torchvision-style: one ReLU module called three times, ``out += identity`` before the last one."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class PostActResNet(nn.Module):
    def __init__(self, c=4, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(Bottleneck(c), Bottleneck(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        out = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.LeakyReLU(0.2), nn.Linear(5, 5),
                                      nn.BatchNorm1d(5), nn.ELU())
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = self.features(x)
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


def randomize_bn(model, seed=0):
    """Non-trivial gamma/beta/running statistics (gamma away from 0, as inplace_abn's precision check wants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def make(cls, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return randomize_bn(cls(), seed).to(dtype)


def by_name(sites):
    return {s.name: s for s in sites}


def decisions(converted):
    return {d.name: d for d in converted.ckptnorm_report}


def max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# -- site discovery -------------------------------------------------------------------------------------------------
def test_sites_sequential():
    sites = by_name(find_sites(sequential_model()))
    assert list(sites) == ["1", "4", "7", "10"]
    # a module called once right after its BN: swapped for Identity (no code rewritten)
    assert sites["1"].activation.name == "relu" and sites["1"].activation_node == "2" and sites["1"].fuse == "swap"
    assert sites["4"].activation.describe() == "leaky_relu(0.1)"
    assert sites["7"].activation.name == "identity" and sites["7"].fuse == ""  # PReLU has a parameter: not fused
    assert sites["7"].activation_node is None
    assert sites["10"].activation.name == "identity" and sites["10"].activation_node is None
    assert all(s.bn_type is nn.BatchNorm2d and s.traced and not s.residual and s.owner == ""
               for s in sites.values())
    assert [s.channels for s in sites.values()] == [4, 4, 5, 5]
    assert not any(s.input_has_other_readers for s in sites.values())  # each fed by a conv, read by the BN only
    assert all(s.input_shape is None for s in sites.values())
    lo, hi = sites["1"].gamma_range
    assert lo == hi == 1.0


def test_sites_preact_resnet_shapes_and_readers():
    model = make(PreActResNet, dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 5, 5)
    sites = by_name(find_sites(model, x))
    assert list(sites) == ["layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2", "bn"]
    for b in ("layer1.0", "layer1.1"):
        assert sites[f"{b}.bn1"].input_has_other_readers  # also feeds the shortcut
        assert not sites[f"{b}.bn2"].input_has_other_readers  # conv1's output, BN only
        assert sites[f"{b}.bn1"].activation.describe() == "leaky_relu(0.01)"
        assert sites[f"{b}.bn2"].activation.describe() == "leaky_relu(0.01)"  # functional, inplace=True
    assert sites["bn"].activation.describe() == "elu(1)"
    assert not sites["bn"].input_has_other_readers  # a fresh add output whose only reader is bn
    assert all(s.input_shape == (2, 4, 5, 5) for s in sites.values())
    lo, hi = sites["bn"].gamma_range
    assert 0.5 <= lo <= hi <= 1.5
    after = model.state_dict()  # shape propagation must not touch the running statistics
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


def test_sites_postact_shared_relu_and_residual():
    sites = by_name(find_sites(PostActResNet()))
    assert list(sites) == ["bn1"] + [f"layer1.{i}.bn{j}" for i in range(2) for j in (1, 2, 3)]
    for i in range(2):
        for j in (1, 2):
            s = sites[f"layer1.{i}.bn{j}"]
            assert s.activation.name == "relu" and not s.residual and s.activation_node is not None
        s = sites[f"layer1.{i}.bn3"]
        assert s.residual and s.fused_residual and s.activation.name == "relu" and s.activation_node is not None
        assert s.residual_activation.name == "relu" and s.add_node is not None
    assert sites["layer1.0.bn3"].residual_node == "x"  # r: the block's input, in the block's own graph
    assert sites["bn1"].fuse == "swap"  # the stem's relu is called once
    # one relu module, three call nodes in the block: each site names its own node, and the block is rewritten
    nodes = [sites[f"layer1.0.bn{j}"].activation_node for j in (1, 2)]
    assert len(set(nodes)) == 2
    assert all(sites[f"layer1.0.bn{j}"].fuse == "rewrite" and sites[f"layer1.0.bn{j}"].owner == "layer1.0"
               for j in (1, 2, 3))


# -- conversion -----------------------------------------------------------------------------------------------------
def test_convert_sequential_model():
    model = make(sequential_model)
    conv = convert(model, "efficient_checkpoint")
    assert type(conv) is nn.Sequential and "forward" not in vars(conv)  # no code rewritten
    assert isinstance(conv.get_submodule("1"), BatchNormAct2d) and conv.get_submodule("1").activation == "relu"
    assert isinstance(conv[2], nn.Identity) and isinstance(conv[5], nn.Identity) and isinstance(conv[8], nn.PReLU)
    assert conv.get_submodule("4").activation_param == pytest.approx(0.1)
    assert conv.get_submodule("7").activation == "identity"
    assert isinstance(model[1], nn.BatchNorm2d) and type(model[1]) is nn.BatchNorm2d  # original untouched
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    model.eval(), conv.eval()
    torch.testing.assert_close(conv(x), model(x), rtol=1e-10, atol=0)


def test_postact_shared_relu_module_kept():
    model = make(PostActResNet)
    conv = convert(model, "efficient_checkpoint")
    assert type(conv) is PostActResNet and isinstance(conv.layer1[0], Bottleneck)  # classes kept
    assert isinstance(conv.get_submodule("layer1.0.relu"), nn.ReLU)  # the shared module is still there ...
    assert conv.ckptnorm_report.rewritten == ("layer1.0", "layer1.1")  # ... and the blocks' forwards rewritten
    code = conv.layer1[0].forward.source
    assert "relu" not in code and "add" not in code  # every activation, the residual ones too, is fused
    assert "bn3(" in code and code.count("bn3(") == 1
    bn3 = conv.get_submodule("layer1.0.bn3")
    assert isinstance(bn3, BatchNormAct2d) and bn3.activation == "relu"
    assert isinstance(conv.relu, nn.Identity)  # the stem's relu, called once: swapped
    assert "forward" not in vars(conv)  # the model's own forward is untouched
    reason = decisions(conv)["layer1.0.bn3"].reason
    assert reason == "residual site: add and activation fused"  # and nothing contradicting it


def test_strategy_forms():
    model = make(PreActResNet)
    names = [s.name for s in find_sites(model)]
    # a name
    conv = convert(model, "inplace")  # alias
    assert {d.applied for d in conv.ckptnorm_report} == {"inplace_abn"}
    assert all(d.requested == "inplace_abn" for d in conv.ckptnorm_report)
    # a dict: first match wins, "*" is the default wherever it stands
    conv = convert(model, {"*": "checkpoint", "layer1.0.*": "inplace_abn", "layer1.*.bn2": "standard"})
    applied = {d.name: d.applied for d in conv.ckptnorm_report}
    assert applied == {"layer1.0.bn1": "inplace_abn", "layer1.0.bn2": "inplace_abn", "layer1.1.bn1": "checkpoint",
                       "layer1.1.bn2": "standard", "bn": "checkpoint"}
    # a dict without "*": unmatched sites stay plain BN
    conv = convert(model, {"layer1.1.bn?": "efficient_checkpoint"})
    assert type(conv.get_submodule("bn")) is nn.BatchNorm2d
    assert type(conv.get_submodule("layer1.0.bn1")) is nn.BatchNorm2d
    assert isinstance(conv.get_submodule("layer1.1.bn1"), BatchNormAct2d)
    d = decisions(conv)
    assert d["bn"].applied is None and d["bn"].requested is None
    # a callable receiving the Site
    seen = []

    def choose(site):
        seen.append(site)
        return None if site.name == "bn" else ("inplace_abn" if not site.input_has_other_readers
                                               else "efficient_checkpoint")
    conv = convert(model, choose)
    assert [s.name for s in seen] == names
    assert all(s.channels == 4 and s.gamma_range is not None for s in seen)
    applied = {d.name: (d.applied, d.inplace) for d in conv.ckptnorm_report}
    assert applied == {"layer1.0.bn1": ("efficient_checkpoint", False), "layer1.0.bn2": ("inplace_abn", True),
                       "layer1.1.bn1": ("efficient_checkpoint", False), "layer1.1.bn2": ("inplace_abn", True),
                       "bn": (None, False)}
    text = str(conv.ckptnorm_report)
    assert isinstance(conv.ckptnorm_report, ConversionReport)
    assert "layer1.0.bn2" in text and "4 of 5 sites converted" in text
    # bad strategies
    with pytest.raises(ValueError, match="^ckptnorm: unknown strategy"):
        convert(model, "fastest")
    with pytest.raises(ValueError, match="ckptnorm: unknown strategy"):
        convert(model, lambda site: "nope")
    with pytest.raises(ValueError, match="^ckptnorm: inplace must be"):
        convert(model, "standard", inplace="yes")


def test_auto_inplace_never_overwrites_a_shortcut_input():
    model = make(PreActResNet)
    for inplace in ("auto", True):
        d = decisions(convert(model, "inplace_abn", inplace=inplace))
        for b in ("layer1.0", "layer1.1"):
            assert d[f"{b}.bn1"].inplace is False and "other readers" in d[f"{b}.bn1"].reason
            assert d[f"{b}.bn2"].inplace is True
        assert d["bn"].inplace is True  # the last block's add output: read by bn only
    assert "inplace=True not applied" in decisions(convert(model, "inplace_abn", inplace=True))["layer1.0.bn1"].reason
    d = decisions(convert(model, "inplace_abn", inplace=False))
    assert not any(x.inplace for x in d.values())
    conv = convert(model, "inplace_abn")
    assert conv.get_submodule("layer1.0.bn2").inplace and not conv.get_submodule("layer1.0.bn1").inplace


def test_non_invertible_activation_falls_back_or_raises():
    model = make(PostActResNet)
    conv = convert(model, "inplace_abn")
    d = decisions(conv)
    for name in ("bn1", "layer1.0.bn1", "layer1.1.bn2", "layer1.0.bn3"):  # bn3: relu after the residual add
        assert d[name].requested == "inplace_abn" and d[name].applied == "efficient_checkpoint"
        assert "invertible" in d[name].reason
        assert conv.get_submodule(name).strategy == "efficient_checkpoint"
    assert "efficient_checkpoint" in str(conv.ckptnorm_report)
    with pytest.raises(ValueError) as info:
        convert(model, "inplace_abn", strict=True)
    msg = str(info.value)
    assert msg.startswith("ckptnorm: site 'bn1'") and "tip:" in msg.rsplit(";", 1)[-1]
    convert(model, {"layer1.*.bn3": "checkpoint", "*": "efficient_checkpoint"}, strict=True)  # valid everywhere


@pytest.mark.parametrize("cls", [PreActResNet, PostActResNet])
def test_pretrained_state_dict_round_trip(cls):
    pretrained = make(cls, seed=1)
    pretrained.train()
    pretrained(torch.randn(4, 3, 5, 5, dtype=torch.float64)).sum().backward()  # num_batches_tracked = 1
    conv = convert(make(cls, seed=2), "inplace_abn")
    assert list(conv.state_dict()) == list(pretrained.state_dict())
    conv.load_state_dict(pretrained.state_dict(), strict=True)
    back = make(cls, seed=3)
    back.load_state_dict(conv.state_dict(), strict=True)
    for k, v in pretrained.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    pretrained.eval(), conv.eval()
    torch.testing.assert_close(conv(x), pretrained(x), rtol=1e-10, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cls", [PreActResNet, PostActResNet])
def test_eval_outputs_equal(cls, strategy):
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        model = make(cls, dtype=dtype).eval()
        conv = convert(model, strategy)
        assert not conv.training and not conv.get_submodule("layer1.0.bn1").training
        x = torch.randn(3, 3, 5, 5, dtype=dtype)
        with torch.no_grad():
            ref = model(x)
            out = conv(x)
        assert max_rel(out, ref) <= rtol, (dtype, max_rel(out, ref))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cls", [PreActResNet, PostActResNet])
def test_training_gradients_and_running_stats_equal(cls, strategy):
    model = make(cls).train()
    conv = convert(model, strategy)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    target = torch.randn(4, 3, dtype=torch.float64)
    for net in (model, conv):
        F.mse_loss(net(x), target).backward()
    grads = dict(model.named_parameters())
    for name, p in conv.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    ref_state = model.state_dict()
    for name, v in conv.state_dict().items():  # running stats and num_batches_tracked updated alike
        torch.testing.assert_close(v, ref_state[name], rtol=1e-10, atol=0, msg=name)
    assert int(conv.state_dict()["layer1.0.bn1.num_batches_tracked"]) == 1


def test_frozen_bn_parameters_stay_frozen():
    model = make(PreActResNet)
    model.bn.weight.requires_grad_(False)
    conv = convert(model, "efficient_checkpoint")
    assert not conv.get_submodule("bn").weight.requires_grad
    assert conv.get_submodule("bn").bias.requires_grad


@pytest.mark.slow  # about 19 s cold; test_convert has other fallback cases in the quick tier
def test_untraceable_model_falls_back_to_sequential():
    torch.manual_seed(0)
    model = randomize_bn(Untraceable()).double()
    with pytest.warns(SiteDiscoveryWarning, match="ckptnorm: torch.fx tracing of Untraceable failed") as record:
        sites = by_name(find_sites(model))
    assert record[0].filename == __file__  # the caller's line, not ckptnorm's
    assert list(sites) == ["features.1", "features.4"]
    # the Sequential traces on its own: its sites are fused; the root's forward is unknown code
    assert sites["features.1"].activation.describe() == "leaky_relu(0.2)" and sites["features.1"].traced
    assert sites["features.1"].activation_node == "features.2" and sites["features.1"].fuse == "swap"
    assert "not traced" in sites["features.4"].in_place_writer  # the Sequential's output goes to that code
    assert not sites["features.4"].input_has_other_readers
    with pytest.warns(SiteDiscoveryWarning):
        conv = convert(model, "inplace_abn")
    assert type(conv) is Untraceable
    assert isinstance(conv.features[1], BatchNormAct1d) and isinstance(conv.features[2], nn.Identity)
    assert isinstance(conv.features[4], BatchNormAct1d) and conv.features[4].activation == "elu"
    # inplace_abn would keep an output that untraced code might modify in place: efficient_checkpoint instead
    assert conv.features[1].strategy == "inplace_abn" and conv.features[4].strategy == "efficient_checkpoint"
    assert "not traced" in decisions(conv)["features.4"].reason
    assert isinstance(model.features[2], nn.LeakyReLU)  # original untouched
    assert list(conv.state_dict()) == list(model.state_dict())
    x = torch.randn(6, 6, dtype=torch.float64)
    for net in (model, conv):
        net(x).square().sum().backward()
    grads = dict(model.named_parameters())
    for name, p in conv.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(conv.features[4].running_var, model.features[4].running_var, rtol=1e-10, atol=0)
    model.eval(), conv.eval()
    torch.testing.assert_close(conv(x), model(x), rtol=1e-10, atol=0)


def test_no_warning_for_traceable_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SiteDiscoveryWarning)
        convert(make(PreActResNet), "efficient_checkpoint")


def test_converted_model_converts_again():
    conv = convert(make(PreActResNet), {"layer1.0.*": "efficient_checkpoint"})
    again = convert(conv, "checkpoint")  # ckptnorm layers are leaves, not sites
    assert [d.name for d in again.ckptnorm_report] == ["layer1.1.bn1", "layer1.1.bn2", "bn"]
    assert again.get_submodule("layer1.0.bn1").strategy == "efficient_checkpoint"


class Functional(nn.Module):
    """Functional and method activations, an approximate GELU, and a module the graph never calls."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm1d(3) for _ in range(7))
        self.unused = nn.Linear(2, 2)  # its state must survive the GraphModule
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x):
        b = self.bns
        x = torch.relu(b[0](x)) * 1
        x = b[1](x).relu() * 1
        x = F.silu(b[2](x)) * 1
        x = F.gelu(b[3](x)) * 1
        x = F.gelu(b[4](x), approximate="tanh") * 1
        x = F.leaky_relu(b[5](x), negative_slope=0.3) * 1
        return F.elu(b[6](x), 0.5, True) * self.scale


def test_functional_activation_forms_and_unused_state():
    model = make(Functional)
    sites = find_sites(model)
    assert [s.activation.describe() for s in sites] == ["relu", "relu", "silu", "gelu", "gelu_tanh",
                                                        "leaky_relu(0.3)", "elu(0.5)"]
    assert all(s.fuse == "rewrite" for s in sites)  # functions: the model's forward is rewritten
    assert not any(s.unfused for s in sites)
    conv = convert(model, "efficient_checkpoint")
    assert list(conv.state_dict()) == list(model.state_dict())
    conv.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    for net in (model, conv):
        net(x).sum().backward()
    grads = dict(model.named_parameters())
    for name, p in conv.named_parameters():
        if grads[name].grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    model.eval(), conv.eval()
    torch.testing.assert_close(conv(x), model(x), rtol=1e-10, atol=0)


def test_callable_sees_input_shapes_when_example_inputs_are_given():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    seen = {}

    def choose(site):
        seen[site.name] = site.input_shape
        return "efficient_checkpoint"

    convert(model, choose, example_inputs=torch.randn(2, 3, 5, 6))
    assert set(seen) == {"1", "4"}
    assert all(tuple(shape) == (2, 4, 5, 6) for shape in seen.values())
    convert(model, choose)
    assert all(shape is None for shape in seen.values())


# -- the model is kept (issue: convert the models people actually train) --------------------------------------------
class TrainingBranch(nn.Module):
    """A functional activation in a forward that depends on the mode: it may not be rewritten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        if self.training:
            y = y * 1.5
        return self.head(y)

    def extra_method(self):
        return "kept"


class OptionalArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, scale=None):
        y = torch.relu(self.bn(self.conv(x)))
        return y if scale is None else y * scale


class InPlaceAfter(nn.Module):
    """``out += r`` on a BN output, then an in-place activation module: a layer keeping z would see it modified."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.act = nn.Hardtanh(-2.0, 2.0, inplace=True)  # elementwise, not fused (in place)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        r = self.conv1(x)
        out = self.bn1(r)
        out += r
        out = self.conv2(out)
        return self.head(self.act(self.bn2(out)))


def _grads_equal(model, conv, x, tol=1e-10):
    model, conv = copy.deepcopy(model).train(), copy.deepcopy(conv).train()
    for net in (model, conv):
        net(x).square().sum().backward()
    ref = torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()])
    got = torch.cat([p.grad.reshape(-1) for _, p in conv.named_parameters()])
    assert float((got - ref).norm() / ref.norm()) <= tol
    model.eval(), conv.eval()
    # with grad on, as a user's validation pass often is: the graph must be freed without a backward
    assert max_rel(conv(x), model(x)) <= tol


def test_class_methods_and_attributes_kept():
    model = make(TrainingBranch)
    model.custom_attribute = 7
    conv = convert(model, "efficient_checkpoint")
    assert type(conv) is TrainingBranch and conv.extra_method() == "kept" and conv.custom_attribute == 7
    d = decisions(conv)["bn"]
    assert d.applied == "efficient_checkpoint" and "differs between training and eval mode" in d.reason
    assert conv.bn.activation == "identity" and "forward" not in vars(conv)  # relu stays in the user's code
    _grads_equal(model, conv, torch.randn(2, 3, 5, 5, dtype=torch.float64))


def test_optional_arguments_block_a_rewrite():
    model = make(OptionalArg)
    conv = convert(model, "checkpoint")
    assert "optional arguments (scale)" in decisions(conv)["bn"].reason and conv.bn.activation == "identity"
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    model.eval(), conv.eval()
    assert max_rel(conv(x, 2.0), model(x, 2.0)) <= 1e-12


def test_in_place_users_keep_inplace_abn_away():
    model = make(InPlaceAfter)
    conv = convert(model, "inplace_abn")
    d = decisions(conv)
    assert d["bn1"].applied == "efficient_checkpoint" and "modifies its output in place" in d["bn1"].reason
    assert d["bn2"].applied == "efficient_checkpoint"  # the in-place Hardtanh after it is not fused
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    _grads_equal(model, conv, x)  # no "modified by an inplace operation" error


def test_module_activation_fused_and_no_site_unchanged():
    model = make(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=2.0),
                                       nn.Conv2d(4, 2, 1)))
    conv = convert(model, "efficient_checkpoint")
    assert isinstance(conv[1].activation, nn.Softplus) and isinstance(conv[2], nn.Identity)
    assert decisions(convert(model, "inplace_abn"))["1"].applied == "efficient_checkpoint"
    _grads_equal(model, conv, torch.randn(2, 3, 5, 5, dtype=torch.float64))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU())
    same = convert(plain, "inplace_abn")
    assert same is not plain and type(same) is nn.Sequential and len(same.ckptnorm_report) == 0
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values()))
    assert isinstance(same[2], nn.ReLU)


def test_inplace_module_and_pickle_of_a_rewritten_model():
    import io
    model = make(PostActResNet)
    ref = copy.deepcopy(model)
    conv = convert(model, "efficient_checkpoint", inplace_module=True)
    assert conv is model and isinstance(model.layer1[0].bn1, BatchNormAct2d)
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "forward" in vars(loaded.layer1[0])
    twin = copy.deepcopy(loaded)
    assert twin.layer1[0].forward.module is twin.layer1[0]  # the copy's forward runs the copy
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    _grads_equal(ref, twin, x)


def test_sync_batchnorm_site():
    model = make(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4), nn.ReLU()))
    conv = convert(model, "efficient_checkpoint")
    from ckptnorm.torch.convert import SyncBatchNormAct
    assert isinstance(conv[1], SyncBatchNormAct) and conv[1].activation == "relu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group here: local statistics, as nn.SyncBatchNorm computes
        _grads_equal(model, conv, torch.randn(2, 3, 5, 5, dtype=torch.float64))


def test_predicted_saving_matches_measured_bytes():
    from ckptnorm.torch import SavedTensorsCounter
    model = make(PostActResNet, dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8)
    conv = convert(model, "efficient_checkpoint", example_inputs=x)

    def saved(net):
        with SavedTensorsCounter(exclude=net) as counter:
            loss = net(x).sum()
        loss.backward()
        return counter.saved_bytes
    measured = saved(model) - saved(conv)
    predicted = conv.ckptnorm_report.predicted_saved_bytes
    assert measured > 0 and abs(predicted - measured) <= 0.05 * measured


def test_rewritten_model_converts_again():
    model = make(PostActResNet)
    first = convert(model, {"layer1.0.bn1": "efficient_checkpoint"})  # rewrites layer1.0 for one site
    assert first.ckptnorm_report.rewritten == ("layer1.0",)
    again = convert(first, "checkpoint")  # reads layer1.0's rewritten forward, not its class's
    assert again.get_submodule("layer1.0.bn1").strategy == "efficient_checkpoint"
    assert again.get_submodule("layer1.0.bn2").strategy == "checkpoint"
    assert again.get_submodule("layer1.0.bn3").activation == "relu"  # residual site fused the second time
    _grads_equal(model, again, torch.randn(2, 3, 5, 5, dtype=torch.float64))


def test_patched_instance_forward_is_not_traced():
    model = make(PostActResNet)
    block = model.layer1[0]
    block.forward = lambda x, _f=type(block).forward, _b=block: _f(_b, x)  # e.g. a library's wrapper
    d = decisions(convert(model, "efficient_checkpoint"))
    assert "replaced on the instance" in d["layer1.0.bn1"].reason


# -- a BN output returned by a child module: fused in the caller, the child's code inlined ----------------------------
class ConvBN(nn.Module):
    """timm's ConvNormAct(apply_act=False) in small: returns its BN's output, the block decides what follows."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x))


class ChildReturnsBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.branch, self.shortcut, self.head = ConvBN(4), ConvBN(4), ConvBN(4)
        self.drop_path = nn.Identity()  # timm's DropPath at rate 0
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.act(self.drop_path(self.branch(x)) + self.shortcut(x))
        return self.out(F.leaky_relu(self.head(y), 0.2))


def test_bn_returned_by_a_child_is_fused_in_the_caller():
    from ckptnorm.torch import SavedTensorsCounter
    model = make(ChildReturnsBN)
    for strategy in STRATEGIES:
        conv = convert(model, strategy)
        d = decisions(conv)
        assert conv.ckptnorm_report.rewritten == ("",) and "forward" in vars(conv)
        assert "branch returns the BN output: its code is inlined" in d["branch.bn"].reason
        assert "residual site: add and activation fused" in d["branch.bn"].reason
        assert conv.branch.bn.activation == "leaky_relu" and conv.head.bn.activation == "leaky_relu"
        assert "inlined" not in d["shortcut.bn"].reason  # both operands are BN outputs: the first one takes the add
        assert type(conv.branch) is ConvBN and "forward" not in vars(conv.branch)  # the child itself is untouched
        _grads_equal(model, conv, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    # the saving that inlining makes possible: inplace_abn keeps z alone at the residual site
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    kept = {}
    converted = convert(model, "inplace_abn", example_inputs=x)
    for name, net in (("original", copy.deepcopy(model)), ("inplace_abn", converted)):
        net.train()
        with SavedTensorsCounter(exclude=[net, x]) as counter:
            net(x).sum().backward()
        kept[name] = counter.saved_bytes
    buffer = x[:, :1].numel() * 4 * 8  # one 4-channel float64 activation
    predicted = converted.ckptnorm_report.predicted_saved_bytes
    assert predicted == 3 * buffer  # branch: conv output (add's result kept as z); head: conv output, leaky's input
    assert abs((kept["original"] - kept["inplace_abn"]) - predicted) <= 0.01 * predicted


def test_child_with_hooks_or_called_twice_is_not_inlined():
    model = make(ChildReturnsBN)
    model.branch.register_forward_hook(lambda mod, args, out: None)
    d = decisions(convert(model, "efficient_checkpoint"))
    assert "inlined" not in d["branch.bn"].reason and "add and activation fused" not in d["branch.bn"].reason
    assert "inlined" in d["head.bn"].reason  # the others still are

    class Twice(ChildReturnsBN):
        def forward(self, x):
            x = self.stem(x)
            return self.out(F.relu(self.head(self.head(x)) + self.branch(x))) + self.shortcut(x).mean()
    twice = make(Twice)
    conv = convert(twice, "efficient_checkpoint")
    d = decisions(conv)
    assert "inlined" not in d["head.bn"].reason and conv.head.bn.activation == "identity"  # head is called twice
    assert "inlined" in d["branch.bn"].reason
    _grads_equal(twice, conv, torch.randn(2, 3, 6, 6, dtype=torch.float64))
