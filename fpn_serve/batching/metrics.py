"""Prometheus metrics of one server process (``GET /metrics``), in a registry of their own.

Requests by route and status with their latency; per answered input its iterations, its
residual at exit and whether it converged; per model the active batch, the queue depth and the
requests given up on before their answer (timed out, or their client gone); per model the live
sequences (warm starts of streams), the bytes their latents keep, and the sequences dropped
before their end (idle too long, or pushed out by newer ones beyond ``max_sequences``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..runtime.engine import ClassifyResult
    from .scheduler import Scheduler
    from .sequences import SequenceStore

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
ITERATION_BUCKETS = (1, 2, 3, 5, 8, 13, 20, 30, 50, 100, 200, 500, 1000)
RESIDUAL_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fpn_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "fpn_request_seconds",
            "HTTP request latency by route and status",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.iterations = Histogram(
            "fpn_iterations", "T applications per answered input", ["model"], buckets=ITERATION_BUCKETS, registry=r
        )
        self.residual = Histogram(
            "fpn_residual",
            "relative residual at exit per answered input",
            ["model"],
            buckets=RESIDUAL_BUCKETS,
            registry=r,
        )
        self.not_converged = Counter(
            "fpn_not_converged", "answered inputs that stopped before their tol", ["model"], registry=r
        )
        self.abandoned = Counter(
            "fpn_abandoned",
            "requests given up on before their answer, by reason (timeout, client_gone)",
            ["model", "reason"],
            registry=r,
        )
        self.active = Gauge("fpn_active_batch", "inputs in the model's active batch", ["model"], registry=r)
        self.queue = Gauge("fpn_queue_depth", "requests waiting to join the active batch", ["model"], registry=r)
        self._per_model: dict[str, tuple[Histogram, Histogram]] = {}
        self._per_route: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._sequences = _SequenceCollector()
        r.register(self._sequences)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        children = self._per_route.get((route, status))
        if children is None:  # the labelled series of a route and status, looked up once
            label = str(status)
            children = self._per_route[route, status] = (
                self.requests.labels(route, label),
                self.latency.labels(route, label),
            )
        count, latency = children
        count.inc()
        latency.observe(seconds)

    def observe_result(self, model: str, result: ClassifyResult) -> None:
        children = self._per_model.get(model)
        if children is None:  # the labelled series of a model, looked up once
            children = self._per_model[model] = (self.iterations.labels(model), self.residual.labels(model))
        it, res = children
        for iterations, residual in zip(result.iterations.tolist(), result.residuals.tolist(), strict=True):
            it.observe(iterations)
            res.observe(residual)
        missed = len(result.converged) - int(np.count_nonzero(result.converged))
        if missed:
            self.not_converged.labels(model).inc(missed)

    def observe_abandoned(self, model: str, reason: str) -> None:
        self.abandoned.labels(model, reason).inc()

    def render(self, schedulers: dict[str, Scheduler], sequences: Mapping[str, SequenceStore] | None = None) -> bytes:
        """The text exposition, with the schedulers' and the sequence stores' state read now."""
        for name, sched in schedulers.items():
            self.active.labels(name).set(sched.active)
            self.queue.labels(name).set(sched.queue_depth)
        self._sequences.stores = dict(sequences or {})
        return generate_latest(self.registry)


class _SequenceCollector(Collector):
    """The sequence stores' state, read at each scrape (the stores count their own drops)."""

    def __init__(self) -> None:
        self.stores: dict[str, SequenceStore] = {}

    def collect(self) -> Iterator[Metric]:
        live = GaugeMetricFamily("fpn_sequences", "live sequences whose last fixed point is kept", labels=["model"])
        kept = GaugeMetricFamily("fpn_sequence_bytes", "bytes the live sequences' latents keep", labels=["model"])
        dropped = CounterMetricFamily(
            "fpn_sequences_dropped",
            "sequences dropped before their end (idle, or beyond max_sequences)",
            labels=["model"],
        )
        for name, store in self.stores.items():
            live.add_metric([name], len(store))
            kept.add_metric([name], store.nbytes)
            dropped.add_metric([name], store.dropped)
        yield from (live, kept, dropped)
