"""Exit criteria: how confident a step's logits are, and where a video exits given per-step thresholds."""

from __future__ import annotations

import numpy as np

from adafocus.errors import ConfigError

CRITERIA = ("max_logit", "neg_entropy")


def confidence(logits: np.ndarray, criterion: str = "max_logit") -> np.ndarray:
    """Score of logits ``[..., C]``: upstream's max raw logit, or the negative entropy of the softmax."""
    x = np.asarray(logits, dtype=np.float64)
    if criterion == "max_logit":
        return x.max(axis=-1)
    if criterion == "neg_entropy":
        z = x - x.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        return (np.exp(logp) * logp).sum(axis=-1)
    raise ConfigError(f"unknown exit criterion {criterion!r}; known: {', '.join(CRITERIA)}")


def first_exit(scores: np.ndarray, thresholds) -> np.ndarray:
    """Per video, the first step k whose score reaches ``thresholds[k]``; the last step otherwise.

    scores: ``[B, E]`` (or ``[E]``); thresholds: ``E`` values (missing/None entries never exit).
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    e = s.shape[1]
    t = np.full(e, np.inf)
    for k, v in enumerate(list(thresholds)[:e]):
        if v is not None:
            t[k] = float(v)
    hit = s >= t[None, :]
    hit[:, -1] = True
    return np.argmax(hit, axis=1)
