"""``--save-vis``: a video of the sampled frames with the focus patches drawn and the running prediction."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from adafocus.errors import VideoError


def save_visualization(result, decoded, out: str | Path, fps: float = 4.0, height: int = 360) -> Path:
    """Write ``out`` (mp4): every decoded frame the model sampled, in time order, with the patches taken on
    it (green boxes, numbered by step) and the prediction after the latest step taken so far."""
    out = Path(out)
    frames = decoded.frames
    order = np.argsort(decoded.indices, kind="stable")
    scale = height / frames.shape[1]
    width = int(round(frames.shape[2] * scale / 2) * 2)
    by_frame: dict[int, list] = {}
    for patch in result.patches:
        by_frame.setdefault(patch.frame, []).append(patch)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=out.parent)
    os.close(fd)
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        os.unlink(tmp)
        raise VideoError(f"cannot write a video to {out}")
    try:
        seen = set()
        step_done = 0
        for row in order:
            frame_no = int(decoded.indices[row])
            if frame_no in seen:
                continue
            seen.add(frame_no)
            img = cv2.cvtColor(frames[row], cv2.COLOR_RGB2BGR)
            img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
            sx = width / decoded.width
            sy = height / decoded.height
            for patch in by_frame.get(frame_no, []):
                x0, y0, x1, y1 = patch.box
                p0 = (int(x0 * sx), int(y0 * sy))
                p1 = (int(x1 * sx), int(y1 * sy))
                cv2.rectangle(img, p0, p1, (0, 255, 0), 2)
                cv2.putText(img, str(patch.step), (p0[0] + 3, p0[1] + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                            (0, 255, 0), 1, cv2.LINE_AA)
                step_done = max(step_done, patch.step)
            info = result.steps[min(step_done, len(result.steps) - 1)]
            text = f"step {info['step']}: {info['label']} {info['score']:.2f}"
            cv2.rectangle(img, (0, 0), (width, 22), (0, 0, 0), -1)
            cv2.putText(img, text, (5, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
            writer.write(img)
        final = f"exit {result.exit_step} ({result.exit_reason}): {result.label} {result.score:.2f}, " \
                f"{result.gflops:.3g} GFLOPs"
        cv2.rectangle(img, (0, height - 24), (width, height), (0, 0, 0), -1)
        cv2.putText(img, final, (5, height - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1, cv2.LINE_AA)
        for _ in range(int(fps)):
            writer.write(img)
    finally:
        writer.release()
    os.replace(tmp, out)
    return out
