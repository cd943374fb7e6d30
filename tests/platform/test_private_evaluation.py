"""The platform's private-evaluation step against real ClientApps behind a minimal in-process grid."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from pcvr.clean_room.policy import RoomPolicy
from pcvr.models.cvr import attach_adapters, get_adapter_vector
from pcvr.platform.federation import collect_private_evaluation
from pcvr.platform.training import Participation, format_private
from pcvr.protocols.codecs import Codec
from pcvr.protocols.run_config import RunConfig
from pcvr.protocols.layout import EVAL_FILE
from support import RUN_ID, InProcessGrid, make_backbone, room_context, write_clean_room

NODES = (2**40 + 7, 2**40 + 8)


@pytest.fixture
def rooms(tmp_path, monkeypatch):
    """Two clean rooms with held-out splits, and the process identity a ServerApp would have."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    contexts = {}
    for k, node in enumerate(NODES):
        write_clean_room(tmp_path / f"room{k}", rows=200, seed=k, eval_rows=400, policy=RoomPolicy(min_batch_size=64))
        context = room_context(tmp_path / f"room{k}", node_config={"clean-room-id": k})
        context.node_id = node
        contexts[node] = context
    return tmp_path, contexts


def run(contexts: dict):
    config = RunConfig(batch_size=64, min_batch_size=64, label_set="eps=3", codec=Codec.parse("none"))
    participation = {node: Participation(node=node, clean_room_id=k) for k, node in enumerate(NODES)}
    weights = get_adapter_vector(attach_adapters(make_backbone(), seed=0)).numpy()
    return collect_private_evaluation(
        InProcessGrid(contexts, run_id=RUN_ID), participation, run_id=RUN_ID, round_=9, config=config, weights=weights, timeout=30.0
    )


def test_every_room_answers_and_the_estimate_is_over_both_splits(rooms) -> None:
    _, contexts = rooms
    result = run(contexts)
    assert result.unavailable is None and result.rooms == {"clean room 0": "ok", "clean room 1": "ok"}
    assert result.metrics.rows == 800 and result.metrics.rooms == 2 and result.round == 9
    assert np.isfinite(result.metrics.auc.se) and result.metrics.auc.se > 0
    assert format_private(result.to_dict()).startswith("private (de-biased, 2 clean rooms, 800 held-out rows): AUC ")


def test_a_room_that_refuses_leaves_no_estimate_and_is_named(rooms) -> None:
    directory, contexts = rooms
    (directory / "room1" / "eps=3" / EVAL_FILE).unlink()
    result = run(contexts)
    assert result.metrics is None
    assert result.rooms["clean room 0"] == "ok"
    assert result.unavailable == "clean room 1: clean room refused: no_holdout: the clean room holds no held-out split for this label set"
    assert format_private(result.to_dict()).startswith("private evaluation: unavailable: clean room 1")
