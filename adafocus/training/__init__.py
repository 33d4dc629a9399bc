"""CPU training of the reference model (Uni-AdaFocus's one-stage objective) and of a dense baseline.

Needs torch (the ``export`` extra). ``train(data_dir, out, TrainOptions(...))`` is what ``adafocus train`` runs.
"""

from adafocus.training.loop import TrainOptions, TrainResult, evaluate, train

__all__ = ["TrainOptions", "TrainResult", "evaluate", "train"]
