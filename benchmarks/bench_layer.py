"""One BatchNormAct2d layer (leaky_relu, float32, NCHW): forward+backward time and bytes kept for backward."""
import torch

from ckptnorm.torch import BatchNormAct2d, SavedTensorsCounter

from .common import LAYER_SHAPES, STRATEGIES, layer_inputs, parse_shape


class LayerForwardBackward:
    params = [STRATEGIES, LAYER_SHAPES]
    param_names = ["strategy", "shape"]

    def setup(self, strategy, shape):
        self.x, self.dz = layer_inputs(shape)
        self.layer = BatchNormAct2d(parse_shape(shape)[1], strategy=strategy)
        self.time_forward_backward(strategy, shape)  # warm the JIT (cached on disk after the first run)

    def time_forward_backward(self, strategy, shape):
        x = self.x.detach().requires_grad_()
        self.layer(x).backward(self.dz)

    def time_forward(self, strategy, shape):
        with torch.no_grad():
            self.layer(self.x)

    def track_saved_bytes(self, strategy, shape):
        # conv -> layer -> conv keeps the layer's output through the next conv's input: model that with a 1x1 conv
        x = self.x.detach().requires_grad_()
        weight = torch.ones(1, parse_shape(shape)[1], 1, 1, requires_grad=True)
        with SavedTensorsCounter(exclude=[self.layer, weight]) as counter:
            out = torch.nn.functional.conv2d(self.layer(x), weight)
        out.sum().backward()
        return counter.saved_bytes

    track_saved_bytes.unit = "bytes"
