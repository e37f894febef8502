"""timm models under every strategy, checked in float64; a timm checkpoint loads into a converted model."""
import pytest
import torch

from zoo_cases import Case, case_params, check_batchnorms_reported, check_conversion, params, require

timm = require("timm")

pytestmark = pytest.mark.filterwarnings("ignore::ckptnorm.strategies.PrecisionFallbackWarning")

# The cheapest variant of each family; input 2 x 3 x side x side (see test_zoo_torchvision.py for why 64).
CASES = [
    Case("timm:resnet50", 64),                 # zero_init_last: the last BN of each block starts with gamma = 0
    Case("timm:efficientnet_b0", 64),
    Case("timm:mobilenetv3_large_100", 64),
    Case("timm:regnetx_002", 64),
    Case("timm:densenet121", 64),
    Case("timm:tresnet_m", 64),                # space-to-depth stem, anti-aliased downsampling, leaky_relu
    Case("timm:resnetv2_18", 64),              # pre-activation
    Case("timm:dla46_c", 64),
    Case("timm:hrnet_w18_small", 64),
    Case("timm:dpn48b", 64),
    Case("timm:ese_vovnet19b_dw", 64),
    Case("timm:cspresnet50", 64),
    Case("timm:rexnet_100", 64, batch=4),     # its SE blocks have a BN on pooled 1 x 1 maps: n = batch (zoo_cases)
    Case("timm:ghostnet_050", 64),
    Case("timm:convnext_atto", 32, bn_free=True),
]


@pytest.mark.parametrize("case, strategy", params(CASES))
def test_conversion_is_equivalent(case, strategy):
    check_conversion(case, strategy)


@pytest.mark.parametrize("case", case_params([c for c in CASES if not c.bn_free]))
def test_every_batchnorm_is_reported(case):
    check_batchnorms_reported(case)


def test_timm_checkpoint_loads_into_converted(tmp_path):
    """A timm checkpoint -- the state_dict of the unconverted model, written as timm writes one -- loads with
    strict=True into the converted model through timm's own loader, and the model computes what the checkpointed
    one computes."""
    from ckptnorm.torch import convert
    from ckptnorm.torch.zoo import build_model
    trained, x = build_model("timm:efficientnet_b0", (2, 3, 64, 64), seed=1)
    path = tmp_path / "efficientnet_b0.pth"
    torch.save({"state_dict": trained.state_dict()}, path)
    fresh, _ = build_model("timm:efficientnet_b0", (2, 3, 64, 64), seed=2)
    converted = convert(fresh, "efficient_checkpoint")
    timm.models.load_checkpoint(converted, str(path), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), trained.eval()(x), rtol=1e-5, atol=1e-5)
