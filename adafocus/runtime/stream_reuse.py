"""Glance reuse across overlapping windows (the base family): each frame is glanced at once.

With a 2 s window every 1 s, half of a window's glance frames were in the previous window too. The base
family's glance encoder (MobileNetV2) works frame by frame; only its classifier (an MLP per frame, max-pooled
over the frames, then a linear layer) and the policy look at the clip. So the glance graph is cut in two, once,
when a stream starts: the per-frame encoder (frames -> feature map and pooled vector of each frame) and the
tail (vectors -> logits, context). A window encodes only the frames no earlier window encoded (cached by slot
and frame number) and runs the tail on all of them. The cut is checked against the whole graph on random
frames before it is used; when it cannot be made (no ``onnx`` package: the ``export`` extra; a graph of
another shape; not the CPU onnxruntime engine) the stream runs the whole glance each window and says why.

Not for TSM: its glance encoder shifts features between neighbouring frames (temporal shift), so a frame's
features depend on the window it is in. X3D convolves in time as well.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

Key = tuple[int, int]  # (slot id, source frame number)


def split_glance(path: str | os.PathLike):
    """(encoder, tail, the encoder's outputs: per-frame map and vector) cut from a base family ``global.onnx``;
    ValueError when the graph does not have that shape (``fmap`` and ``vec`` reshaped from per-frame tensors,
    a tail fed by ``vec``)."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(os.fspath(path))
    made = {o: n for n in model.graph.node for o in n.output}
    producers = [made.get(name) for name in ("fmap", "vec")]
    if any(p is None or p.op_type != "Reshape" for p in producers):
        raise ValueError("fmap and vec are not reshaped from per-frame tensors")
    per_frame = [p.input[0] for p in producers]
    encoder = Extractor(model).extract_model(["frames"], per_frame)
    dim = encoder.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "frames"  # any number of frames per call
    for out in encoder.graph.output:
        out.type.tensor_type.ClearField("shape")
    tail = Extractor(model).extract_model(["vec"], ["logits", "context"])
    for node in tail.graph.node:  # the tail reads the batch size off the frames: read it off vec (same dim 0)
        if "frames" in node.input:
            if node.op_type != "Shape":
                raise ValueError(f"the glance classifier reads the frames ({node.op_type})")
            node.input[list(node.input).index("frames")] = "vec"
    return encoder, tail, per_frame


class GlanceReuse:
    """Stands in for a stream's global engine (``run(feeds)`` like any engine): per-frame glance features
    cached by key; call ``expect(keys)`` with the keys of the glance frames before each window."""

    def __init__(self, encoder, tail, per_frame: list[str], tmp: tempfile.TemporaryDirectory):
        self.encoder, self.tail, self.per_frame, self._tmp = encoder, tail, per_frame, tmp
        self.cache: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
        self._keys: list[Key] | None = None
        self.encoded = 0
        self.reused = 0
        self.last_reused = 0

    @classmethod
    def build(cls, pipe) -> tuple[GlanceReuse | None, str]:
        """The reuse for ``pipe``'s glance, or (None, why not)."""
        from adafocus.engines.ort import OrtEngine

        if pipe.family != "base":
            return None, (f"the {pipe.family} family's glance mixes frames in time (TSM: temporal shift; X3D: "
                          "3-D convolutions): no per-frame reuse")
        engine = pipe.engines.get("global")
        if not isinstance(engine, OrtEngine) or pipe.device != "cpu":
            return None, "glance reuse runs on the CPU onnxruntime engine only"
        try:
            import onnx
        except ImportError:
            return None, "glance reuse cuts the glance graph with the onnx package: pip install 'adafocus[export]'"
        try:
            enc_model, tail_model, per_frame = split_glance(engine.path)
        except ValueError as exc:
            return None, f"glance graph not cut: {exc}"
        tmp = tempfile.TemporaryDirectory(prefix="adafocus-glance-")
        engines = []
        for name, model in (("encoder", enc_model), ("tail", tail_model)):
            path = Path(tmp.name) / f"glance_{name}.onnx"
            onnx.save(model, path)
            engines.append(OrtEngine(path, "cpu", threads=pipe.threads).activate())
        reuse = cls(engines[0], engines[1], per_frame, tmp)
        if not reuse.matches(engine, pipe.manifest.stages["global"].inputs[0].shape):
            reuse.close()
            return None, "the cut glance graph does not reproduce the whole one"
        return reuse, ""

    def matches(self, whole, shape) -> bool:
        """Whether encoding the frames in two halves + the tail gives the whole graph's outputs."""
        t, c, h, w = (int(v) for v in shape[1:])
        frames = np.random.default_rng(0).standard_normal((1, t, c, h, w)).astype(np.float32)
        want = whole.run({"frames": frames})
        half = t // 2
        first = [(i, i) for i in range(half)]
        self.expect(first + [(1000 + i, i) for i in range(half, t)])
        self.run({"frames": frames})
        other = frames.copy()
        other[:, :half] = 0.0  # must come from the cache, not from these
        self.expect(first + [(2000 + i, i) for i in range(half, t)])
        got = self.run({"frames": other})
        self.cache.clear()
        self.encoded = self.reused = 0
        return all(np.allclose(got[k], want[k], rtol=1e-4, atol=1e-5) for k in ("fmap", "vec", "logits", "context"))

    def expect(self, keys: list[Key]) -> None:
        self._keys = list(keys)

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        frames = feeds["frames"]
        keys, self._keys = self._keys, None
        if keys is None or frames.shape[0] != 1 or len(keys) != frames.shape[1]:
            keys = [(-1 - i, -1) for i in range(frames.shape[1])]  # not told which frames: encode them all
            self.cache = {k: v for k, v in self.cache.items() if k[0] >= 0}
        new = [i for i, k in enumerate(keys) if k not in self.cache and k not in keys[:i]]
        if new:
            out = self.encoder.run({"frames": np.ascontiguousarray(frames[:, new])})
            fmaps, vecs = (np.asarray(out[name]) for name in self.per_frame)
            for j, i in enumerate(new):
                self.cache[keys[i]] = (fmaps[j], vecs[j].reshape(-1))
        self.encoded += len(new)
        self.last_reused = len(keys) - len(new)
        self.reused += self.last_reused
        fmap = np.stack([self.cache[k][0] for k in keys])[None]
        vec = np.stack([self.cache[k][1] for k in keys])[None]
        oldest = min(k[0] for k in keys)
        self.cache = {k: v for k, v in self.cache.items() if k[0] >= oldest}  # windows only move forward
        tail = self.tail.run({"vec": vec})
        return {"fmap": fmap, "vec": vec, "logits": tail["logits"], "context": tail["context"]}

    def close(self) -> None:
        for e in (self.encoder, self.tail):
            e.close()
        self._tmp.cleanup()
