"""Who an error reply is about, and what it may say.

The SuperLink answers for a node it cannot reach with a reply of its own (sender:
the SuperLink's node id); that reply must be counted against the clean room the
instruction went to, with Flower's reason. A clean room's error says only its code:
Flower's text from a ClientApp that raised could carry anything.
"""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import pytest
from flwr.app import Error
from flwr.common import Metadata
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from flwr.app.message import make_message

from pcvr.platform.federation import (
    MembershipError,
    _wait_for_nodes,
    preflight,
    receive_replies,
    replying_node,
    run_federated_training,
)
from pcvr.protocols.messages import Binding, PreflightReply
from pcvr.protocols.refusals import Refusal
from pcvr.protocols.run_config import RunConfig

RUN, ROUND, ROOM = 3, 1, 4242
INSTRUCTION_ID = "a" * 64


def error_reply(*, src: int, code: int, reason: str):
    metadata = Metadata(
        run_id=RUN, message_id="", src_node_id=src, dst_node_id=SUPERLINK_NODE_ID, reply_to_message_id=INSTRUCTION_ID,
        group_id="1", created_at=time.time(), ttl=600.0, message_type="train",
    )
    return make_message(metadata=metadata, error=Error(code=code, reason=reason))


def rejections(reply, *, sent_to):
    expected = {ROOM: Binding(run_id=RUN, round=ROUND, node_id=ROOM)}
    accepted, rejected = receive_replies(
        [reply], round_=ROUND, expected=expected, config=RunConfig(), num_adapter_params=10, sent_to=sent_to
    )
    assert not accepted
    return rejected


def test_the_superlinks_reply_for_an_unreachable_node_counts_against_that_node_with_flowers_reason():
    reply = error_reply(src=SUPERLINK_NODE_ID, code=ErrorCode.NODE_UNAVAILABLE, reason="Node is offline")
    (entry,) = rejections(reply, sent_to={INSTRUCTION_ID: ROOM})
    assert entry["node"] == ROOM and entry["missed"] is True  # the room sent nothing: missed, not rejected
    assert "NODE_UNAVAILABLE" in entry["reason"] and "Node is offline" in entry["reason"]
    assert "codec" not in entry["reason"]  # Flower's code 5 is not a clean room's refusal
    # Control: without knowing where the instruction went, it reads as a stray sender.
    (stray,) = rejections(reply, sent_to={})
    assert stray["node"] == SUPERLINK_NODE_ID and "was not asked" in stray["reason"]


@pytest.mark.parametrize("code", [ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE])
def test_only_the_superlinks_word_that_a_node_is_unreachable_makes_a_missed_round(code):
    (missed,) = rejections(error_reply(src=SUPERLINK_NODE_ID, code=code, reason="gone"), sent_to={INSTRUCTION_ID: ROOM})
    assert missed.get("missed") is True
    # Control: the same code from the clean room itself, or another SuperLink error, is a rejection.
    (own,) = rejections(error_reply(src=ROOM, code=code, reason="gone"), sent_to={})
    (other,) = rejections(
        error_reply(src=SUPERLINK_NODE_ID, code=ErrorCode.CLIENT_APP_CRASHED, reason="x"), sent_to={INSTRUCTION_ID: ROOM}
    )
    assert "missed" not in own and "missed" not in other


def test_a_clean_rooms_error_text_never_crosses_only_its_code_is_named():
    leaky = "FileNotFoundError: /srv/clean_room_0/secret/conversions.csv"
    (entry,) = rejections(error_reply(src=ROOM, code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=leaky), sent_to={})
    assert entry["node"] == ROOM and "CLIENT_APP_RAISED_EXCEPTION" in entry["reason"] and "/srv" not in entry["reason"]
    (refused,) = rejections(error_reply(src=ROOM, code=Refusal.CODEC_NOT_ALLOWED, reason=leaky), sent_to={})
    assert refused["reason"] == f"clean room refused: {Refusal.CODEC_NOT_ALLOWED.reason}"


def test_refusal_codes_are_clear_of_flowers_error_codes():
    flower = {value for name, value in vars(ErrorCode).items() if name.isupper()}
    assert not flower & {int(code) for code in Refusal}


def test_a_reply_from_a_clean_room_is_its_senders_whatever_sent_to_says():
    reply = error_reply(src=ROOM, code=Refusal.FAILED, reason="")
    assert replying_node(reply, {INSTRUCTION_ID: 999}) == ROOM


class PreflightGrid:
    """Just enough of a Flower Grid for the pre-flight exchange: each node answers as ``identities`` says."""

    def __init__(self, identities: dict[int, int]) -> None:
        self.identities = identities
        self.pushed: dict[str, object] = {}
        self.run = SimpleNamespace(run_id=RUN)

    def get_node_ids(self):
        return list(self.identities)

    def push_messages(self, messages):
        ids = []
        for k, message in enumerate(messages):
            self.pushed[f"{k:064d}"] = message
            ids.append(f"{k:064d}")
        return ids

    def pull_messages(self, ids):
        replies = []
        for message_id in ids:
            node = self.pushed[message_id].metadata.dst_node_id
            metadata = Metadata(
                run_id=RUN, message_id="", src_node_id=node, dst_node_id=SUPERLINK_NODE_ID, reply_to_message_id=message_id,
                group_id="", created_at=time.time(), ttl=600.0, message_type="query.preflight",
            )
            content = PreflightReply(Binding(run_id=RUN, round=0, node_id=node), clean_room_id=self.identities[node]).to_record()
            replies.append(make_message(metadata=metadata, content=content))
        return replies


def registered(**rooms: int) -> RunConfig:
    nodes = {int(room.removeprefix("room")): node for room, node in rooms.items()}
    return RunConfig(clean_rooms=len(nodes), clean_room_nodes=RunConfig.format_nodes(nodes))


def test_the_platform_trains_with_exactly_the_registered_nodes():
    config = registered(room0=11, room1=12)
    assert config.registered_nodes() == {11: 0, 12: 1}
    assert _wait_for_nodes(PreflightGrid({12: 1, 11: 0}), config) == [11, 12]
    # Unregistered (the simulation): whichever nodes connect.
    assert _wait_for_nodes(PreflightGrid({7: 0, 9: 1}), RunConfig(clean_rooms=2)) == [7, 9]


def test_an_unregistered_node_online_stops_the_run_before_anything_is_sent(tmp_path):
    grid = PreflightGrid({11: 0, 12: 1, 66: 0})
    config = dataclasses.replace(registered(room0=11, room1=12), run_dir=tmp_path)
    with pytest.raises(MembershipError, match="node 66 is connected but is not one of the registered clean rooms"):
        _wait_for_nodes(grid, config)
    run_log = run_federated_training(grid, config, trainer=None, holdout=None, backbone=b"")
    assert not grid.pushed and "node 66" in run_log.failures(rounds=1, min_share=0.9)[0]


def test_a_node_that_claims_another_clean_rooms_id_fails_the_pre_flight_check(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN)  # what Flower sets in a ServerApp process
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", "task")
    config = registered(room0=11, room1=12)
    rooms = preflight(PreflightGrid({11: 0, 12: 0}), [11, 12], run_id=RUN, config=config, backbone=b"x" * 16, timeout=5)
    assert rooms[11].preflight is None
    assert rooms[12].preflight == "says it is clean room 0, but is registered as clean room 1"


@pytest.mark.parametrize("nodes", ["0:11,1", "a:1", "0:11,0:12", "0:11,1:11"])
def test_a_malformed_node_list_is_refused_naming_the_entry(nodes):
    with pytest.raises(ValueError, match="clean-room-nodes"):
        RunConfig(clean_rooms=2, clean_room_nodes=nodes)


def test_without_true_labels_the_runs_final_figures_are_the_private_evaluation():
    """A real platform has no oracle holdout: `final` is the clean rooms' de-biased estimate, said so."""
    from pcvr.platform.app import final_figures
    from pcvr.platform.training import PrivateEvaluation, RunLog
    from pcvr.protocols.private_eval import Estimate, PrivateMetrics

    metrics = PrivateMetrics(
        auc=Estimate(0.71, 0.02), ne=Estimate(0.93, 0.01), calibration=Estimate(1.04, 0.05),
        positive_rate=Estimate(0.03, 0.002), rows=5000, rooms=2,
    )
    private = RunLog(private=PrivateEvaluation(round=20, metrics=metrics, rooms={"clean room 0": "ok", "clean room 1": "ok"}))
    assert final_figures(private) == {"round": 20, "auc": 0.71, "ne": 0.93, "calibration": 1.04, "evaluated_on": "private evaluation"}
    oracle = RunLog(evaluations=[{"round": 20, "train_s": 1.0, "auc": 0.8, "ne": 0.9, "calibration": 1.0}], private=private.private)
    assert final_figures(oracle)["evaluated_on"] == "oracle holdout" and final_figures(oracle)["auc"] == 0.8
    refused = RunLog(private=PrivateEvaluation(round=20, metrics=None, rooms={"clean room 0": "no reply"}, unavailable="no reply"))
    assert final_figures(refused) is None  # no figure stands in for an evaluation that did not happen
