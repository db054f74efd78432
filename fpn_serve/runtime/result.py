"""What a classification returns: ``ClassifyResult``, per input, in input order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, overload

import numpy as np

from .active import Trace

if TYPE_CHECKING:
    from .certificate import LabelCertifier


class _Derived:
    """A ``ClassifyResult`` field that may be passed in, or else is computed from the result's other
    fields when first read (a caller that never reads it does not pay for it)."""

    def __init__(self, compute: Callable[[ClassifyResult], np.ndarray]) -> None:
        self._compute = compute

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = "_" + name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> None: ...
    @overload
    def __get__(self, obj: ClassifyResult, objtype: type | None = None) -> np.ndarray: ...
    def __get__(self, obj: ClassifyResult | None, objtype: type | None = None) -> np.ndarray | None:
        if obj is None:
            return None  # the dataclass default: compute on demand
        value: np.ndarray | None = obj.__dict__.get(self._slot)
        if value is None:
            value = obj.__dict__[self._slot] = self._compute(obj)  # a cache: the result stays as it was
        return value

    def __set__(self, obj: ClassifyResult, value: np.ndarray | None) -> None:
        obj.__dict__[self._slot] = value


def _certified(result: ClassifyResult) -> np.ndarray:
    if result.certifier is None or result.steps is None:
        return np.zeros(len(result.labels), bool)
    return result.certifier.certified(result.logits, result.steps)


@dataclass(frozen=True)
class ClassifyResult:
    """Per-input results of one ``classify`` call, in input order (arrays of length batch).

    ``probabilities`` (float32 [B, classes], the softmax of the logits) and ``certified`` (bool
    [B]: the label is provably that of the exact fixed point, see ``certificate.py``) may be
    passed in; if not, they are computed when first read. ``latents`` are the final iterates
    where the path that ran keeps them (the step loop; a warm start's next ``u0``), ``trace`` the
    per-iteration record of a request that asked for one.
    """

    labels: np.ndarray  # int64 [B], index into ``names``
    logits: np.ndarray  # float32 [B, classes]
    iterations: np.ndarray  # int32 [B], applications of T
    residuals: np.ndarray  # float32 [B], relative step size at exit
    converged: np.ndarray  # bool [B], residual <= tol
    error_bounds: np.ndarray  # float32 [B], certified bound on ||u - u*|| from gamma and the last step
    names: tuple[str, ...]  # label names of the model, by class index
    probabilities: _Derived = _Derived(lambda r: softmax(r.logits))  # float32 [B, classes]
    certified: _Derived = _Derived(_certified)  # bool [B]
    steps: np.ndarray | None = field(default=None, repr=False, compare=False)  # float32 [B], last ||u_k - u_(k-1)||
    certifier: LabelCertifier | None = field(default=None, repr=False, compare=False)
    latents: np.ndarray | None = field(default=None, repr=False, compare=False)  # float32 [B, *latent]
    trace: Trace | None = field(default=None, repr=False, compare=False)

    def take(self, rows: slice, trace: Trace | None = None) -> ClassifyResult:
        """The result of a consecutive range of its inputs (with ``trace``, that range's own trace;
        else the slice of this result's). Built without the dataclass's checks: one per answer."""
        part = object.__new__(ClassifyResult)
        d = self.__dict__
        part.__dict__.update(
            labels=self.labels[rows],
            logits=self.logits[rows],
            iterations=self.iterations[rows],
            residuals=self.residuals[rows],
            converged=self.converged[rows],
            error_bounds=self.error_bounds[rows],
            names=self.names,
            _probabilities=None if d.get("_probabilities") is None else d["_probabilities"][rows],
            _certified=None if d.get("_certified") is None else d["_certified"][rows],
            steps=None if self.steps is None else self.steps[rows],
            certifier=self.certifier,
            latents=None if self.latents is None else self.latents[rows],
            trace=trace if trace is not None else None if self.trace is None else self.trace.take(rows),
        )
        return part


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float32 logits [B, classes], in float32."""
    if logits.shape[0] == 1:  # the same numbers, a little faster than the reductions along an axis
        expo = logits - logits.max()
        np.exp(expo, out=expo)
        expo /= expo.sum()
    else:
        expo = logits - logits.max(axis=1, keepdims=True)
        np.exp(expo, out=expo)
        expo /= expo.sum(axis=1, keepdims=True)
    probabilities: np.ndarray = expo.astype(np.float32, copy=False)
    return probabilities
