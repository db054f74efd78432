"""Numbers for JSON answers: JSON has no inf or NaN, so such a value is sent as null."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from starlette.responses import JSONResponse


def json_floats(values: np.ndarray) -> list[float | None]:
    """The values as JSON numbers, with null for inf and NaN."""
    return [v if math.isfinite(v) else None for v in values.ravel().tolist()]


class FastJSONResponse(JSONResponse):
    """A JSON answer written by orjson: compact, UTF-8, several times faster than the standard
    library's encoder on an answer's lists of floats (the same numbers: both write the shortest
    text that reads back as the same float)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
