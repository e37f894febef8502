"""Whole training steps of the built-in default model (``ckptnorm.torch.models.get_model()``, a pre-activation ResNet with
LeakyReLU), as written (``original``) and converted to each strategy, like the rows of ``ckptnorm compare``."""
from .common import (MODEL_INPUT, MODEL_RATIO_INPUTS, QUICK, STRATEGIES, interleaved_medians, make_model, model_input,
                     train_step)


class ModelTrainStep:
    params = [["original"] + STRATEGIES, [MODEL_INPUT]]
    param_names = ["strategy", "input"]
    timeout = 300

    def setup(self, strategy, input_shape):
        self.model = make_model(strategy)
        train_step(self.model, model_input("2x3x8x8"))  # kernels compiled or loaded on a tiny input (peakmem)
        self.x = model_input(input_shape)

    def time_train_step(self, strategy, input_shape):
        train_step(self.model, self.x)

    def peakmem_train_step(self, strategy, input_shape):
        train_step(self.model, self.x)

    def track_saved_bytes(self, strategy, input_shape):
        """Bytes kept for backward by one step's forward and loss (exact; parameters, buffers and the input
        excluded), as ``ckptnorm compare`` counts them."""
        from ckptnorm.torch.harness import saved_bytes
        return saved_bytes(self.model, (self.x,), tool="benchmarks")

    track_saved_bytes.unit = "bytes"


class ModelStepRatio:
    """The default model's training step under each ckptnorm strategy as a ratio to ``standard``'s, both measured in
    turn in the same process (medians): the number ``ckptnorm compare``'s time column shows, at the model benchmarks'
    input and at compare's default."""

    params = [[s for s in STRATEGIES if s != "standard"], MODEL_RATIO_INPUTS]
    param_names = ["strategy", "input"]
    timeout = 300
    repeats = 2 if QUICK else 15

    def setup(self, strategy, input_shape):
        self.models = {name: make_model(name) for name in ("standard", strategy)}
        self.x = model_input(input_shape)

    def track_step_to_standard(self, strategy, input_shape):
        seconds = interleaved_medians({name: (lambda m=m: train_step(m, self.x)) for name, m in self.models.items()},
                                      self.repeats)
        return seconds[strategy] / seconds["standard"]

    track_step_to_standard.unit = "ratio"
