"""The ``torch`` engine: one stage of the PyTorch reference model behind the engine protocol.

It is the reference the exported engines are checked against, and the last resort on a GPU machine
without onnxruntime-gpu or TensorRT. torch is imported when the engine is created, never when this
module is imported, so the registry can list it on an edge install without torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adafocus.engines.base import Engine, TensorSpec, cuda_device_count
from adafocus.engines.registry import register_engine
from adafocus.errors import EngineError, require

MAX_GRAPH_BATCH = 256  # the largest padded batch that gets a CUDA graph


@register_engine("torch")
class TorchEngine(Engine):
    """Run an ``nn.Module`` with named inputs and outputs.

    Args:
        module: the stage; called as ``module(*inputs in input_names order)``. It may return one tensor,
            a tuple/list (matched to ``output_names`` by position) or a dict (matched by name).
        input_names, output_names: the stage's I/O names (the same as the exported ONNX's).
        device: ``'cpu'`` or ``'cuda[:N]'``; the module is moved there and set to eval mode.
        input_shapes: optional shapes for ``inputs`` specs (None or str for dynamic dims).
        dtype: numpy dtype of the specs (float32).
        cuda_graphs: on cuda, run the module as CUDA graphs: one graph per input signature, the batch padded
            with zeros to the next power of two (at most ``MAX_GRAPH_BATCH``; larger batches run eagerly), so
            that a stage of many small kernels costs one launch, as a TensorRT engine with CUDA graphs would.
            The first call of each signature captures its graph. A module that cannot be captured runs
            eagerly (logged once). No effect on the CPU.

    numpy feeds give numpy outputs; torch tensor feeds give torch tensors on the engine's device
    (``device_outputs=True`` also returns tensors for numpy feeds). Other device arrays (cupy, anything with
    ``__dlpack__``: the GPU crop's patches) are read in place through DLPack and give numpy outputs, as
    the ort engines give host outputs for device feeds.
    """

    def __init__(
        self,
        module: Any = None,
        input_names: Sequence[str] = (),
        output_names: Sequence[str] = (),
        device: str = "cpu",
        *,
        input_shapes: Mapping[str, Sequence[int | str | None]] | None = None,
        dtype: Any = np.float32,
        cuda_graphs: bool = True,
        path: Any = None,
    ) -> None:
        super().__init__(device)
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs: dict[tuple, tuple[list, Any, dict]] = {}
        if module is None:
            hint = f" (got path={path!r}; the torch engine runs a module, not a file)" if path is not None else ""
            raise EngineError(f"engine 'torch' needs module=, input_names= and output_names={hint}")
        if not input_names or not output_names:
            raise EngineError("engine 'torch' needs non-empty input_names and output_names")
        self.module = module
        self._input_name_list = list(input_names)
        self._output_name_list = list(output_names)
        shapes = dict(input_shapes or {})
        unknown = sorted(set(shapes) - set(self._input_name_list))
        if unknown:
            raise EngineError(f"input_shapes names {unknown} are not among input_names {self._input_name_list}")
        self._dtype = np.dtype(dtype)
        self._inputs = [
            TensorSpec(n, tuple(shapes[n]) if n in shapes else None, self._dtype) for n in self._input_name_list
        ]
        self._outputs = [TensorSpec(n, None, self._dtype) for n in self._output_name_list]

    @classmethod
    def availability(cls, device: str = "cpu") -> str | None:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return "torch is not installed: pip install 'adafocus[export]'"
        if device.lower().startswith("cuda") and cuda_device_count() == 0:
            return "no CUDA device found"
        return None

    def _activate_impl(self) -> None:
        torch = require("torch", "export", "the torch engine")
        if self.device_kind == "cuda" and not torch.cuda.is_available():
            raise EngineError("engine 'torch' on cuda: this torch build has no CUDA support")
        self._torch = torch
        self._tdevice = torch.device(self.device_kind, self.device_index) if self.device_kind == "cuda" else "cpu"
        self.module = self.module.to(self._tdevice).eval()

    def _close_impl(self) -> None:
        self._graphs.clear()
        if self.device_kind == "cuda":
            self.module = self.module.to("cpu")  # hand the GPU memory back; the module stays usable

    def _run_impl(self, feeds: Mapping[str, Any], device_outputs: bool) -> dict[str, Any]:
        torch = self._torch
        self._check_feeds(feeds)
        as_numpy = not device_outputs
        values = []
        for name in self._input_name_list:
            value = feeds[name]
            if isinstance(value, torch.Tensor):
                as_numpy = False
            elif not isinstance(value, np.ndarray) and hasattr(value, "__dlpack__"):
                value = torch.from_dlpack(value)  # a device array (cupy): no copy, same stream order
            else:  # numpy (or anything array-like): shares memory on the CPU
                value = np.ascontiguousarray(value)
                value = torch.from_numpy(value if value.flags.writeable else value.copy())
            values.append(value)
        out = self._run_graph(values) if self.cuda_graphs and self.device_kind == "cuda" else None
        if out is None:
            args = [v.to(self._tdevice, non_blocking=True) for v in values]
            with torch.inference_mode():
                out = self._name_outputs(self.module(*args))
        elif not as_numpy:  # a graph's outputs are overwritten by its next replay
            out = {k: v.clone() for k, v in out.items()}
        if as_numpy:
            return {k: v.detach().cpu().numpy() for k, v in out.items()}
        return out

    # -------------------------------------------------------------------------------------- CUDA graphs
    def _run_graph(self, values: list) -> dict[str, Any] | None:
        """Replay (capturing first if new) the graph of these inputs' signature; None: run eagerly."""
        n = int(values[0].shape[0]) if values[0].dim() else 0
        if n < 1 or any(v.dim() == 0 or int(v.shape[0]) != n for v in values):
            return None  # no common batch dimension to pad
        size = 1 << (n - 1).bit_length()
        if size > MAX_GRAPH_BATCH:
            return None
        key = tuple((tuple(v.shape[1:]), v.dtype) for v in values) + (size,)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(values, size)
            if entry is None:
                return None
            self._graphs[key] = entry
        static_in, graph, static_out = entry
        for dst, src in zip(static_in, values, strict=True):
            dst[:n].copy_(src, non_blocking=True)
            if n < size:
                dst[n:].zero_()
        graph.replay()
        return {k: v[:n] for k, v in static_out.items()}

    def _capture(self, values: list, size: int) -> tuple[list, Any, dict] | None:
        import logging

        torch = self._torch
        static_in = [torch.zeros((size, *v.shape[1:]), dtype=v.dtype, device=self._tdevice) for v in values]
        try:
            side = torch.cuda.Stream(self._tdevice)
            side.wait_stream(torch.cuda.current_stream(self._tdevice))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # warm-up outside the graph (cuDNN picks its kernels, allocations settle)
                    self.module(*static_in)
            torch.cuda.current_stream(self._tdevice).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                static_out = self._name_outputs(self.module(*static_in))
        except Exception as exc:  # a module that syncs or branches on values cannot be captured
            logging.getLogger(__name__).warning("torch engine: CUDA graph capture failed, running eagerly (%s)",
                                                " ".join(str(exc).split())[:200])
            self.cuda_graphs = False
            return None
        return static_in, graph, static_out

    def _name_outputs(self, result: Any) -> dict[str, Any]:
        names = self._output_name_list
        if isinstance(result, Mapping):
            missing = [n for n in names if n not in result]
            if missing:
                raise EngineError(f"torch module returned keys {sorted(result)}, missing outputs {missing}")
            return {n: result[n] for n in names}
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(values) != len(names):
            raise EngineError(f"torch module returned {len(values)} outputs for output_names {names}")
        return dict(zip(names, values, strict=True))
