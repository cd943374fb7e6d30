"""Who an error reply is about, and what it may say.

The SuperLink answers for a node it cannot reach with a reply of its own (sender:
the SuperLink's node id); that reply must be counted against the clean room the
instruction went to, with Flower's reason. A clean room's error says only its code:
Flower's text from a ClientApp that raised could carry anything.
"""

from __future__ import annotations

import time

from flwr.app import Error
from flwr.common import Metadata
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.app.message import make_message

from pcvr.platform.federation import receive_replies, replying_node
from pcvr.protocols.messages import Binding
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
    assert entry["node"] == ROOM
    assert "NODE_UNAVAILABLE" in entry["reason"] and "Node is offline" in entry["reason"]
    assert "codec" not in entry["reason"]  # Flower's code 5 is not a clean room's refusal
    # Control: without knowing where the instruction went, it reads as a stray sender.
    (stray,) = rejections(reply, sent_to={})
    assert stray["node"] == SUPERLINK_NODE_ID and "was not asked" in stray["reason"]


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
