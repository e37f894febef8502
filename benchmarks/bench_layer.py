"""One BN + LeakyReLU layer: forward and forward+backward time, bytes kept for backward, peak host memory.

``LayerForwardBackward`` (float32, NCHW, ckptnorm strategies only) is the original benchmark, kept for its history;
``BatchNormAct2dLayer`` adds dtype, layout and PyTorch's native layer as a baseline; ``PerCallCost`` times small
layers, where host work sets the time, as a ratio to the native layer."""
import torch

from ckptnorm.torch import BatchNormAct2d, SavedTensorsCounter

from .common import (DTYPES, LAYER_SHAPES, LAYOUTS, NATIVE, PER_CALL_SHAPES, QUICK, SHAPES, STRATEGIES, VARIANTS,
                     activation_inputs, forward_backward, interleaved_medians, layer_inputs, layer_saved_bytes,
                     make_layer, parse_shape, warm_layer)


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


class BatchNormAct2dLayer:
    """One BN + LeakyReLU layer over variant x shape x dtype x layout; variant ``native`` is PyTorch's BatchNorm2d +
    in-place LeakyReLU, so each strategy's ratio to it can be read off the same run.

    ``peakmem_forward_backward`` is asv's peak resident set size of the benchmark process (setup included, so setup
    allocates only the inputs and warms the kernels on a tiny input)."""

    params = [VARIANTS, SHAPES, DTYPES, LAYOUTS]
    param_names = ["strategy", "shape", "dtype", "layout"]
    timeout = 300  # the largest target shape in float64 takes about a second per call on 2 cores

    def setup(self, strategy, shape, dtype, layout):
        warm_layer(strategy, dtype, layout)
        self.x, self.dz = activation_inputs(shape, dtype, layout)
        self.layer = make_layer(strategy, parse_shape(shape)[1], dtype)

    def time_forward(self, strategy, shape, dtype, layout):
        with torch.no_grad():
            self.layer(self.x)

    def time_forward_backward(self, strategy, shape, dtype, layout):
        forward_backward(self.layer, self.x, self.dz)

    def peakmem_forward_backward(self, strategy, shape, dtype, layout):
        forward_backward(self.layer, self.x, self.dz)

    def track_saved_bytes(self, strategy, shape, dtype, layout):
        return layer_saved_bytes(self.layer, self.x)

    track_saved_bytes.unit = "bytes"


class PerCallCost:
    """Small BN + LeakyReLU layers (``PER_CALL_SHAPES``, float32, NCHW), where the host work of a call rather than its
    memory traffic sets the time: forward+backward of each variant, and its time as a ratio to PyTorch's native
    layer, both measured in turn in the same process (medians), so that the ratio does not drift with the machine."""

    params = [VARIANTS, PER_CALL_SHAPES]
    param_names = ["strategy", "shape"]
    repeats = 20 if QUICK else 400

    def setup(self, strategy, shape):
        warm_layer(strategy, "float32", "NCHW")
        self.x, self.dz = activation_inputs(shape)
        channels = parse_shape(shape)[1]
        self.layer, self.native = make_layer(strategy, channels), make_layer(NATIVE, channels)

    def time_forward_backward(self, strategy, shape):
        forward_backward(self.layer, self.x, self.dz)

    def track_time_to_native(self, strategy, shape):
        seconds = interleaved_medians({"layer": lambda: forward_backward(self.layer, self.x, self.dz),
                                       "native": lambda: forward_backward(self.native, self.x, self.dz)},
                                      self.repeats)
        return seconds["layer"] / seconds["native"]

    track_time_to_native.unit = "ratio"
