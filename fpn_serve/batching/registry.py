"""The models one server process serves: each loaded engine with its scheduler, by name.

    registry = load_registry([Path("models")], device="cpu")
    registry.start(max_active=256, max_queue=1024)
    engine = registry.get("mnist")              # ModelNotFound for a name that is not served
    registry.stop()

It knows no protocol: a missing model is a ``ModelNotFound``, which each protocol answers its way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..contract.store import discover
from ..errors import FPNServeError, ModelNotFound
from ..runtime.engine import Engine
from ..runtime.request import DEFAULT_MAX_ITER_CAP
from .metrics import Metrics
from .scheduler import Scheduler
from .sequences import SequenceStore

log = logging.getLogger("fpn_serve")


@dataclass
class ModelRegistry:
    """The loaded engines by name, each with its scheduler once started; the first one is the default."""

    engines: dict[str, Engine] = field(default_factory=dict)
    schedulers: dict[str, Scheduler] = field(default_factory=dict)
    sequences: dict[str, SequenceStore] = field(default_factory=dict)  # live streams' warm starts, by model
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False  # set on shutdown: readiness turns false while in-flight work finishes

    def get(self, name: str | None, version: str | None = None) -> Engine:
        """The engine named ``name`` (None: the default one), of ``version`` if one is given.

        Raises ModelNotFound, listing the served models."""
        if name is None:
            return next(iter(self.engines.values()))
        engine = self.engines.get(name)
        if engine is None:
            raise ModelNotFound(f"unknown model {name!r}; available: {', '.join(self.engines)}")
        if version is not None and version != engine.manifest.version:
            raise ModelNotFound(f"model {name!r} has version {engine.manifest.version!r}, not {version!r}")
        return engine

    def ready(self, name: str | None = None) -> bool:
        """Whether the model (every model, for None) takes requests: started and not draining."""
        if self.draining or not self.engines:
            return False
        return name in self.schedulers if name is not None else set(self.engines) <= set(self.schedulers)

    def start(
        self, *, max_active: int = 256, max_queue: int = 1024, max_sequences: int = 1024, sequence_idle_s: float = 60.0
    ) -> None:
        """Start a scheduler and a sequence store for each engine that has none."""
        for name, engine in self.engines.items():
            if name not in self.schedulers:
                sched = Scheduler(engine, max_active=max_active, max_queue=max_queue)
                sched.start()
                self.schedulers[name] = sched
            if name not in self.sequences:
                self.sequences[name] = SequenceStore(max_sequences, sequence_idle_s)

    def stop(self) -> None:
        """Finish what every scheduler runs and holds, then stop them."""
        for sched in self.schedulers.values():
            sched.stop()
        self.schedulers.clear()


def serving_threads(threads: int) -> int:
    """ONNX Runtime's threads for Q in a server: ``threads``, or for 0 one fewer than the CPUs this
    process may run on (at least one), so that Q's threads never crowd out the HTTP event loop."""
    if threads > 0:
        return threads
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable - 1)


def load_registry(
    paths: Iterable[Path],
    *,
    device: str = "auto",
    max_iter_cap: int = DEFAULT_MAX_ITER_CAP,
    threads: int = 0,
) -> ModelRegistry:
    """Load every model folder under ``paths`` (folders or stores of them); not started yet.

    Raises ModelError for a folder that cannot be served and FPNServeError for two models of one name."""
    registry = ModelRegistry()
    q_threads = serving_threads(threads)
    for folder in discover(list(paths)):
        engine = Engine.load(folder, device=device, max_iter_cap=max_iter_cap, threads=q_threads)
        if engine.name in registry.engines:
            raise FPNServeError(f"two model folders are named {engine.name!r}; names must be unique")
        registry.engines[engine.name] = engine
        log.info("serving model %s from %s", engine.name, folder)
    return registry
