"""Request parameters parsed once for every protocol, and the store of live sequences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fpn_serve import Engine, InputError
from fpn_serve.batching.parameters import RequestParameters, parse_parameters, prepare, remember
from fpn_serve.batching.sequences import SequenceRef, SequenceStore, parse_sequence


def test_text_and_typed_parameters_mean_the_same() -> None:
    text = parse_parameters(
        {"tol": "1e-3", "max_iter": "50", "stop": "certified", "trace": "true", "sequence_id": "7"}, from_text=True
    )
    typed = parse_parameters({"tol": 1e-3, "max_iter": 50, "stop": "certified", "trace": True, "sequence_id": 7})
    assert text == typed == RequestParameters(1e-3, 50, None, "fixed_point", "certified", True, SequenceRef(7))
    assert parse_parameters({"max_iter": 50.0}).max_iter == 50  # a JSON client's whole float
    assert parse_parameters({"unknown": 1}) == RequestParameters()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tol": 0}, "tol must be a number with 0 < tol <= 1"),
        ({"tol": "x"}, "tol must be a finite number"),
        ({"tol": True}, "tol must be a finite number"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"max_iter": 2.5}, "max_iter must be an integer"),
        ({"deadline_ms": -1}, "deadline_ms must be a number with 0 < deadline_ms"),
        ({"solver": "newton"}, "unknown solver 'newton'; choose one of fixed_point, anderson"),
        ({"stop": "never"}, "unknown stop 'never'; choose one of tol, certified"),
        ({"trace": "yes"}, "trace must be true or false"),
        ({"sequence_id": -3}, "sequence_id must be a positive integer or a string"),
        ({"sequence_id": 1.5}, "sequence_id must be a positive integer or a string"),
        ({"sequence_end": True}, "sequence_start and sequence_end need a sequence_id"),
        ({"sequence_id": "s", "sequence_start": 1}, "sequence_start must be true or false"),
    ],
)
def test_bad_parameters_name_what_is_allowed(params: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_parameters(params)


def test_a_sequence_keeps_its_last_fixed_point_until_its_end(shipped_model: Path) -> None:
    engine = Engine.load(shipped_model, device="cpu")
    store = SequenceStore(max_sequences=4)
    rng = np.random.default_rng(0)
    frame = rng.normal(0, 1, (1, 1, 28, 28)).astype(np.float32)
    first = parse_parameters({"sequence_id": "cam-1", "sequence_start": True, "tol": 1e-6})
    cold = engine.run(prepare(engine, frame, first, sequences=store))
    remember(first, cold, store)
    assert len(store) == 1 and store.nbytes == 46 * 4
    nxt = parse_parameters({"sequence_id": "cam-1", "tol": 1e-6})
    warm = engine.run(prepare(engine, frame, nxt, sequences=store))
    assert warm.iterations[0] <= 2 < cold.iterations[0] and warm.labels[0] == cold.labels[0]
    remember(parse_parameters({"sequence_id": "cam-1", "sequence_end": True}), warm, store)
    assert len(store) == 0
    with pytest.raises(InputError, match="keeps no sequences"):
        prepare(engine, frame, nxt, sequences=None)


def test_the_store_is_bounded_by_count_and_idle_time() -> None:
    now = [0.0]
    store = SequenceStore(max_sequences=2, idle_s=10.0, clock=lambda: now[0])
    u = np.ones((1, 3), np.float32)
    for name in ("a", "b", "c"):
        store.update(SequenceRef(name), u)
    assert len(store) == 2 and store.dropped == 1  # "a", the least recently used, went first
    assert store.start_of(SequenceRef("a"), 1) is None
    assert store.start_of(SequenceRef("b"), 1) is not None
    assert store.start_of(SequenceRef("b"), 2) is None  # another row count: a cold start
    assert store.start_of(SequenceRef("b", start=True), 1) is None and len(store) == 1  # a restart forgets
    now[0] = 11.0
    assert store.start_of(SequenceRef("c"), 1) is None and len(store) == 0  # idle too long
    assert parse_sequence(0) is None and parse_sequence(None) is None
