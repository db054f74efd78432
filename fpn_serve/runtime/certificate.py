"""Certified labels: when the label of an iterate is provably the label of the exact fixed point.

T is a gamma-contraction in u, so after an iteration with step ``||u_k - u_(k-1)||_2`` the iterate
is within ``e = gamma / (1 - gamma) * step`` of the fixed point u*. A logit difference
``l_top - l_j`` then moves by at most ``K_ij * e`` on the way to u*, where ``K_ij`` is the
manifest's ``certificate.pair_lipschitz[top][j]`` (for an affine S, ``||s_top - s_j||_2``). The label
is certified when every difference exceeds its bound:

    l_top - l_j > K_top,j * e * (1 + RELATIVE_MARGIN) + ABSOLUTE_MARGIN * (1 + |l_top| + |l_j|)

The margins cover float32 rounding: the step norm and the logits come out of float32 graphs (a
few units in the last place, about 1e-7 relative), so ``RELATIVE_MARGIN`` (1e-3) is far above
the rounding of ``e`` and ``ABSOLUTE_MARGIN`` (1e-4 of the logits' size) far above the rounding
of S's products. The check itself runs in float64. A model without a certificate in its
manifest, or with gamma >= 1, never certifies a label.
"""

from __future__ import annotations

import math

import numpy as np

from ..contract.manifest import Manifest

RELATIVE_MARGIN = 1e-3
ABSOLUTE_MARGIN = 1e-4


class LabelCertifier:
    """Checks labels against the certified contraction factor and S's pairwise Lipschitz table."""

    def __init__(self, manifest: Manifest) -> None:
        gamma = manifest.contraction.gamma
        cert = manifest.certificate
        self.available = cert is not None and gamma < 1
        self.factor = gamma / (1.0 - gamma) if gamma < 1 else float("inf")
        classes = len(manifest.labels)
        self._pair = np.asarray(cert.pair_lipschitz, np.float64) if cert is not None else np.zeros((classes, classes))
        rows = self._pair.tolist()
        # per top class, the (class, bound) pairs it is checked against: the one-answer path's table
        self._others = [[(j, k) for j, k in enumerate(row) if j != top] for top, row in enumerate(rows)]

    def error_bounds(self, steps: np.ndarray) -> np.ndarray:
        """Certified bound on ||u_k - u*|| per sample, float32 [n] (inf without a certificate)."""
        if self.factor == float("inf"):
            return np.full(steps.shape, np.inf, np.float32)
        bounds: np.ndarray = (steps * np.float32(self.factor)).astype(np.float32, copy=False)
        return bounds

    def certified(self, logits: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """bool [n]: whether each row's label (argmax of ``logits`` [n, classes]) is certified to be
        its fixed point's, given the step norms ``steps`` [n] of its last iteration."""
        n = len(steps)
        if not self.available or n == 0:
            return np.zeros(n, bool)
        if n == 1:  # one answer: plain floats are several times faster than small array operations
            return np.array([self._one(logits[0].tolist(), float(steps[0]))])
        lg = logits.astype(np.float64)
        rows = np.arange(n)
        top = lg.argmax(axis=1)
        l_top = lg[rows, top]
        err = steps.astype(np.float64) * (self.factor * (1.0 + RELATIVE_MARGIN))  # inf or nan: never certified
        # gap minus bound for every class; the top class itself is left out below
        slack = (l_top - ABSOLUTE_MARGIN * (1.0 + np.abs(l_top)))[:, None] - lg - ABSOLUTE_MARGIN * np.abs(lg)
        slack -= self._pair[top] * err[:, None]
        slack[rows, top] = np.inf
        with np.errstate(invalid="ignore"):
            certified: np.ndarray = (slack.min(axis=1) > 0) & np.isfinite(err)
        return certified

    def _one(self, logits: list[float], step: float) -> bool:
        err = step * (self.factor * (1.0 + RELATIVE_MARGIN))
        if not math.isfinite(err):
            return False
        l_top = max(logits)
        if not math.isfinite(l_top):
            return False
        base = l_top - ABSOLUTE_MARGIN * (1.0 + abs(l_top))
        for j, k in self._others[logits.index(l_top)]:  # the first largest, as argmax takes it
            v = logits[j]
            if not base - v - ABSOLUTE_MARGIN * abs(v) - k * err > 0:
                return False
        return True
