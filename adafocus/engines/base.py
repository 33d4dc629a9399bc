"""The engine protocol: one small contract that every backend (onnxruntime, TensorRT, torch) implements.

An engine runs one stage of the model (global, policy, backbone, head) with named inputs and outputs. The
contract follows Polygraphy's runner (``polygraphy/backend/base/runner.py``): the base class owns the
life cycle (``activate`` / ``run`` / ``close``) and the timing; a backend overrides only
``_activate_impl``, ``_run_impl`` and ``_close_impl``.

``run`` takes and returns ``dict[name, array]``. Host ``numpy`` arrays work with every engine. Engines
that live on a GPU also take device arrays (cupy, OrtValue, torch CUDA tensors, depending on the
backend) and can return device arrays (``device_outputs=True``), so that tensors stay on the GPU
between stages. This module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from adafocus.device import Device, cuda_device_count, cuda_device_info, parse_device
from adafocus.errors import EngineError

# the device parser and CUDA probe live in adafocus.device; these names stay importable from here
__all__ = ["Device", "Dim", "Engine", "TensorSpec", "cuda_device_count", "cuda_device_info", "parse_device"]

_now = time.perf_counter

Dim = int | str | None
"""One dimension of a tensor: an int when fixed, a name (``"batch"``) or None when dynamic."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one engine input or output.

    ``shape`` is a tuple of dims (int = fixed, str or None = dynamic); it is None when the engine cannot
    know the rank (a torch module described only by names).
    """

    name: str
    shape: tuple[Dim, ...] | None
    dtype: np.dtype

    @property
    def dynamic_dims(self) -> tuple[int, ...]:
        """Indices of the dimensions that are not fixed."""
        if self.shape is None:
            return ()
        return tuple(i for i, d in enumerate(self.shape) if not isinstance(d, int) or d < 0)

    def __str__(self) -> str:
        shape = "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name}[{shape}]"


class Engine:
    """Base class of every engine: life cycle, I/O description and self-timing.

    Subclasses set ``name`` (the registry name) and implement ``_activate_impl`` (load the model, fill
    ``self._inputs`` / ``self._outputs``), ``_run_impl`` and optionally ``_close_impl``.
    ``create_engine`` returns an activated engine; engines are also context managers.

    Timing: ``last_ms`` is the host wall time of the last ``run`` call, ``total_ms`` / ``calls`` the
    cumulative figures since activation (``mean_ms`` their ratio). With device outputs on an
    asynchronous stream the host time can end before the GPU work does; the caller synchronises.
    """

    name: str = "engine"

    def __init__(self, device: str = "cpu") -> None:
        dev = parse_device(device)
        self.device = str(dev)  # canonical: "cpu" or "cuda:N"
        self.device_kind, self.device_index = dev.kind, dev.index
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self.is_active = False
        self.last_ms = 0.0
        self.total_ms = 0.0
        self.calls = 0

    # --------------------------------------------------------------------------------- life cycle
    def activate(self) -> Engine:
        """Load the model (idempotent). Returns self so that calls can be chained."""
        if not self.is_active:
            try:
                self._activate_impl()
            except BaseException:
                with contextlib.suppress(Exception):  # free whatever a half-done activation took
                    self._close_impl()
                raise
            self.is_active = True
            self.reset_timing()
        return self

    def close(self) -> None:
        """Release the model and any device memory (idempotent)."""
        if self.is_active:
            try:
                self._close_impl()
            finally:
                self.is_active = False

    def __enter__(self) -> Engine:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: an engine dropped without close() still frees memory
        with contextlib.suppress(Exception):
            self.close()

    # ---------------------------------------------------------------------------------------- I/O
    @property
    def inputs(self) -> list[TensorSpec]:
        """Input specs, in the model's order."""
        self._require_active()
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        """Output specs, in the model's order."""
        self._require_active()
        return list(self._outputs)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    # ---------------------------------------------------------------------------------------- run
    def run(self, feeds: Mapping[str, Any], *, device_outputs: bool = False) -> dict[str, Any]:
        """Run the stage on ``feeds`` (name -> array) and return name -> array for every output.

        Host numpy in, host numpy out by default. ``device_outputs=True`` asks a GPU engine to leave
        the outputs on the device (an EngineError on engines that cannot).
        """
        if not self.is_active:
            self._require_active()
        start = _now()
        out = self._run_impl(feeds, device_outputs)
        self.last_ms = elapsed = (_now() - start) * 1e3
        self.total_ms += elapsed
        self.calls += 1
        return out

    __call__ = run

    @property
    def mean_ms(self) -> float:
        """Mean wall time per run since activation (0 before the first run)."""
        return self.total_ms / self.calls if self.calls else 0.0

    def reset_timing(self) -> None:
        """Zero the timing counters (e.g. after warm-up runs)."""
        self.last_ms = self.total_ms = 0.0
        self.calls = 0

    def describe(self) -> str:
        """One line per input and output, for logs and ``adafocus info``."""
        lines = [f"{self.name} on {self.device}"]
        lines += [f"  in  {s}" for s in self.inputs]
        lines += [f"  out {s}" for s in self.outputs]
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"<{type(self).__name__} {self.name!r} device={self.device!r} {state}>"

    # ----------------------------------------------------------------------------- for subclasses
    @classmethod
    def availability(cls, device: str = "cpu") -> str | None:
        """None when this engine can run on ``device`` here, else the reason why not (one line).

        Must be cheap and must not import torch: ``resolve_engine`` calls it for every engine.
        """
        return None

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _run_impl(self, feeds: Mapping[str, Any], device_outputs: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _close_impl(self) -> None:
        pass

    def _require_active(self) -> None:
        if not self.is_active:
            raise EngineError(f"engine {self.name!r} is not active: call activate() (create_engine does)")

    def _check_feeds(self, feeds: Mapping[str, Any]) -> None:
        """Raise one clear EngineError for missing or unknown input names (call on the error path)."""
        expected = [s.name for s in self._inputs]
        missing = [n for n in expected if n not in feeds]
        extra = [n for n in feeds if n not in expected]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unknown {extra}")
            raise EngineError(f"engine {self.name!r}: bad inputs ({'; '.join(parts)}); expected {expected}")
