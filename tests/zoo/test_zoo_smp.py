"""segmentation-models-pytorch models under every strategy, checked in float64; pretrained-encoder weights load."""
import pytest
import torch

from zoo_cases import Case, case_params, check_batchnorms_reported, check_conversion, params, require

require("segmentation_models_pytorch")

pytestmark = pytest.mark.filterwarnings("ignore::ckptnorm.strategies.PrecisionFallbackWarning")

# smp needs sides divisible by the output stride (32, 16 for DeepLabV3Plus); 64 keeps the deepest BN at 2 x 2.
CASES = [
    Case("smp:Unet:resnet18", 64),
    Case("smp:FPN:efficientnet-b0", 64),
    Case("smp:DeepLabV3Plus:resnet18", 64),
    Case("smp:Linknet:resnet18", 64),
    Case("smp:PSPNet:mobilenet_v2", 64),
]


@pytest.mark.parametrize("case, strategy", params(CASES))
def test_conversion_is_equivalent(case, strategy):
    check_conversion(case, strategy)


@pytest.mark.parametrize("case", case_params(CASES))
def test_every_batchnorm_is_reported(case):
    check_batchnorms_reported(case)


def test_encoder_checkpoint_loads_into_converted(tmp_path):
    """smp loads pretrained weights into the encoder (``model.encoder.load_state_dict``): an encoder checkpoint of
    the unconverted model loads with strict=True into the converted model's encoder, and so does the whole
    model's state_dict; the outputs then match."""
    from ckptnorm.torch import convert
    from ckptnorm.torch.zoo import build_model
    trained, x = build_model("smp:Unet:resnet18", (2, 3, 64, 64), seed=1)
    path = tmp_path / "encoder.pth"
    torch.save(trained.encoder.state_dict(), path)
    fresh, _ = build_model("smp:Unet:resnet18", (2, 3, 64, 64), seed=2)
    converted = convert(fresh, "inplace_abn")
    converted.encoder.load_state_dict(torch.load(path, weights_only=True), strict=True)
    converted.load_state_dict(trained.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), trained.eval()(x), rtol=1e-5, atol=1e-5)
