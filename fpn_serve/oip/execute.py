"""Executing a validated inference request: its parameters parsed once, the runtime's prepared
request built (with a live sequence's warm start), run the protocol's way, the sequence kept."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from ..batching import parameters
from ..batching.registry import ModelRegistry
from ..runtime.engine import Engine
from ..runtime.request import Prepared
from ..runtime.result import ClassifyResult

Run = Callable[[Prepared], Awaitable[ClassifyResult]]  # how the protocol runs a prepared request


async def execute(
    registry: ModelRegistry,
    engine: Engine,
    x: np.ndarray,
    params: Mapping[str, Any],
    run: Run,
    *,
    started: float | None = None,
    from_text: bool = False,
) -> ClassifyResult:
    """Answer inputs ``x`` (from ``validate_inputs``) under the request's ``params`` (as received;
    names the runtime does not know are ignored, as the protocol allows). ``run`` executes the
    prepared request (HTTP: ``http.execute.run_model``, with its timeout and hang-up watch);
    ``started`` is the request's arrival (``time.perf_counter()``), from which deadlines count.
    ``from_text``: string values may spell numbers and flags (gRPC, where KServe's InferParameter
    has no double and a tol arrives as a string_param). Raises InputError for a bad parameter,
    and whatever ``run`` raises."""
    parsed = parameters.parse_parameters(params, from_text=from_text)
    sequences = registry.sequences.get(engine.name)
    prepared = parameters.prepare(
        engine, x, parsed, started=time.perf_counter() if started is None else started, sequences=sequences
    )
    result = await run(prepared)
    parameters.remember(parsed, result, sequences)
    return result
