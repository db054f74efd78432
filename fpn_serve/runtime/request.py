"""Requests, validated once: a caller's inputs and parameters become a ``Prepared`` request.

Every protocol (HTTP ``/classify``, the Open Inference Protocol, the Python API) turns what it
received into a ``Prepared`` through ``RequestRules.prepare`` (``Engine.prepare``), which raises
``InputError`` naming the bad value and what is allowed. The engine and the scheduler execute a
``Prepared`` as it is and check nothing again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..contract.manifest import Manifest
from ..errors import InputError
from .targets import Choice, Targets

DEFAULT_MAX_ITER_CAP = 1000  # the largest max_iter a request may ask for, unless the server says otherwise
MAX_ABS_INPUT = 1e4  # normalised inputs are O(1); far larger ones only overflow the network
SOLVERS = ("fixed_point", "anderson")
STOPS = ("tol", "certified")  # stop at the tolerance, or at the first certified label


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request: the runtime trusts every field."""

    x: np.ndarray  # float32, C-contiguous [batch, *input_shape], finite, within +-MAX_ABS_INPUT
    tol: float  # 0 <= tol <= 1
    max_iter: int  # 1 <= max_iter <= the engine's cap
    solver: str = "fixed_point"  # one of SOLVERS
    deadline: float = math.inf  # absolute time.perf_counter() seconds; inf for none
    stop: str = "tol"  # one of STOPS
    trace: bool = False  # record every iteration's residual, label and certificate
    u0: np.ndarray | None = None  # float32 [batch, *latent] warm start; None: u = 0
    keep_latents: bool = False  # the answer must carry the final latents (result.latents), for a stream
    choice: Choice | None = None  # what a target chose (tol, max_iter and why), None for plain parameters

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def timed(self) -> bool:
        return self.deadline != math.inf

    @property
    def plain(self) -> bool:
        """A fixed-point solve from u = 0 at a tolerance, with nothing to record: what the
        single-graph variants (FPN.onnx, FPN1.onnx) answer in one call."""
        return (
            self.solver == "fixed_point"
            and self.deadline == math.inf
            and self.stop == "tol"
            and not self.trace
            and self.u0 is None
            and not self.keep_latents
        )


class RequestRules:
    """What a request to one model may ask for: its input shape, its defaults and the max_iter cap."""

    def __init__(self, manifest: Manifest, max_iter_cap: int = DEFAULT_MAX_ITER_CAP) -> None:
        self.targets = Targets(manifest, max_iter_cap)
        self.input_shape = tuple(manifest.input.shape)
        self.latent_shape = tuple(manifest.latent_shape)
        self.certifies = manifest.certificate is not None and manifest.contraction.gamma < 1
        self.default_tol = manifest.solver.tol
        self.max_iter_cap = max_iter_cap
        self.default_max_iter = min(manifest.solver.max_iter, max_iter_cap)

    def prepare(
        self,
        x: Any,
        tol: float | None = None,
        max_iter: int | None = None,
        *,
        solver: str = "fixed_point",
        deadline_ms: float | None = None,
        started: float | None = None,
        stop: str = "tol",
        trace: bool = False,
        u0: Any = None,
        keep_latents: bool = False,
        target_accuracy: float | None = None,
        latency_budget_ms: float | None = None,
        batch: int = 1,
    ) -> Prepared:
        """Check everything once; ``None`` takes the model's default. The deadline counts from
        ``started`` (a ``time.perf_counter()`` value; default: now). ``stop="certified"`` stops
        each input at its first certified label (a model whose manifest has a certificate);
        ``u0`` [batch, *latent] starts the iteration there instead of at 0. ``target_accuracy`` or
        ``latency_budget_ms`` choose tol and max_iter instead (see ``targets.py``; the latency at
        ``batch``, the size of the batch the request will run in; the budget is also the deadline).
        Raises InputError (TargetUnreachable for a target the model cannot meet)."""
        if started is None:
            started = time.perf_counter()
        arr = self.validate_inputs(x)
        choice = self._choose(tol, max_iter, target_accuracy, latency_budget_ms, batch)
        if choice is not None:
            tol, max_iter = choice.tol, choice.max_iter
            if latency_budget_ms is not None and deadline_ms is None:
                deadline_ms = latency_budget_ms
        tol, max_iter = self.resolve(tol, max_iter)
        if solver not in SOLVERS:
            raise InputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        deadline = math.inf
        if deadline_ms is not None:
            if (
                isinstance(deadline_ms, bool)
                or not isinstance(deadline_ms, (int, float))
                or not (math.isfinite(deadline_ms) and deadline_ms > 0)
            ):
                raise InputError(f"deadline_ms must be a positive number, got {deadline_ms!r}")
            deadline = started + deadline_ms / 1000.0
        if stop not in STOPS:
            raise InputError(f"unknown stop {stop!r}; choose one of {', '.join(STOPS)}")
        if stop == "certified" and not self.certifies:
            raise InputError("stop=certified needs a model whose manifest certifies labels; this one does not")
        if not isinstance(trace, bool):
            raise InputError(f"trace must be true or false, got {trace!r}")
        start = self._start(u0, arr.shape[0])
        return Prepared(arr, tol, max_iter, solver, deadline, stop, trace, start, keep_latents, choice)

    def _choose(
        self,
        tol: float | None,
        max_iter: int | None,
        target_accuracy: float | None,
        latency_budget_ms: float | None,
        batch: int,
    ) -> Choice | None:
        if target_accuracy is None and latency_budget_ms is None:
            return None
        if target_accuracy is not None and latency_budget_ms is not None:
            raise InputError("give target_accuracy or latency_budget_ms, not both")
        if tol is not None or max_iter is not None:
            raise InputError("a target chooses tol and max_iter itself; give either the target or tol/max_iter")
        if target_accuracy is not None:
            if not _finite(target_accuracy) or not 0 < target_accuracy <= 1:
                raise InputError(
                    f"target_accuracy must be a number with 0 < target_accuracy <= 1, got {target_accuracy!r}"
                )
            return self.targets.for_accuracy(float(target_accuracy))
        assert latency_budget_ms is not None
        if not _finite(latency_budget_ms) or not latency_budget_ms > 0:
            raise InputError(f"latency_budget_ms must be a positive number, got {latency_budget_ms!r}")
        return self.targets.for_latency(float(latency_budget_ms), batch)

    def _start(self, u0: Any, rows: int) -> np.ndarray | None:
        if u0 is None:
            return None
        want = (rows, *self.latent_shape)
        if not isinstance(u0, np.ndarray) or u0.dtype.kind != "f" or u0.shape != want:
            got = list(u0.shape) if isinstance(u0, np.ndarray) else type(u0).__name__
            raise InputError(f"u0 must be a float array of shape {list(want)} (one latent per input), got {got}")
        start: np.ndarray = np.ascontiguousarray(u0, dtype=np.float32)
        if not np.isfinite(start).all():
            raise InputError("u0 contains NaN or infinite values")
        return start

    def validate_inputs(self, x: Any) -> np.ndarray:
        """Return ``x`` as a C-contiguous float32 array [batch, *input_shape] or raise InputError."""
        shape = self.input_shape
        if not isinstance(x, np.ndarray):
            raise InputError(f"inputs must be a numpy array of shape {_batched(shape)}, got {type(x).__name__}")
        if x.dtype.kind != "f":
            raise InputError(f"inputs must be floating point (float32), got dtype {x.dtype}")
        if x.ndim != len(shape) + 1 or x.shape[1:] != shape or x.shape[0] < 1:
            raise InputError(f"inputs have shape {list(x.shape)}; expected {_batched(shape)} with batch >= 1")
        arr: np.ndarray = np.ascontiguousarray(x, dtype=np.float32)
        # One cheap pass for the common case: a sum of squares within MAX_ABS_INPUT^2 bounds every
        # value, and NaN or inf fail the test. Otherwise look closer.
        if not np.vdot(arr, arr) <= MAX_ABS_INPUT * MAX_ABS_INPUT:
            peak = np.abs(arr).max()
            if not np.isfinite(peak):
                raise InputError("inputs contain NaN or infinite values; only finite numbers are allowed")
            if peak > MAX_ABS_INPUT:
                raise InputError(f"inputs reach {peak:.3g}; normalised inputs must lie within +-{MAX_ABS_INPUT:g}")
        return arr

    def resolve(self, tol: float | None, max_iter: int | None) -> tuple[float, int]:
        """Fill in the defaults and check the ranges: 0 <= tol <= 1, 1 <= max_iter <= cap."""
        tol = self.default_tol if tol is None else tol
        max_iter = self.default_max_iter if max_iter is None else max_iter
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or not 0 <= tol <= 1:
            raise InputError(f"tol must be a number with 0 <= tol <= 1, got {tol!r}")
        if (
            isinstance(max_iter, bool)
            or not isinstance(max_iter, (int, np.integer))
            or not 1 <= max_iter <= self.max_iter_cap
        ):
            raise InputError(f"max_iter must be an integer from 1 to {self.max_iter_cap}, got {max_iter!r}")
        return float(tol), int(max_iter)


def _batched(shape: tuple[int, ...]) -> str:
    return f"[batch, {', '.join(map(str, shape))}]"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
