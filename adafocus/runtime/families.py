"""Model families behind one small interface: how a family's focus steps feed the backbone and the head.

A family gets a flight once its policy has run (``start``), cuts the patches of its next ``n`` steps
(``patches``), builds the head's feed from the features of the flights going on (``head_feed``) and reads
the head's outputs back into them (``absorb``). ``steps`` is the number of focus steps, ``patch_input`` the
backbone's input name, ``views`` the numbers of views (crops of every frame, each its own row of every
engine call, logits averaged per exit) the family is evaluated with. A new family is one class here and one
entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from adafocus.runtime.scheduler import Flight


class BaseFamily:
    """K focus steps of one patch each; the classifier's running state goes from step to step.

    The backbone takes any number of patches, so a chunk of a video's next steps (and the chunks of every
    video in flight) goes through it in one call; the head then runs step by step on the features."""

    patch_input = "patch"
    views = (1,)  # upstream evaluates the base family on the centre crop only

    def __init__(self, manifest):
        self.pre = manifest.preprocessing
        self.steps = len(manifest.costs.exits) - 1
        state = next(t for t in manifest.stages["head"].inputs if t.name == "state")  # checked by check_manifest
        self.state_dim = int(state.shape[1])

    def start(self, flight: Flight, xp) -> None:
        flight.state = xp.zeros((1, self.state_dim), np.float32)
        flight.source.prepare(flight.boxes, self.pre)

    def patches(self, f: Flight, n: int, xp) -> Any:
        """The patches of the flight's next ``n`` steps ``[n, 3, P, P]``."""
        k0 = f.steps
        rows = [f.source.patch(k, int(f.positions[k]), f.boxes, self.pre) for k in range(k0, k0 + n)]
        return rows[0] if n == 1 else xp.concatenate(rows)

    def head_feed(self, flights: list[Flight], features: list[Any], xp) -> dict[str, Any]:
        if len(flights) == 1:
            f = flights[0]
            return {"features": features[0], "state": f.state, "context": f.context, "step": step_feed(f.steps)}
        return {"features": cat_rows(features, xp), "state": cat_rows([f.state for f in flights], xp),
                "context": cat_rows([f.context for f in flights], xp),
                "step": np.array([f.steps for f in flights], np.int64)}

    def absorb(self, flights: list[Flight], out: dict[str, Any]) -> None:
        new_state = out["new_state"]
        for i, f in enumerate(flights):
            f.state = new_state if len(flights) == 1 else new_state[i:i + 1]


class TsmFamily:
    """One focus step that takes all K patches (one box per video): the backbone sees the clip."""

    patch_input = "patches"
    views = (1,)  # the TSM reference has no multi-view evaluation to match

    def __init__(self, manifest):
        self.pre = manifest.preprocessing
        self.steps = 1

    def start(self, flight: Flight, xp) -> None:
        pass

    def patches(self, f: Flight, n: int, xp) -> Any:
        return f.source.patches(f.positions, f.boxes, self.pre)[None]  # [1, K, 3, P, P]

    def head_feed(self, flights: list[Flight], features: list[Any], xp) -> dict[str, Any]:
        return {"features": cat_rows(features, xp), "context": cat_rows([f.context for f in flights], xp)}

    def absorb(self, flights: list[Flight], out: dict[str, Any]) -> None:
        pass


class X3dFamily(TsmFamily):
    """Uni-AdaFocus-X3D: as TSM, one focus step on the clip of all K patches cut with one box per video; the
    backbone (X3D-L) gives the clip's pooled features, the head adds X3D-S's glance logits (``context``).

    Evaluated on 1 or 3 views (upstream's 3-crop test): a flight of V views has V rows in every call, each
    view its own policy, focus frames and box, so its one step is V clips."""

    views = (1, 3)

    def patches(self, f: Flight, n: int, xp) -> Any:
        """The clip of every view ``[V, K, 3, P, P]``."""
        clips = f.source.patches(f.positions, f.boxes, self.pre)
        return clips[None] if f.views == 1 else clips.reshape(f.views, -1, *clips.shape[1:])


FAMILIES = {"base": BaseFamily, "tsm": TsmFamily, "x3d": X3dFamily}


# ------------------------------------------------------------------------------------------ helpers
@functools.lru_cache(maxsize=256)
def step_feed(k: int) -> np.ndarray:
    """The head's ``step`` input for step k (made once: it is fed every step of every video)."""
    a = np.array([k], np.int64)
    a.setflags(write=False)
    return a


def cat_rows(rows: list[Any], xp) -> Any:
    """Concatenate per-video ``[1, ...]`` rows (host or device arrays) along the batch axis."""
    if all(isinstance(r, np.ndarray) for r in rows):
        return np.concatenate(rows)
    return xp.concatenate([xp.asarray(r) for r in rows])
