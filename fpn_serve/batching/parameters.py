"""Request parameters, the same on every protocol: parsed once into ``RequestParameters``.

``/classify``'s query string, the Open Inference Protocol's request ``parameters`` (HTTP and
gRPC) and the Python API name the same things: ``tol``, ``max_iter``, ``deadline_ms``, ``solver``,
``stop``, ``trace``, the targets ``target_accuracy`` and ``latency_budget_ms`` (which choose tol
and max_iter), and Triton's sequence parameters ``sequence_id``, ``sequence_start`` and
``sequence_end``. A protocol collects what it received into a mapping (``from_text=True`` where
values arrive as text, as in a query string) and calls ``parse_parameters``; ``prepare`` then
turns the inputs and the parameters into the runtime's ``Prepared`` request, taking a live
sequence's warm start from the model's ``SequenceStore``, and ``remember`` keeps the answer's
latents for the sequence's next input. Unknown names are left to the protocol (the Open
Inference Protocol lets clients send parameters of their own).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..runtime.engine import Engine
from ..runtime.request import SOLVERS, STOPS, Prepared
from ..runtime.result import ClassifyResult
from .sequences import SequenceRef, SequenceStore, parse_sequence

PARAMETERS = (
    "tol",
    "max_iter",
    "deadline_ms",
    "solver",
    "stop",
    "trace",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "target_accuracy",
    "latency_budget_ms",
)
MAX_DEADLINE_MS = 60_000.0  # the longest deadline_ms or latency_budget_ms a caller may give
MAX_TOL = 1.0  # a caller's tol lies in (0, MAX_TOL]: tol=0, the engine's "run max_iter", is not offered on the wire


@dataclass(frozen=True)
class RequestParameters:
    """What a caller asked for, checked for type and range (the model-specific checks, such as
    max_iter against the server's cap, are ``Engine.prepare``'s)."""

    tol: float | None = None
    max_iter: int | None = None
    deadline_ms: float | None = None
    solver: str = "fixed_point"
    stop: str = "tol"
    trace: bool = False
    sequence: SequenceRef | None = None
    target_accuracy: float | None = None
    latency_budget_ms: float | None = None


def parse_parameters(params: Mapping[str, Any], *, from_text: bool = False) -> RequestParameters:
    """Check the known parameters in ``params`` (others are ignored); raises InputError naming the
    parameter, the value and what is allowed."""
    get = params.get
    tol = _number("tol", get("tol"), from_text)
    if tol is not None and not 0 < tol <= MAX_TOL:
        raise InputError(f"tol must be a number with 0 < tol <= {MAX_TOL:g}, got {tol:g}")
    max_iter = _integer("max_iter", get("max_iter"), from_text)
    if max_iter is not None and max_iter < 1:
        raise InputError(f"max_iter must be an integer >= 1, got {max_iter}")
    deadline_ms = _number("deadline_ms", get("deadline_ms"), from_text)
    if deadline_ms is not None and not 0 < deadline_ms <= MAX_DEADLINE_MS:
        raise InputError(
            f"deadline_ms must be a number with 0 < deadline_ms <= {MAX_DEADLINE_MS:g}, got {deadline_ms:g}"
        )
    solver = _choice("solver", get("solver", "fixed_point"), SOLVERS)
    stop = _choice("stop", get("stop", "tol"), STOPS)
    trace = bool(_flag("trace", get("trace"), from_text))
    sequence_id = get("sequence_id")
    if from_text and isinstance(sequence_id, str) and sequence_id.isdigit():
        sequence_id = int(sequence_id)
    sequence = parse_sequence(
        sequence_id,
        _flag("sequence_start", get("sequence_start"), from_text) or False,
        _flag("sequence_end", get("sequence_end"), from_text) or False,
    )
    target_accuracy = _number("target_accuracy", get("target_accuracy"), from_text)
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise InputError(f"target_accuracy must be a number with 0 < target_accuracy <= 1, got {target_accuracy:g}")
    budget = _number("latency_budget_ms", get("latency_budget_ms"), from_text)
    if budget is not None and not 0 < budget <= MAX_DEADLINE_MS:
        raise InputError(
            f"latency_budget_ms must be a number with 0 < latency_budget_ms <= {MAX_DEADLINE_MS:g}, got {budget:g}"
        )
    return RequestParameters(tol, max_iter, deadline_ms, solver, stop, trace, sequence, target_accuracy, budget)


def prepare(
    engine: Engine,
    x: Any,
    params: RequestParameters,
    *,
    started: float | None = None,
    sequences: SequenceStore | None = None,
    active: int = 0,
) -> Prepared:
    """The prepared request for inputs ``x`` under ``params``; a request of a live sequence starts
    from that sequence's last fixed point (``sequences``); a latency target is met at the batch
    size the request will run in (its rows plus the ``active`` rows it joins). Raises InputError."""
    u0 = None
    if params.sequence is not None:
        if sequences is None:
            raise InputError("this server keeps no sequences; send the request without sequence_id")
        u0 = sequences.start_of(params.sequence, _rows(x))
    return engine.prepare(
        x,
        params.tol,
        params.max_iter,
        solver=params.solver,
        deadline_ms=params.deadline_ms,
        started=started,
        stop=params.stop,
        trace=params.trace,
        u0=u0,
        keep_latents=params.sequence is not None,
        target_accuracy=params.target_accuracy,
        latency_budget_ms=params.latency_budget_ms,
        batch=_rows(x) + active,
    )


def _rows(x: Any) -> int:
    shape = getattr(x, "shape", None)
    return int(shape[0]) if shape else 1


def remember(params: RequestParameters, result: ClassifyResult, sequences: SequenceStore | None) -> None:
    """After an answer: keep a sequence's latents for its next input (forget them at its end)."""
    if params.sequence is not None and sequences is not None:
        sequences.update(params.sequence, result.latents)


def _number(name: str, value: Any, from_text: bool) -> float | None:
    if value is None:
        return None
    if from_text and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, from_text: bool) -> int | None:
    if value is None:
        return None
    if from_text and isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise InputError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON clients may send 50.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    return str(value)


def _flag(name: str, value: Any, from_text: bool) -> bool | None:
    if value is None:
        return None
    if from_text and isinstance(value, str):
        lowered = value.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r}")
    return value
