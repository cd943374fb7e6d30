"""One clean room's influence on an update is bounded, whatever it sends.

A lying clean room follows the framing (a valid digest) but claims a huge gradient
or a million examples. The forged count is rejected; the huge gradient, with the
per-room norm bound on, moves the aggregate by at most bound · n / Σn — and with
the bound off (the control) it dominates the update.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message

from pcvr.platform.federation import apply_round
from pcvr.platform.training import clip_room_gradient
from pcvr.protocols.codecs import Codec
from pcvr.protocols.messages import Binding
from pcvr.protocols.run_config import RunConfig
from support import make_trainer, train_reply_message

RUN, ROUND, BATCH = 3, 1, 100
HONEST, LIAR = (101, 102), 666


def reply(node: int, grad: np.ndarray, *, examples: int = BATCH) -> Message:
    return train_reply_message(node, grad, run_id=RUN, round_=ROUND, examples=examples)


def aggregate_of(grads: dict[int, np.ndarray], *, bound: float, examples: dict[int, int] | None = None):
    trainer = make_trainer()
    seen = []
    trainer.step = seen.append  # the aggregate the optimizer would get
    config = RunConfig(codec=Codec.parse("none"), batch_size=BATCH, min_batch_size=1, max_room_grad_norm=bound)
    expected = {node: Binding(run_id=RUN, round=ROUND, node_id=node) for node in grads}
    replies = [reply(node, g, examples=(examples or {}).get(node, BATCH)) for node, g in grads.items()]
    accepted, rejected = apply_round(trainer, replies, round_=ROUND, expected=expected, config=config)
    return (seen[0] if seen else None), accepted, rejected


@pytest.fixture
def grads() -> dict[int, np.ndarray]:
    length = make_trainer().num_adapter_params
    rng = np.random.default_rng(4)
    honest = {node: (0.01 * BATCH * rng.normal(size=length) / np.sqrt(length)).astype(np.float32) for node in HONEST}
    return {**honest, LIAR: np.full(length, 1e4, dtype=np.float32)}


def test_a_lying_clean_rooms_gradient_moves_the_update_at_most_by_its_bound(grads) -> None:
    bound = 0.05
    honest_only = sum(grads[n].astype(np.float64) for n in HONEST) / (3 * BATCH)
    clipped, accepted, _ = aggregate_of(grads, bound=bound)
    assert set(accepted) == {*HONEST, LIAR}
    assert np.linalg.norm(clipped - honest_only) <= bound * BATCH / (3 * BATCH) * (1 + 1e-5)
    unclipped, _, _ = aggregate_of(grads, bound=0.0)  # the control: off by default, and then the liar dominates
    assert np.linalg.norm(unclipped - honest_only) > 100 * bound


def test_honest_gradients_within_the_bound_are_untouched(grads) -> None:
    honest = {n: grads[n] for n in HONEST}
    clipped, _, _ = aggregate_of(honest, bound=10.0)
    plain, _, _ = aggregate_of(honest, bound=0.0)
    assert np.array_equal(clipped, plain)


def test_a_forged_example_count_is_rejected(grads) -> None:
    honest = {n: grads[n] for n in HONEST}
    _, accepted, rejected = aggregate_of({**honest, LIAR: honest[HONEST[0]]}, bound=0.0, examples={LIAR: 1_000_000})
    assert set(accepted) == set(HONEST)
    assert [entry["node"] for entry in rejected] == [LIAR] and "'examples' must be an integer in [1, 100]" in rejected[0]["reason"]


def test_clipping_bounds_the_per_example_mean() -> None:
    grad = np.array([3.0, 4.0], dtype=np.float32)  # norm 5 over 10 examples: mean norm 0.5
    assert clip_room_gradient(grad, num_examples=10, max_norm=0.0) == (grad, 1.0)
    assert clip_room_gradient(grad, num_examples=10, max_norm=0.5)[1] == 1.0
    clipped, factor = clip_room_gradient(grad, num_examples=10, max_norm=0.25)
    assert factor == pytest.approx(0.5) and np.allclose(clipped, [1.5, 2.0])
