"""The ClientApp's one error boundary, and names from the run config that try to leave the clean room.

Every failure inside a handler, wherever it is injected, reaches the platform as a
fixed refusal code and its fixed text; the exception's text (here carrying a
marker path) stays in the clean room's log. A label set that names anything but a
folder inside the clean room is refused before a file is read or written.
"""

from __future__ import annotations

import logging

import pytest

from pcvr.clean_room import app as client_module
from pcvr.clean_room import resident as resident_module
from pcvr.clean_room.app import make_client_app
from pcvr.protocols.messages import Binding, LedgerIns
from pcvr.protocols.refusals import Refusal
from pcvr.protocols.layout import TRAIN_FILE
from support import NODE_ID, RUN_ID, deliver, room_context, train_instruction, write_clean_room

MARKER = "/srv/advertiser/secret-path"


def boom(*args, **kwargs):
    raise OSError(f"cannot read {MARKER}/train.parquet")


@pytest.fixture
def room(tmp_path):
    from pcvr.clean_room.policy import RoomPolicy

    write_clean_room(tmp_path, rows=200, policy=RoomPolicy(min_batch_size=64))
    return tmp_path


def assert_fixed(reply, refusal: Refusal) -> None:
    assert reply.has_error() and reply.error.code == refusal and reply.error.reason == refusal.reason
    assert MARKER not in reply.error.reason and "Traceback" not in reply.error.reason


def test_an_honest_round_is_served(room) -> None:
    reply = deliver(make_client_app(), train_instruction(), room_context(room))
    assert not reply.has_error()


@pytest.mark.parametrize(
    "target",
    [
        "resident:load_backbone",
        "resident:load_training_data",
        "attach_adapters",
        "batch_gradient",
        "compress_with_feedback",
        "RoomPolicy.load",
        "ReleaseLog.record",
        "save_state",
    ],
)
def test_a_failure_at_any_step_of_a_round_crosses_as_a_fixed_code(room, monkeypatch, caplog, target) -> None:
    module, _, target = target.rpartition(":")  # the files a ClientApp reads are read through its store
    owner, _, name = target.rpartition(".")
    base = resident_module if module else client_module
    monkeypatch.setattr(getattr(base, owner) if owner else base, name, boom)
    with caplog.at_level(logging.ERROR, logger="pcvr.clean_room.app"):
        reply = deliver(make_client_app(), train_instruction(), room_context(room))
    assert_fixed(reply, Refusal.FAILED)
    assert MARKER in caplog.text  # the details are in the clean room's own log


@pytest.mark.parametrize(
    "node_config, run_config",
    [
        ({"clean-room-id": "not a number"}, {}),
        ({"dp-noise-multiplier": -1.0}, {}),
        ({}, {"no-such-key": 1}),
        ({}, {"num-rounds": 0}),
    ],
)
def test_a_bad_node_or_run_config_crosses_as_a_fixed_code(room, node_config, run_config) -> None:
    reply = deliver(make_client_app(), train_instruction(), room_context(room, node_config=node_config, run_config=run_config))
    assert_fixed(reply, Refusal.FAILED)


def test_a_malformed_instruction_is_answered_with_its_code_only(room) -> None:
    reply = deliver(make_client_app(), train_instruction(**{"batch-size": "huge"}), room_context(room))
    assert_fixed(reply, Refusal.MALFORMED)


def test_a_failing_ledger_query_crosses_as_a_fixed_code(room) -> None:
    (room / "eps=3" / "ledger.json").write_text("{ not json " + MARKER)
    content = LedgerIns(Binding(run_id=RUN_ID, round=2, node_id=NODE_ID)).to_record()
    reply = deliver(make_client_app(), content, room_context(room), message_type="query")
    assert_fixed(reply, Refusal.FAILED)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlinked folder", "symlinked file"])
def test_a_label_set_that_leads_outside_the_clean_room_is_refused(tmp_path, kind) -> None:
    """The traversal: a run config whose label set points at a folder outside; nothing there is read or written."""
    from pcvr.clean_room.policy import RoomPolicy

    room, outside = tmp_path / "room", tmp_path / "outside"
    write_clean_room(room, rows=200, policy=RoomPolicy(min_batch_size=64))
    write_clean_room(outside, rows=200, label_set="x")
    label_set = {"dotdot": "../outside/x", "absolute": str(outside / "x")}.get(kind, "eps=3")
    if kind == "symlinked folder":
        (room / "eps=3" / TRAIN_FILE).unlink()
        (room / "eps=3").rename(room / "old")
        (room / "eps=3").symlink_to(outside / "x")
    if kind == "symlinked file":
        (room / "eps=3" / TRAIN_FILE).unlink()
        (room / "eps=3" / TRAIN_FILE).symlink_to(outside / "x" / TRAIN_FILE)
    before = sorted(p.relative_to(outside) for p in outside.rglob("*"))
    context = room_context(room, run_config={"label-set": label_set, "record-payloads": True})
    reply = deliver(make_client_app(), train_instruction(), context)
    assert_fixed(reply, Refusal.BAD_NAME)
    if kind != "symlinked file":  # there the label set's own ledger.json is inside and may be reported
        query = LedgerIns(Binding(RUN_ID, 2, NODE_ID)).to_record()
        assert_fixed(deliver(make_client_app(), query, context, message_type="query"), Refusal.BAD_NAME)
    assert sorted(p.relative_to(outside) for p in outside.rglob("*")) == before
