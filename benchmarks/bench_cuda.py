"""CUDA benchmarks: per-kernel effective bandwidth against a device-to-device copy, and one layer's forward+backward
against PyTorch's native BatchNorm2d + LeakyReLU.  Skipped (NotImplementedError in setup) without a GPU.

Effective bandwidth = bytes moved / time, with the traffic model of the design note (N elements, itemsize b):
stats reads x (N b); normalize_act reads x, writes z (2 N b); each reduction reads two tensors (2 N b); each dx
kernel reads two and writes one (3 N b).  A copy moves 2 N b.
"""
import torch

from .common import parse_shape

KERNELS = {  # name: elements moved per element of x
    "channel_stats": 1, "normalize_act": 2, "reduce_from_input": 2, "reduce_from_output": 2,
    "dx_from_input": 3, "dx_from_output": 3,
}
CUDA_SHAPES = ["64x256x56x56", "64x1024x14x14"]  # ResNet-50 layer shapes, batch 64 (>= 16M elements)


def _require_gpu():
    if not torch.cuda.is_available():
        raise NotImplementedError("no CUDA GPU")


def _timed(fn, repeats=20):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def kernel_calls(x, layout):
    """kernel name -> a call of that backend primitive on ``x`` (N x C x H x W, in ``layout``'s memory order) and
    buffers like it, through the backend ckptnorm picks for ``x`` (``use_backend("cuda")`` for CPU tensors under the
    simulator)."""
    from ckptnorm import get_activation
    from ckptnorm.torch import _arrays
    c = x.shape[1]
    z, dz, dx = torch.randn_like(x), torch.randn_like(x), torch.empty_like(x)
    backend = _arrays.backend_for(x)
    view = lambda t: _arrays.activation_view(t, layout)  # noqa: E731
    ones = torch.ones(c, dtype=torch.float64, device=x.device)
    zeros = torch.zeros(c, dtype=torch.float64, device=x.device)
    act = get_activation("leaky_relu")
    return {
        "channel_stats": lambda: backend.channel_stats(view(x), layout),
        "normalize_act": lambda: backend.normalize_act(view(x), view(z), layout, zeros, ones, zeros, act),
        "reduce_from_input": lambda: backend.reduce_from_input(view(x), view(dz), layout, zeros, ones, ones, zeros,
                                                               act),
        "reduce_from_output": lambda: backend.reduce_from_output(view(z), view(dz), layout, zeros, act),
        "dx_from_input": lambda: backend.dx_from_input(view(x), view(dz), view(dx), layout, zeros, ones, zeros, act,
                                                       ones, zeros, zeros),
        "dx_from_output": lambda: backend.dx_from_output(view(z), view(dz), view(dx), layout, zeros, act, ones, zeros,
                                                         zeros),
    }


class CudaKernelBandwidth:
    params = [list(KERNELS), CUDA_SHAPES, ["ncs", "nsc"]]
    param_names = ["kernel", "shape", "layout"]
    timeout = 300

    def setup(self, kernel, shape, layout):
        _require_gpu()
        n, c, h, w = parse_shape(shape)
        fmt = torch.channels_last if layout == "nsc" else torch.contiguous_format
        x = torch.randn(n, c, h, w, device="cuda").contiguous(memory_format=fmt)
        calls = kernel_calls(x, layout)
        z = torch.empty_like(x)
        self.call = calls[kernel]
        self.bytes = KERNELS[kernel] * x.numel() * x.element_size()
        self.copy_seconds = _timed(lambda: z.copy_(x))
        self.copy_bytes = 2 * x.numel() * x.element_size()
        self.kernel_seconds = _timed(self.call)

    def time_kernel(self, kernel, shape, layout):
        self.call()
        torch.cuda.synchronize()

    def track_fraction_of_copy_bandwidth(self, kernel, shape, layout):
        return (self.bytes / self.kernel_seconds) / (self.copy_bytes / self.copy_seconds)

    track_fraction_of_copy_bandwidth.unit = "fraction"


class CudaLayerVsNative:
    params = [["native", "efficient_checkpoint", "inplace_abn", "checkpoint"], ["64x256x56x56", "64x64x56x56"]]
    param_names = ["strategy", "shape"]
    timeout = 300

    def setup(self, strategy, shape):
        _require_gpu()
        from ckptnorm.torch import BatchNormAct2d
        n, c, h, w = parse_shape(shape)
        self.x = torch.randn(n, c, h, w, device="cuda")
        self.dz = torch.randn_like(self.x)
        if strategy == "native":
            bn = torch.nn.BatchNorm2d(c).cuda()
            self.layer = lambda t: torch.nn.functional.leaky_relu(bn(t), 0.01, inplace=True)
        else:
            self.layer = BatchNormAct2d(c, strategy=strategy).cuda()
        self.time_forward_backward(strategy, shape)

    def time_forward_backward(self, strategy, shape):
        x = self.x.detach().requires_grad_()
        self.layer(x).backward(self.dz)
        torch.cuda.synchronize()
