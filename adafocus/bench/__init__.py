"""On-device benchmarks: the adaptive pipeline against the dense baseline, per engine and precision.

    from adafocus.bench import BenchConfig, run_benchmark, print_report, save_json
    report = run_benchmark(BenchConfig("model_bundle", ["a.mp4", "b.mp4"], budgets=["33%"], batch=8))
    print_report(report)
    save_json(report, "bench.json")

Modules: :mod:`~adafocus.bench.env` (environment block), :mod:`~adafocus.bench.runner` (latency and
throughput measurement), :mod:`~adafocus.bench.batched` (many videos in flight, engine calls batched across
videos), :mod:`~adafocus.bench.report` (tables, JSON, plot). Like the runtime, nothing here imports torch.
"""

from __future__ import annotations

from adafocus.bench.batched import BatchedResult, BatchedRunner
from adafocus.bench.env import environment, format_environment
from adafocus.bench.report import load_json, print_report, save_json, save_plot
from adafocus.bench.runner import BenchConfig, BenchRow, ThroughputRow, run_benchmark

__all__ = ["BatchedResult", "BatchedRunner", "BenchConfig", "BenchRow", "ThroughputRow", "environment",
           "format_environment", "load_json", "print_report", "run_benchmark", "save_json", "save_plot"]
