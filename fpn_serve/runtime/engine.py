"""The fixed-point engine: ONNX Runtime sessions for Q, T and S and the loop between them.

``Engine.load(model_dir)`` validates the folder and opens the sessions; ``engine.classify(x, tol,
max_iter)`` runs ``z = Q(x)``, iterates ``u <- T(u, z)`` from ``u = 0`` with per-sample stopping
(a converged sample leaves the active batch and is never updated again, so its answer is exactly
what it would be alone), and returns ``S(u)`` with per-sample diagnostics.

Where the folder has them, a plain request runs as one ONNX Runtime call: ``FPN1.onnx`` for a
single input on the CPU (the lowest latency), ``FPN.onnx`` for a batch. Both are composed from the
very nodes of Q, T, S and the fused residual, so every path gives the same answers to the bit.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..contract.manifest import Manifest, load_manifest
from ..errors import ModelError
from .active import ActiveSet, Inspect, SolveOutput, Trace, Work
from .certificate import LabelCertifier
from .providers import CUDA_PROVIDER, choose_providers, open_session
from .request import DEFAULT_MAX_ITER_CAP, Prepared, RequestRules
from .result import ClassifyResult, softmax
from .runner import StepRunner
from .solvers import anderson
from .targets import Costs, Targets

__all__ = ["DEFAULT_MAX_ITER_CAP", "ClassifyResult", "Engine", "softmax"]

log = logging.getLogger("fpn_serve")

RUNNER_CACHE_ROWS = 256  # step loops up to this many rows reuse a runner of their thread
MULTISTEP_ROWS = 64  # on the CPU the steps graph runs batches of 2 to this many rows (see multistep)


class Engine:
    """A loaded model: an ONNX Runtime session per graph of its folder (Q, T, S and the fused variants
    it has) and the fixed-point loop between them."""

    def __init__(
        self,
        manifest: Manifest,
        sessions: dict[str, ort.InferenceSession],
        model_dir: Path,
        device: str,
        max_iter_cap: int = DEFAULT_MAX_ITER_CAP,
    ) -> None:
        self.manifest = manifest
        self.model_dir = model_dir
        self.device = device
        self.max_iter_cap = max_iter_cap
        self.rules = RequestRules(manifest, max_iter_cap)
        self._q, self._t, self._s = sessions["Q"], sessions["T"], sessions["S"]
        self._step = sessions.get("step")
        self._steps = sessions.get("steps")
        self._fpn = sessions.get("fpn")
        # FPN1.onnx serves single inputs on the CPU; ONNX Runtime's CUDA Loop keeps its condition on
        # the host, where a one-input loop gains nothing over the batched graph
        single = sessions.get("fpn1") if device == "cpu" else None
        self._single = None if single is None else _OneInput(single, manifest.input.shape, len(manifest.labels))
        self._latent = tuple(manifest.latent_shape)
        # ||u_k - u*|| <= gamma / (1 - gamma) * ||u_k - u_{k-1}|| for a gamma-contraction
        self.certifier = LabelCertifier(manifest)
        self._runners = threading.local()  # each thread's cached step runners (see _runner_for)

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        device: str = "auto",
        max_iter_cap: int = DEFAULT_MAX_ITER_CAP,
        threads: int = 0,
    ) -> Engine:
        """Validate ``model_dir`` (manifest, sha256 of each graph, I/O names and shapes) and open it.

        ``device`` is ``auto`` (CUDA when it really initialises, else CPU), ``cpu``, ``cuda``, or an
        execution provider with options (``providers.choose_providers``). ``threads`` caps ONNX
        Runtime's intra-op threads for Q and FPN.onnx, which do a batch's work (0: its default);
        T, S, step.onnx and FPN1.onnx run on one thread. Raises ModelError with what is wrong.
        """
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir)
        providers, why = choose_providers(device, model_dir / manifest.graphs["S"].file)
        if providers[0] == CUDA_PROVIDER and "step" not in manifest.graphs:
            if device == "cuda":
                raise ModelError(f"{model_dir} has no step.onnx, which the CUDA loop needs; re-export it")
            providers, why = ["CPUExecutionProvider"], "the folder has no step.onnx for the CUDA loop"
        chosen = "cuda" if providers[0] == CUDA_PROVIDER else "cpu"
        log.info("model %s: running on %s (%s)", manifest.name, chosen, why)
        sessions = {}
        for role, ref in manifest.graphs.items():
            try:  # threads per role, Q in chunks on the CPU: providers.open_session
                sessions[role] = open_session(model_dir / ref.file, role, threads, providers, manifest.precision_name)
            except Exception as exc:
                raise ModelError(f"{model_dir}: {ref.file} does not load in ONNX Runtime: {exc}") from exc
        _check_signatures(manifest, sessions, model_dir)
        engine = cls(manifest, sessions, model_dir, chosen, max_iter_cap)
        engine._warm_up()
        return engine

    def _warm_up(self) -> None:
        """Run every path once, so that the first request does not pay ONNX Runtime's first-run costs."""
        x = np.zeros((1, *self.manifest.input.shape), np.float32)
        try:
            self.classify(x, max_iter=2)
            self.decode(self.solve(self.encode(x), 0.0, 2), 0.0)
            if self._steps is not None:  # the steps graph runs batches of two rows and more
                self.solve(self.encode(np.concatenate([x, x])), 0.0, 2)
        except Exception as exc:
            raise ModelError(f"{self.model_dir}: the graphs fail on a zero input: {exc}") from exc

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def single_graph(self) -> bool:
        """Whether one input runs as one ONNX Runtime call (FPN1.onnx, on the CPU)."""
        return self._single is not None

    # -- requests: validated once (``prepare``), then run as they are ------------------------
    def prepare(self, x: Any, tol: float | None = None, max_iter: int | None = None, **options: Any) -> Prepared:
        """Validate a request once; ``options`` are ``RequestRules.prepare``'s (solver, deadline_ms,
        started, stop, trace, u0, keep_latents, target_accuracy, latency_budget_ms, batch).
        Raises InputError."""
        if options.get("latency_budget_ms") is not None and self.rules.targets.costs is None:
            self.measure_costs()
        return self.rules.prepare(x, tol, max_iter, **options)

    @property
    def targets(self) -> Targets:
        """The calibration table as accuracy and latency targets (``GET /models`` shows it)."""
        return self.rules.targets

    def measure_costs(self, pause: Callable[[], object] | None = None) -> Costs:
        """Time Q, one step of T and S at a few batch sizes on this machine, for latency targets
        (a server does it when it starts, each timed call in a quiet moment: ``pause`` waits for
        one; otherwise the first latency target does)."""

        def run(x: np.ndarray, iterations: int) -> ClassifyResult:
            return self.run(Prepared(x, 0.0, iterations))

        costs = Costs.measure(run, tuple(self.manifest.input.shape), pause=pause)
        self.rules.targets.costs = costs
        return costs

    def validate_inputs(self, x: Any) -> np.ndarray:
        """Return ``x`` as a C-contiguous float32 array [batch, *input_shape] or raise InputError."""
        return self.rules.validate_inputs(x)

    def resolve(self, tol: float | None, max_iter: int | None) -> tuple[float, int]:
        """Fill in the manifest defaults and check the ranges: 0 <= tol <= 1, 1 <= max_iter <= cap."""
        return self.rules.resolve(tol, max_iter)

    def classify(self, x: Any, tol: float | None = None, max_iter: int | None = None, **options: Any) -> ClassifyResult:
        """Classify normalised inputs ``x`` [batch, *input_shape]; ``None`` takes the manifest default.

        Each sample iterates until its own residual is <= tol or it has had max_iter applications
        of T; a sample that stops leaves the active batch. ``tol=0`` runs max_iter iterations
        (unless a sample reaches an exact fixed point). ``solver`` is ``fixed_point`` or
        ``anderson``. With ``deadline_ms``, samples still running when that many milliseconds have
        passed since the call began stop at the next iteration boundary and answer with their
        current iterate (``converged`` False unless they met tol). ``stop="certified"`` stops each
        sample at its first certified label (``result.certified``) or max_iter; ``trace`` records
        every iteration (``result.trace``); ``u0`` [batch, *latent] starts from there instead of
        0 (the fixed point is unique: only the iterations change; ``result.latents`` of one call
        is the ``u0`` of the next, for a stream). ``target_accuracy`` or ``latency_budget_ms`` choose
        tol and max_iter (see ``targets.py``). Every option is ``prepare``'s. Raises InputError for
        a bad array or parameter.
        """
        return self.run(self.prepare(x, tol, max_iter, **options))

    def classify_fixed(self, x: Any, iterations: int) -> ClassifyResult:
        """Run exactly ``iterations`` applications of T for every sample, with no early exit.

        For parity checks against other implementations and for benchmarks; ``converged`` is
        always False.
        """
        prepared = self.prepare(x, max_iter=iterations)
        return self.decode(self.solve(self.encode(prepared.x), -1.0, prepared.max_iter), -1.0)

    def run(self, request: Prepared) -> ClassifyResult:
        """Execute a prepared request (nothing is checked again)."""
        x, tol, max_iter = request.x, request.tol, request.max_iter
        if request.plain:
            # the single-graph variants: Q, the loop and S in one ONNX Runtime call
            if self._single is not None and x.shape[0] == 1:
                return self._report(*self._single.run(x, tol, max_iter), tol)
            if self._fpn is not None:
                logits, iterations, residuals, steps = self._fpn.run(
                    None, {"x": x, "tol": np.array(tol, np.float32), "max_iter": np.array(max_iter, np.int64)}
                )
                return self._report(logits, iterations.astype(np.int32), residuals, steps, tol)
        out = self.solve(
            self.encode(x),
            tol,
            max_iter,
            solver=request.solver,
            deadline=request.deadline if request.timed else None,
            certify=request.stop == "certified",
            trace=request.trace,
            u0=request.u0,
        )
        return self.decode(out, tol, out.trace)

    def _report(
        self,
        logits: np.ndarray,
        iterations: np.ndarray,
        residuals: np.ndarray,
        steps: np.ndarray,
        tol: float | np.ndarray,
        latents: np.ndarray | None = None,
        trace: Trace | None = None,
    ) -> ClassifyResult:
        return ClassifyResult(
            labels=logits.argmax(axis=1).astype(np.int64, copy=False),
            logits=logits,
            iterations=iterations,
            residuals=residuals,
            converged=residuals <= tol,
            error_bounds=self.certifier.error_bounds(steps),
            names=self.manifest.labels,
            steps=steps,
            certifier=self.certifier,
            latents=latents,
            trace=trace,
        )

    # -- the three stages, public so that a scheduler can interleave them -------------------
    def encode(self, x: np.ndarray) -> np.ndarray:
        """z = Q(x) for validated inputs [B, *input_shape] -> [B, *latent]."""
        z: np.ndarray = self._q.run(["z"], {"x": x})[0]
        return z

    def decode(self, out: SolveOutput, tol: float | np.ndarray, trace: Trace | None = None) -> ClassifyResult:
        """S(u) and the per-sample report of a finished solve."""
        logits = self._s.run(["logits"], {"u": out.u})[0]
        return self._report(logits, out.iterations, out.residuals, out.steps, tol, out.u, trace)

    def inspect(self, u: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The top labels and certified flags of iterates ``u`` [m, *latent] whose last steps were
        ``steps`` [m] (an active set's ``inspect``)."""
        logits = self._s.run(["logits"], {"u": u})[0]
        return logits.argmax(axis=1), self.certifier.certified(logits, steps)

    def new_runner(self, capacity: int) -> StepRunner:
        """A step runner over this model's T (fused with its residual where the folder has one)."""
        fused = self._step is not None
        multi = self._steps if fused else None
        return StepRunner(self._step if fused else self._t, fused, self._latent, capacity, self.device, multi)

    def solve(
        self,
        z: np.ndarray,
        tol: float,
        max_iter: int,
        *,
        solver: str = "fixed_point",
        deadline: float | None = None,
        certify: bool = False,
        trace: bool = False,
        u0: np.ndarray | None = None,
    ) -> SolveOutput:
        """Iterate u <- T(u, z) from ``u0`` (default 0) with per-sample early exit (compaction of
        the active batch). ``deadline`` is an absolute ``time.perf_counter()`` value or None;
        ``certify`` stops each sample at its first certified label instead of at ``tol``;
        ``trace`` records every iteration (``SolveOutput.trace``).
        """
        batch = z.shape[0]
        active = ActiveSet(batch, self._latent)
        work = active.admit(
            batch, tol, max_iter, math.inf if deadline is None else deadline, certify=certify, trace=trace
        )
        if solver == "anderson":
            return anderson(self.apply_t, z, tol, max_iter, u0=u0, active=active, inspect=self.inspect)
        runner = self._runner_for(batch)
        runner.add(z, u0)

        def inspect(mask: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return self.inspect(runner.current(mask), steps)

        try:
            # rows only leave a solve: one that may never run several steps per call loops as before
            several = runner.multi and active.multistep and (runner.on_device or batch >= 2)
            while active.n:
                keep, _ = advance(runner, active, inspect, several and multistep(runner, active))
                if keep is not None and active.n:
                    runner.keep(keep)
        finally:
            runner.clear()
        return work.out

    def _runner_for(self, batch: int) -> StepRunner:
        """This thread's step runner for ``batch`` rows: one per power-of-two capacity up to
        RUNNER_CACHE_ROWS, kept with its bindings (a request's loop then allocates nothing to start)."""
        if batch > RUNNER_CACHE_ROWS or self.device != "cpu":
            return self.new_runner(batch)
        capacity = 1 << (batch - 1).bit_length()
        runners: dict[int, StepRunner] | None = getattr(self._runners, "by_capacity", None)
        if runners is None:
            runners = self._runners.by_capacity = {}
        runner = runners.get(capacity)
        if runner is None:
            runner = runners[capacity] = self.new_runner(capacity)
        return runner

    def apply_t(self, u: np.ndarray, z: np.ndarray) -> np.ndarray:
        """One application of T to a batch of latents: u_next = T(u, z) (T.onnx, no stopping)."""
        out: np.ndarray = self._t.run(["u_next"], {"u": u, "z": z})[0]
        return out


class _OneInput:
    """FPN1.onnx through IOBinding. Each calling thread binds its own input and output buffers once,
    so a request costs one copy of the input and one ONNX Runtime call; ``session.run`` would
    convert three inputs and four outputs on every call (about 5 us of a 0.1 ms answer)."""

    def __init__(self, session: ort.InferenceSession, input_shape: tuple[int, ...], classes: int) -> None:
        self.session = session
        self._input_shape = (1, *input_shape)
        self._classes = classes
        self._local = threading.local()

    def run(self, x: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Fresh (logits [1, classes], iterations int32 [1], residual [1], step_norm [1]) for one
        validated input [1, *input_shape]."""
        bound: _Bound | None = getattr(self._local, "bound", None)
        if bound is None:
            bound = self._local.bound = _Bound(self.session, self._input_shape, self._classes)
        np.copyto(bound.x, x)
        bound.tol[()] = tol
        bound.max_iter[()] = max_iter
        self.session.run_with_iobinding(bound.binding)
        logits, iterations, residual, step = bound.outputs
        return logits.copy(), iterations.astype(np.int32), residual.copy(), step.copy()


class _Bound:
    """One thread's buffers for FPN1.onnx and the binding that points ONNX Runtime at them."""

    def __init__(self, session: ort.InferenceSession, input_shape: tuple[int, ...], classes: int) -> None:
        self.x: np.ndarray = np.zeros(input_shape, np.float32)
        self.tol: np.ndarray = np.zeros((), np.float32)
        self.max_iter: np.ndarray = np.zeros((), np.int64)
        self.outputs: tuple[np.ndarray, ...] = (
            np.zeros((1, classes), np.float32),  # logits
            np.zeros(1, np.int64),  # iterations
            np.zeros(1, np.float32),  # residual
            np.zeros(1, np.float32),  # step_norm
        )
        self.binding = session.io_binding()
        inputs = {"x": self.x, "tol": self.tol, "max_iter": self.max_iter}
        for name, arr in inputs.items():
            self.binding.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        for name, arr in zip(("logits", "iterations", "residual", "step_norm"), self.outputs, strict=True):
            self.binding.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)


def multistep(runner: StepRunner, active: ActiveSet) -> bool:
    """Whether the next call of the loop runs k iterations through the steps graph: where the runner
    has it, the active set allows it (no stop decided on the host every iteration) and it pays. On
    the CPU it pays from 2 to MULTISTEP_ROWS rows: one row alone wastes the applications after its
    stop, and beyond that the graph's masks cost more than the host work they save (measured on the
    shipped model: 4 applications at batch 1, 32 and 256 take 1.0x, 1.0x and 1.1x the time of 4
    single steps). On a GPU, where every call syncs, always."""
    if not (runner.multi and active.multistep):
        return False
    return runner.on_device or 2 <= active.n <= MULTISTEP_ROWS


def advance(
    runner: StepRunner, active: ActiveSet, inspect: Inspect | None, several: bool
) -> tuple[np.ndarray | None, list[Work]]:
    """One call of the loop: k iterations through the steps graph if ``several`` (what ``multistep``
    said), else one; then the active set's stops. Returns ``ActiveSet.advance``'s (mask of rows
    that go on, works that finished)."""
    if several:
        r, st, iterations = runner.steps(*active.limits())
        return active.advance(r, st, runner.current, inspect, iterations)
    r, st = runner.step()
    return active.advance(r, st, runner.current, inspect)


def _check_signatures(manifest: Manifest, sessions: dict[str, ort.InferenceSession], model_dir: Path) -> None:
    """The graphs must have the I/O names of the contract, with shapes that match the manifest."""
    expected = {"Q": (["x"], ["z"]), "T": (["u", "z"], ["u_next"]), "S": (["u"], ["logits"])}
    if "step" in sessions:
        expected["step"] = (["u", "z"], ["u_next", "residual", "step_norm"])
    if "steps" in sessions:
        expected["steps"] = (
            ["u", "z", "tol", "max_iter", "iterations"],
            ["u_next", "residual", "step_norm", "iterations_next"],
        )
    for role in ("fpn", "fpn1"):
        if role in sessions:
            expected[role] = (["x", "tol", "max_iter"], ["logits", "iterations", "residual", "step_norm"])
    dims = {
        "x": list(manifest.input.shape),
        "z": list(manifest.latent_shape),
        "u": list(manifest.latent_shape),
        "u_next": list(manifest.latent_shape),
        "logits": [len(manifest.labels)],
        "residual": [],
        "step_norm": [],
        "iterations": [],
        "iterations_next": [],
        "tol": [],
        "max_iter": [],
    }
    for role, (ins, outs) in expected.items():
        sess = sessions[role]
        got_in = [i.name for i in sess.get_inputs()]
        got_out = [o.name for o in sess.get_outputs()]
        if sorted(got_in) != sorted(ins) or got_out != outs:
            raise ModelError(
                f"{model_dir}: graph {role} has inputs {got_in} and outputs {got_out}; "
                f"expected inputs {ins} and outputs {outs}"
            )
        for arg in [*sess.get_inputs(), *sess.get_outputs()]:
            static = arg.shape[1:]
            if len(static) != len(dims[arg.name]) or any(
                isinstance(d, int) and d != w for d, w in zip(static, dims[arg.name], strict=True)
            ):
                raise ModelError(
                    f"{model_dir}: graph {role} {arg.name} has shape {arg.shape}; "
                    f"the manifest implies [batch, {', '.join(map(str, dims[arg.name]))}]"
                )
    if "fpn1" in sessions:
        batch = next(i for i in sessions["fpn1"].get_inputs() if i.name == "x").shape[0]
        if isinstance(batch, int) and batch != 1:
            raise ModelError(f"{model_dir}: graph fpn1 is for one input, but its batch axis is {batch}")
