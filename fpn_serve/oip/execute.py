"""Executing a validated inference request: its parameters parsed once, the runtime's prepared
request built (with a live sequence's warm start), run the protocol's way, the sequence kept."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from ..batching import parameters
from ..batching.registry import ModelRegistry
from ..runtime.engine import Engine
from ..runtime.request import Prepared
from ..runtime.result import ClassifyResult
from ..runtime.targets import shown

Run = Callable[[Prepared], Awaitable[ClassifyResult]]  # how the protocol runs a prepared request


class Executed(NamedTuple):
    prepared: Prepared  # what ran: tol and max_iter as given, defaulted or chosen by a target
    result: ClassifyResult


def answer_parameters(prepared: Prepared) -> dict[str, float | int | str]:
    """The answer's ``parameters``: the tol, max_iter and stop that ran, and, where a target chose
    them, which target (``chosen_by``), its requested value and the accuracy bound and predicted
    p99 latency of the choice."""
    params: dict[str, float | int | str] = {"tol": prepared.tol, "max_iter": prepared.max_iter, "stop": prepared.stop}
    choice = prepared.choice
    if choice is not None:
        params["chosen_by"] = choice.target
        params["accuracy_lower_bound"] = shown(choice.lower_bound)
        if choice.requested is not None:
            params[choice.target] = choice.requested
        if choice.predicted_p99_ms is not None:
            params["predicted_p99_ms"] = round(choice.predicted_p99_ms, 4)
    return params


async def execute(
    registry: ModelRegistry,
    engine: Engine,
    x: np.ndarray,
    params: Mapping[str, Any],
    run: Run,
    *,
    started: float | None = None,
    from_text: bool = False,
) -> Executed:
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
    return Executed(prepared, result)
