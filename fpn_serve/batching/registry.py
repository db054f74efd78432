"""The models one server process serves: each loaded engine with its scheduler, by name.

    registry = load_registry([Path("models")], device="cpu")
    registry.start(max_active=256, max_queue=1024)
    engine = registry.get("mnist")              # ModelNotFound for a name that is not served
    with registry.lease("mnist") as engine:     # an unload or a replacement waits for the lease
        registry.scheduler_for(engine).submit_async(prepared)
    registry.index()                            # the store's models, READY or UNAVAILABLE
    registry.load("mnist"); registry.unload("mnist")
    registry.stop()

The repository (``index``, ``load``, ``unload``) is the folders given at start, by model name only.
A load validates the whole folder (``Engine.load``) before it is swapped in; the engine it replaces
(or an unloaded one) keeps its scheduler until every request holding a lease on it has let go and
what it runs and holds has finished. The engine tables are replaced, never changed in place, so a
reader iterating one is never disturbed by a load.

It knows no protocol: a missing model is a ``ModelNotFound``, which each protocol answers its way.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract.manifest import load_manifest
from ..contract.store import discover
from ..errors import FPNServeError, InputError, ModelError, ModelNotFound
from ..runtime.engine import Engine
from ..runtime.request import DEFAULT_MAX_ITER_CAP
from .metrics import Metrics
from .scheduler import Scheduler
from .sequences import SequenceStore

log = logging.getLogger("fpn_serve")

READY, UNAVAILABLE = "READY", "UNAVAILABLE"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a manifest's model name; never a path
DRAIN_WAIT_S = 120.0  # how long a replaced model waits for its leases before its scheduler stops anyway


@dataclass(frozen=True)
class LoadOptions:
    """How the registry loads a model folder (``Engine.load``'s options)."""

    device: str = "auto"
    max_iter_cap: int = DEFAULT_MAX_ITER_CAP
    threads: int = 1

    def load(self, folder: Path) -> Engine:
        return Engine.load(folder, device=self.device, max_iter_cap=self.max_iter_cap, threads=self.threads)


@dataclass(frozen=True)
class ModelState:
    """One entry of the repository index."""

    name: str
    version: str
    state: str  # READY or UNAVAILABLE
    reason: str = ""


@dataclass
class ModelRegistry:
    """The loaded engines by name, each with its scheduler once started; the first one is the default."""

    engines: dict[str, Engine] = field(default_factory=dict)
    schedulers: dict[str, Scheduler] = field(default_factory=dict)
    sequences: dict[str, SequenceStore] = field(default_factory=dict)  # live streams' warm starts, by model
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False  # set on shutdown: readiness turns false while in-flight work finishes
    stores: list[Path] = field(default_factory=list)  # the repository: the model folders or stores given at start
    options: LoadOptions = field(default_factory=LoadOptions)
    _scheduling: dict[str, Any] = field(default_factory=dict, repr=False)  # start()'s options, for later loads
    _leases: dict[int, int] = field(default_factory=dict, repr=False)  # id(engine) -> requests holding it
    _retired: dict[int, Scheduler] = field(default_factory=dict, repr=False)  # replaced engines' schedulers
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _lease_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # guards _leases alone
    _changing: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one load or unload at a time

    def get(self, name: str | None, version: str | None = None) -> Engine:
        """The engine named ``name`` (None: the default one), of ``version`` if one is given.

        Raises ModelNotFound, listing the served models."""
        engines = self.engines
        if name is None:
            if not engines:
                raise ModelNotFound("no model is loaded; load one through the model repository")
            return next(iter(engines.values()))
        engine = engines.get(name)
        if engine is None:
            raise ModelNotFound(f"unknown model {name!r}; available: {', '.join(engines) or 'none'}")
        if version is not None and version != engine.manifest.version:
            raise ModelNotFound(f"model {name!r} has version {engine.manifest.version!r}, not {version!r}")
        return engine

    def lease(self, name: str | None, version: str | None = None) -> _Lease:
        """``get``, held for a request's lifetime (``with registry.lease(name) as engine``): an
        engine unloaded or replaced meanwhile keeps its scheduler until every lease on it has ended."""
        with self._cond:  # no swap between the lookup and the lease
            engine = self.get(name, version)
            self._take(id(engine))
        return _Lease(self, engine)

    def hold(self, engine: Engine) -> _Lease:
        """A lease on an engine already looked up (``get``): it keeps its scheduler while held."""
        self._take(id(engine))
        return _Lease(self, engine)

    def _take(self, key: int) -> None:
        with self._lease_lock:  # a plain lock: every request takes it twice
            self._leases[key] = self._leases.get(key, 0) + 1

    def _give_back(self, key: int) -> None:
        with self._lease_lock:
            held = self._leases[key] - 1
            if held:
                self._leases[key] = held
            else:
                del self._leases[key]  # a drain waiting for it looks again within 50 ms

    def scheduler_for(self, engine: Engine) -> Scheduler:
        """The scheduler of ``engine``: the serving one, or the one it keeps while it drains after
        an unload or a replacement. Raises ModelNotFound once it has stopped."""
        sched = self.schedulers.get(engine.name)
        if sched is not None and sched.engine is engine:
            return sched
        retired = self._retired.get(id(engine))
        if retired is None:
            raise ModelNotFound(f"model {engine.name!r} has been unloaded")
        return retired

    def ready(self, name: str | None = None) -> bool:
        """Whether the model (every model, for None) takes requests: started and not draining."""
        if self.draining or not self.engines:
            return False
        return name in self.schedulers if name is not None else set(self.engines) <= set(self.schedulers)

    def start(
        self, *, max_active: int = 256, max_queue: int = 1024, max_sequences: int = 1024, sequence_idle_s: float = 60.0
    ) -> None:
        """Start a scheduler and a sequence store for each engine that has none."""
        self._scheduling = {
            "max_active": max_active,
            "max_queue": max_queue,
            "max_sequences": max_sequences,
            "sequence_idle_s": sequence_idle_s,
        }
        schedulers, sequences = dict(self.schedulers), dict(self.sequences)
        for name, engine in self.engines.items():
            if name not in schedulers:
                schedulers[name] = self._scheduler(engine)
            if name not in sequences:
                sequences[name] = SequenceStore(max_sequences, sequence_idle_s)
        self.schedulers, self.sequences = schedulers, sequences

    def _scheduler(self, engine: Engine) -> Scheduler:
        opts = self._scheduling
        sched = Scheduler(engine, max_active=opts.get("max_active", 256), max_queue=opts.get("max_queue", 1024))
        sched.start()
        # latency targets need this machine's costs: measured once the model serves, in its quiet moments
        threading.Thread(target=_measure_costs, args=(sched,), name=f"fpn-costs-{engine.name}", daemon=True).start()
        return sched

    def stop(self) -> None:
        """Finish what every scheduler runs and holds, then stop them."""
        for sched in [*self.schedulers.values(), *list(self._retired.values())]:
            sched.stop()
        self.schedulers = {}
        self._retired.clear()

    # the model repository

    def index(self) -> list[ModelState]:
        """Every model of the repository, READY when it serves, else UNAVAILABLE (with the reason)."""
        states: dict[str, ModelState] = {}
        for folder, found in self._store():
            if isinstance(found, ModelError):
                states.setdefault(folder.name, ModelState(folder.name, "", UNAVAILABLE, str(found)))
                continue
            name, version = found
            state = READY if self.ready(name) else UNAVAILABLE
            states[name] = ModelState(name, version, state, "" if state == READY else "not loaded")
        for name, engine in self.engines.items():  # served but not (or no longer) in the store
            if name not in states:
                states[name] = ModelState(name, engine.manifest.version, READY if self.ready(name) else UNAVAILABLE)
        return [states[n] for n in sorted(states)]

    def load(self, name: Any) -> Engine:
        """Load (or reload) the repository's model ``name``, fully validated before it is swapped in
        for new requests. Blocking: call it from a worker thread.

        Raises InputError for a name that is not a plain model name, ModelNotFound for one the
        repository does not hold, ModelError for a folder that cannot be served."""
        folder = self._folder_of(name)
        with self._changing:
            engine = self.options.load(folder)
            if engine.name != name:
                raise ModelError(f"model folder {folder.name!r} now names model {engine.name!r}, not {name!r}")
            self._swap(name, engine)
        log.info("loaded model %s from %s", name, folder)
        return engine

    def unload(self, name: Any) -> None:
        """Stop serving model ``name``; requests already holding it finish on it. Raises
        InputError for a name that is not a plain model name, ModelNotFound for one not served."""
        _check_name(name)
        with self._changing:
            if name not in self.engines:
                raise ModelNotFound(f"model {name!r} is not loaded; loaded: {', '.join(self.engines) or 'none'}")
            self._swap(name, None)
        log.info("unloaded model %s", name)

    def _swap(self, name: str, engine: Engine | None) -> None:
        """Serve ``engine`` under ``name`` (None: serve nothing there); retire the one it replaces."""
        sched = None if engine is None else self._scheduler(engine)
        opts = self._scheduling
        with self._cond:
            old, old_sched = self.engines.get(name), self.schedulers.get(name)
            engines, schedulers, sequences = dict(self.engines), dict(self.schedulers), dict(self.sequences)
            for table in (engines, schedulers, sequences):
                table.pop(name, None)
            if engine is not None and sched is not None:
                engines[name], schedulers[name] = engine, sched
                sequences[name] = SequenceStore(opts.get("max_sequences", 1024), opts.get("sequence_idle_s", 60.0))
            self.engines, self.schedulers, self.sequences = engines, schedulers, sequences
            if old is not None and old_sched is not None:
                self._retired[id(old)] = old_sched
        if old is not None and old_sched is not None:
            threading.Thread(target=self._drain, args=(old, old_sched), name=f"fpn-drain-{name}", daemon=True).start()
        if engine is None:  # /metrics stops reporting its batch and queue
            for gauge in (self.metrics.active, self.metrics.queue):
                with suppress(KeyError):
                    gauge.remove(name)

    def _drain(self, engine: Engine, sched: Scheduler) -> None:
        """Stop a retired engine's scheduler once no request holds the engine and it has finished."""
        key, give_up = id(engine), time.monotonic() + DRAIN_WAIT_S
        with self._cond:
            while self._leases.get(key, 0) and time.monotonic() < give_up:
                self._cond.wait(0.05)  # leases are given back without a notification: look again soon
        sched.stop()  # finishes what is active and queued
        with self._cond:
            self._retired.pop(key, None)

    def _store(self) -> list[tuple[Path, tuple[str, str] | ModelError]]:
        """The repository's model folders, each with its (name, version) or why it cannot be read."""
        found: list[tuple[Path, tuple[str, str] | ModelError]] = []
        for path in self.stores:
            try:
                folders = discover([path])
            except ModelError:
                continue  # a store emptied since the start holds no models now
            for folder in folders:
                try:
                    manifest = load_manifest(folder, verify_hashes=False)
                except ModelError as exc:
                    found.append((folder, exc))
                else:
                    found.append((folder, (manifest.name, manifest.version)))
        return found

    def _folder_of(self, name: Any) -> Path:
        _check_name(name)
        names = []
        for folder, found in self._store():
            if isinstance(found, tuple):
                if found[0] == name:
                    return folder
                names.append(found[0])
        raise ModelNotFound(f"the model repository holds no model {name!r}; it holds: {', '.join(names) or 'none'}")


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _PLAIN_NAME.match(name):
        raise InputError(f"{name!r} is not a model name (1-64 letters, digits, '_', '.' or '-', never a path)")


def _measure_costs(sched: Scheduler) -> None:
    """Time the engine for latency targets, each timed call when its scheduler is quiet (waiting
    at most two seconds for that): under steady traffic the measurement takes longer, but it neither
    slows the answers nor is slowed by them."""
    try:
        sched.engine.measure_costs(pause=lambda: sched.wait_quiet(timeout_s=2.0))
    except Exception:  # a latency target then measures on first use, and says so if it fails
        log.exception("model %s: measuring its costs for latency targets failed", sched.engine.name)


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
    """Load every model folder under ``paths`` (folders or stores of them); not started yet. The
    paths are the registry's model repository.

    Raises ModelError for a folder that cannot be served and FPNServeError for two models of one name."""
    paths = list(paths)
    registry = ModelRegistry(
        stores=paths, options=LoadOptions(device=device, max_iter_cap=max_iter_cap, threads=serving_threads(threads))
    )
    for folder in discover(paths):
        engine = registry.options.load(folder)
        if engine.name in registry.engines:
            raise FPNServeError(f"two model folders are named {engine.name!r}; names must be unique")
        registry.engines[engine.name] = engine
        log.info("serving model %s from %s", engine.name, folder)
    return registry


class _Lease:
    """One request's hold on an engine (``ModelRegistry.lease``/``hold``), given back on exit: a
    plain context manager, as it is on every request's path."""

    __slots__ = ("engine", "registry")

    def __init__(self, registry: ModelRegistry, engine: Engine) -> None:
        self.registry, self.engine = registry, engine

    def __enter__(self) -> Engine:
        return self.engine

    def __exit__(self, *exc: object) -> None:
        self.registry._give_back(id(self.engine))
