"""torchvision models (classification and segmentation) under every strategy, checked in float64."""
import pytest
import torch

from zoo_cases import Case, case_params, check_batchnorms_reported, check_conversion, params, require

require("torchvision")

pytestmark = pytest.mark.filterwarnings("ignore::ckptnorm.strategies.PrecisionFallbackWarning")

# Input 2 x 3 x side x side.  Stride-32 classifiers need side 64: at 32 their last stage is 1 x 1, so its BN
# normalizes 2 values per channel and its backward is pure cancellation (errors 1e-6..1e-4 in float64 for any
# implementation order); dilated segmentation models (output stride 8 or 16) are fine at 32.
CASES = [
    Case("torchvision:resnet18", 64),
    Case("torchvision:resnet50", 64),
    Case("torchvision:resnext50_32x4d", 64),
    Case("torchvision:wide_resnet50_2", 64),
    Case("torchvision:densenet121", 64),
    Case("torchvision:mobilenet_v2", 64),
    Case("torchvision:mobilenet_v3_large", 64),
    Case("torchvision:efficientnet_b0", 64),
    Case("torchvision:regnet_y_400mf", 64),
    Case("torchvision:shufflenet_v2_x0_5", 64),
    Case("torchvision:mnasnet0_5", 64),
    # training output (logits, aux2, aux1): the loss and the comparison cover the auxiliary heads
    Case("torchvision:googlenet", 64, {"init_weights": True}),
    Case("torchvision:convnext_tiny", 32, bn_free=True),
    # output {"out": ...}; fcn with aux_loss=True: {"out": ..., "aux": ...}
    Case("torchvision:deeplabv3_mobilenet_v3_large", 32),
    Case("torchvision:fcn_resnet50", 32, {"aux_loss": True}),
    Case("torchvision:lraspp_mobilenet_v3_large", 32),
]


@pytest.mark.parametrize("case, strategy", params(CASES))
def test_conversion_is_equivalent(case, strategy):
    check_conversion(case, strategy)


@pytest.mark.parametrize("case", case_params([c for c in CASES if not c.bn_free]))
def test_every_batchnorm_is_reported(case):
    check_batchnorms_reported(case)


def test_checkpoint_loads_into_converted(tmp_path):
    """A torchvision checkpoint (state_dict of the unconverted model, saved with torch.save) loads with strict=True
    into the converted model, which then computes what the checkpointed model computes."""
    from ckptnorm.torch import convert
    from ckptnorm.torch.zoo import build_model
    trained, x = build_model("torchvision:resnet18", (2, 3, 64, 64), seed=1)
    path = tmp_path / "resnet18.pth"
    torch.save(trained.state_dict(), path)
    fresh, _ = build_model("torchvision:resnet18", (2, 3, 64, 64), seed=2)
    converted = convert(fresh, "inplace_abn")
    converted.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), trained.eval()(x), rtol=1e-5, atol=1e-5)
