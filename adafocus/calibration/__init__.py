"""Calibration of a bundle on labelled videos.

- :mod:`~adafocus.calibration.collect`: run a bundle once over a split through every exit and cache the
  per-video logits, focus frames, crop boxes and stage times;
- :mod:`~adafocus.calibration.thresholds`: exit thresholds for average-GFLOPs budgets (Uni-AdaFocus /
  MSDNet geometric exit ratios), written to ``manifest.exit.thresholds``;
- :mod:`~adafocus.calibration.int8`: INT8 Q/DQ encoders (onnxruntime static quantization) behind an accuracy
  gate against fp32, written as ``manifest.precisions['int8']``;
- :mod:`~adafocus.calibration.report`: the threshold table and plot, and the gate report.

The CLI: ``adafocus calibrate thresholds BUNDLE --data DIR`` and ``adafocus calibrate int8 BUNDLE --data DIR``.
"""

from adafocus.calibration.collect import ExitCache, collect, collect_many, load_labelled
from adafocus.calibration.int8 import Int8Options, Int8Result, calibrate_int8
from adafocus.calibration.report import GateReport, compare_caches, format_thresholds, plot_thresholds
from adafocus.calibration.thresholds import (
    ThresholdSolution,
    ThresholdsResult,
    calibrate_thresholds,
    default_budgets,
    solve_budget,
    solve_budgets,
)

__all__ = [
    "ExitCache", "GateReport", "Int8Options", "Int8Result", "ThresholdSolution", "ThresholdsResult",
    "calibrate_int8", "calibrate_thresholds", "collect", "collect_many", "compare_caches", "default_budgets",
    "format_thresholds", "load_labelled", "plot_thresholds", "solve_budget", "solve_budgets",
]
