"""The inner loop: one application of T per call, on preallocated ping-pong buffers.

``StepRunner`` keeps the active samples in the first ``n`` rows of two latent buffers (``u`` and
``u_next`` swap roles every iteration) and a ``z`` buffer, all bound once to ONNX Runtime through
IOBinding. With the model's fused ``step`` graph an iteration is one ``run_with_iobinding`` and
nothing else: the per-sample residual and step size come out of the same run into buffers the
runner owns, and on the CPU the bindings for each active count are built once and cached, so the
runner allocates nothing per iteration. Without the fused graph the residual is computed from the
two buffers in numpy, whose temporaries are allocated every iteration. Samples join and leave
(compaction) at iteration boundaries, by a copy within the buffers.

With the model's ``steps`` graph (k applications of T per run, each row frozen by its own tol and
max_iter inside the graph) ``steps`` runs k iterations in one call: the host then decides, copies
and syncs once per k iterations instead of every one, with the same iterates, residuals and
counts as k single steps.

On CUDA the latent buffers live on the device and only the residual vector (a few bytes per
sample) crosses to the host each iteration (each k iterations with ``steps``); joining and
leaving go through the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from ..contract.residual import RESIDUAL_EPS


class StepRunner:
    """Runs u <- T(u, z) for up to ``capacity`` samples, reporting per-sample residuals."""

    def __init__(
        self,
        session: ort.InferenceSession,
        fused: bool,
        latent_shape: tuple[int, ...],
        capacity: int,
        device: str = "cpu",
        multi: ort.InferenceSession | None = None,
    ) -> None:
        if device == "cuda" and not fused:
            raise ValueError("the CUDA loop needs the model's fused step graph (step.onnx)")
        self._sess = session
        self._multi = multi  # the steps graph, if the folder has one
        # applications of T per run of it (its metadata), for the per-iteration cost
        self.k = int(multi.get_modelmeta().custom_metadata_map.get("fpn.steps", "1")) if multi is not None else 1
        self._fused = fused
        self._latent = latent_shape
        self._cuda = device == "cuda"
        self.capacity = capacity
        self.n = 0
        shape = (capacity, *latent_shape)
        # host mirrors; on the CPU these *are* the buffers ONNX Runtime reads and writes
        self._u = [np.zeros(shape, np.float32), np.zeros(shape, np.float32)]
        self._z = np.zeros(shape, np.float32)
        self._res = np.zeros(capacity, np.float32)
        self._step = np.zeros(capacity, np.float32)
        # the steps graph's per-row limits and counts, in and out
        self._tol = np.zeros(capacity, np.float32)
        self._max_iter = np.zeros(capacity, np.int32)
        self._iters = np.zeros(capacity, np.int32)
        self._iters_next = np.zeros(capacity, np.int32)
        self._multi_bindings: list[Any] = []
        self._cur = 0  # index of the buffer holding the current iterate
        self._bindings: list[Any] = []
        self._dev: list[Any] = []  # CUDA OrtValues: u0, u1, z
        # On the CPU the buffers never move, so the bindings for n active rows stay valid: keep them.
        self._cache: dict[int, tuple[list[Any], list[Any]]] = {}

    # -- membership --------------------------------------------------------------------------
    def add(self, z: np.ndarray, u0: np.ndarray | None = None) -> None:
        """Append samples with injection ``z`` [m, *latent], starting from ``u0`` (default u = 0)."""
        m = z.shape[0]
        if self.n + m > self.capacity:
            raise ValueError(f"{self.n + m} samples exceed the runner's capacity {self.capacity}")
        if self._cuda:
            self._pull()
        self._u[self._cur][self.n : self.n + m] = 0.0 if u0 is None else u0
        self._z[self.n : self.n + m] = z
        self.n += m
        self._rebind()

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the active rows where ``mask`` is True (the others have left)."""
        if self._cuda:
            self._pull()
        n2 = int(mask.sum())
        cur = self._u[self._cur]
        cur[:n2] = cur[: self.n][mask]
        self._z[:n2] = self._z[: self.n][mask]
        self.n = n2
        self._rebind()

    def clear(self) -> None:
        """Drop every row (the buffers and cached bindings stay, for the next samples)."""
        self.n = 0
        self._bindings = []
        self._multi_bindings = []

    @property
    def on_device(self) -> bool:
        """Whether the buffers live on a GPU, where each call ends in a sync with the host."""
        return self._cuda

    @property
    def multi(self) -> bool:
        """Whether ``steps`` can run several iterations per call (the folder has the steps graph)."""
        return self._multi is not None

    def current(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """A host copy of the current iterate of the given active rows (all by default)."""
        if self._cuda:
            self._pull()
        u = self._u[self._cur][: self.n]
        return (u if rows is None else u[rows]).copy()

    # -- the iteration -----------------------------------------------------------------------
    def step(self) -> tuple[np.ndarray, np.ndarray]:
        """One application of T to every active row; returns views of (residual, step_norm) [n].

        The views are valid until the next call.
        """
        n = self.n
        self._sess.run_with_iobinding(self._bindings[self._cur])
        if not self._fused:
            u_prev = self._u[self._cur][:n].reshape(n, -1)
            u_next = self._u[1 - self._cur][:n].reshape(n, -1)
            np.sqrt(np.einsum("ij,ij->i", u_next - u_prev, u_next - u_prev), out=self._step[:n])
            norm = np.sqrt(np.einsum("ij,ij->i", u_next, u_next))
            np.divide(self._step[:n], norm + RESIDUAL_EPS, out=self._res[:n])
        self._cur = 1 - self._cur
        return self._res[:n], self._step[:n]

    def steps(
        self, tol: np.ndarray, max_iter: np.ndarray, iterations: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to k applications of T in one run (``multi`` only): each active row moves while its
        count is below ``max_iter`` and its residual is not <= ``tol`` (the active set's rule), and
        then stays as it is. ``tol``, ``max_iter`` and ``iterations`` are [n] per row (float32,
        int32, int32: the counts so far); returns views of (residual, step_norm, iterations after)
        [n], valid until the next call."""
        n = self.n
        self._tol[:n], self._max_iter[:n], self._iters[:n] = tol, max_iter, iterations
        assert self._multi is not None
        self._multi.run_with_iobinding(self._multi_bindings[self._cur])
        self._cur = 1 - self._cur
        return self._res[:n], self._step[:n], self._iters_next[:n]

    # -- plumbing ----------------------------------------------------------------------------
    def _pull(self) -> None:
        """Copy the device iterate back to the host mirror (CUDA only)."""
        if self._dev and self.n:
            self._u[self._cur][: self.n] = self._dev[self._cur].numpy()[: self.n]

    def _rebind(self) -> None:
        n = self.n
        self._bindings, self._multi_bindings = [], []
        if n == 0:
            return
        if not self._cuda and n in self._cache:
            self._bindings, self._multi_bindings = self._cache[n]
            return
        shape = (n, *self._latent)
        if self._cuda:
            self._dev = [
                ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self._u[0][:n]), "cuda", 0),
                ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self._u[1][:n]), "cuda", 0),
                ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self._z[:n]), "cuda", 0),
            ]
        for src in (0, 1):
            b = self._bind_latents(self._sess, src, shape)
            if self._fused:
                b.bind_output("residual", "cpu", 0, np.float32, (n,), self._res.ctypes.data)
                b.bind_output("step_norm", "cpu", 0, np.float32, (n,), self._step.ctypes.data)
            self._bindings.append(b)
            if self._multi is not None:
                self._multi_bindings.append(self._bind_multi(src, n, shape))
        if not self._cuda:
            self._cache[n] = (self._bindings, self._multi_bindings)

    def _bind_latents(self, session: ort.InferenceSession, src: int, shape: tuple[int, ...]) -> Any:
        """A binding of ``session`` reading ``u`` from buffer ``src`` (and ``z``), writing ``u_next``
        into the other: on the device on CUDA, else the host buffers themselves."""
        b = session.io_binding()
        if self._cuda:
            b.bind_ortvalue_input("u", self._dev[src])
            b.bind_ortvalue_input("z", self._dev[2])
            b.bind_ortvalue_output("u_next", self._dev[1 - src])
        else:
            b.bind_input("u", "cpu", 0, np.float32, shape, self._u[src].ctypes.data)
            b.bind_input("z", "cpu", 0, np.float32, shape, self._z.ctypes.data)
            b.bind_output("u_next", "cpu", 0, np.float32, shape, self._u[1 - src].ctypes.data)
        return b

    def _bind_multi(self, src: int, n: int, shape: tuple[int, ...]) -> Any:
        """The steps graph's binding from buffer ``src`` to the other, for ``n`` active rows."""
        assert self._multi is not None
        b = self._bind_latents(self._multi, src, shape)
        for name, arr in (("tol", self._tol), ("max_iter", self._max_iter), ("iterations", self._iters)):
            b.bind_input(name, "cpu", 0, arr.dtype, (n,), arr.ctypes.data)
        for name, arr in (("residual", self._res), ("step_norm", self._step), ("iterations_next", self._iters_next)):
            b.bind_output(name, "cpu", 0, arr.dtype, (n,), arr.ctypes.data)
        return b
