"""What a classification returns: ``ClassifyResult``, per input, in input order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import numpy as np


class _Softmax:
    """``ClassifyResult.probabilities``: as given, or else the softmax of the result's logits,
    computed when first read (a caller that needs only labels or logits does not pay for it)."""

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
            value = obj.__dict__[self._slot] = softmax(obj.logits)  # a cache: the result stays as it was
        return value

    def __set__(self, obj: ClassifyResult, value: np.ndarray | None) -> None:
        obj.__dict__[self._slot] = value


@dataclass(frozen=True)
class ClassifyResult:
    """Per-input results of one ``classify`` call, in input order (arrays of length batch).

    ``probabilities`` (float32 [B, classes], the softmax of the logits) may be passed in; if not,
    it is computed from ``logits`` when first read.
    """

    labels: np.ndarray  # int64 [B], index into ``names``
    logits: np.ndarray  # float32 [B, classes]
    iterations: np.ndarray  # int32 [B], applications of T
    residuals: np.ndarray  # float32 [B], relative step size at exit
    converged: np.ndarray  # bool [B], residual <= tol
    error_bounds: np.ndarray  # float32 [B], certified bound on ||u - u*|| from gamma and the last step
    names: tuple[str, ...]  # label names of the model, by class index
    probabilities: _Softmax = _Softmax()  # float32 [B, classes]


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
