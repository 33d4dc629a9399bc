"""Joining Ray for ``batch`` and ``serve``: which instance (``--ray``), and whether it has room for the workers.

``auto`` joins ``RAY_ADDRESS`` when it is set and starts a local instance otherwise; ``local`` always starts one;
anything else is a cluster address (``ray://head:10001``, ``head:6379``, ``auto`` for the cluster this machine is
part of). A process that already called ``ray.init`` (a notebook, a test) keeps its instance: it is not shut down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from adafocus.errors import ConfigError, require


@dataclass
class RaySession:
    """What :func:`connect` gives: the address joined (None: a new local instance) and the time it took."""

    address: str | None
    startup_s: float
    owned: bool  # this call started or joined Ray and shuts it down at the end


def address_for(mode: str) -> str | None:
    """The ``ray.init`` address for a ``--ray`` value (not ``off``): None starts a local instance."""
    value = mode.strip()
    low = value.lower()
    if not value:
        raise ConfigError("--ray must be auto, off, local or a cluster address")
    if low == "auto":
        return os.environ.get("RAY_ADDRESS") or None
    if low == "local":
        return "local" if os.environ.get("RAY_ADDRESS") else None  # "local": a new instance despite RAY_ADDRESS
    return value


@contextlib.contextmanager
def connect(mode: str, log: Callable[[str], None] | None = None) -> Iterator[RaySession]:
    """Ray joined for the block (see the module docstring); Ray Data's own progress bars and chatter are quieted
    for it (the commands print their own)."""
    ray = require("ray", "ray", "adafocus on Ray")
    address = address_for(mode)
    tick = time.perf_counter()
    owned = not ray.is_initialized()
    if owned:
        kwargs = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address}: {exc}") from None
    session = RaySession(address, time.perf_counter() - tick, owned)
    if log and owned:
        log(f"ray: {'joined ' + address if address and address != 'local' else 'started a local instance'} "
            f"in {session.startup_s:.1f} s ({_resources(ray)})")
    import ray.data  # noqa: F401 - imported first: it sets its logger's level on import

    quiet = {name: logging.getLogger(name) for name in ("ray.data", "ray.serve")}
    levels = {name: logger.level for name, logger in quiet.items()}
    for logger in quiet.values():
        logger.setLevel(logging.WARNING if logger.name == "ray.serve" else logging.ERROR)
    try:
        yield session
    finally:
        for name, logger in quiet.items():
            logger.setLevel(levels[name])
        if owned:
            ray.shutdown()


def check_room(workers: int, cpus: float, gpus: float, what: str) -> None:
    """ConfigError unless the cluster has ``workers`` x (``cpus``, ``gpus``) in all (Ray would wait forever)."""
    import ray

    have = ray.cluster_resources()
    for kind, each in (("CPU", cpus), ("GPU", gpus)):
        need = workers * each
        if need > have.get(kind, 0.0) + 1e-9:
            raise ConfigError(f"{workers} {what} need {need:g} {kind}s but the Ray cluster has "
                              f"{have.get(kind, 0.0):g}: lower their number or their {kind} share")


def _resources(ray) -> str:
    have = ray.cluster_resources()
    return ", ".join(f"{have.get(k, 0):g} {k}s" for k in ("CPU", "GPU") if k == "CPU" or have.get(k))
