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


def threshold(thresholds, k: int) -> float | None:
    """``thresholds[k]`` as a float, or None where step k never exits on confidence: no table (None), a table
    shorter than k + 1 entries, or a None entry."""
    if thresholds is None or k >= len(thresholds) or thresholds[k] is None:
        return None
    return float(thresholds[k])


def passes(thresholds, k: int, score: float) -> bool:
    """THE exit rule: step k's criterion ``score`` exits the video when it reaches ``thresholds[k]``
    (``score >= T_k``; equality exits). A missing or None threshold never exits. Whether the last step ends
    the video anyway is the caller's step loop (see :func:`first_exit`), not this rule."""
    t = threshold(thresholds, k)
    return t is not None and float(score) >= t


def first_exit(scores: np.ndarray, thresholds) -> np.ndarray:
    """Per video, the first step k whose score :func:`passes` ``thresholds[k]``; the last step otherwise.

    scores: ``[B, E]`` (or ``[E]``); thresholds: ``E`` values (missing/None entries never exit).
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    e = s.shape[1]
    ts = [threshold(thresholds, k) for k in range(e)]
    defined = np.array([t is not None for t in ts], dtype=bool)
    t = np.array([np.inf if v is None else v for v in ts], dtype=np.float64)
    hit = defined[None, :] & (s >= t[None, :])  # passes(), vectorised
    hit[:, -1] = True  # the last step always ends the video
    return np.argmax(hit, axis=1)
