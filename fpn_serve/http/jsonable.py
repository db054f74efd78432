"""Numbers for JSON answers: JSON has no inf or NaN, so such a value is sent as null."""

from __future__ import annotations

import math

import numpy as np


def json_floats(values: np.ndarray) -> list[float | None]:
    """The values as JSON numbers, with null for inf and NaN."""
    return [v if math.isfinite(v) else None for v in values.ravel().tolist()]
