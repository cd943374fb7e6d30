"""A clean room whose directory is mounted read-only writes its training state elsewhere.

With ``clean-room-state-dir`` in its node config, the release log and the DP-SGD accountant go
there and the clean room's own directory is not touched (checked by its files' bytes and times:
the tests run as a user that a read-only mode bit would not stop).
"""

from __future__ import annotations

from pathlib import Path

from pcvr.clean_room.app import CLEAN_ROOM_STATE_DIR, make_client_app
from pcvr.clean_room.policy import RoomPolicy
from pcvr.protocols.layout import ACCOUNTANT_FILE, RELEASES_FILE
from pcvr.protocols.refusals import Refusal
from support import deliver, room_context, train_instruction, write_clean_room


def _snapshot(directory: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_with_a_state_dir_the_clean_rooms_directory_is_only_read(tmp_path):
    room, state = tmp_path / "room", tmp_path / "state"
    write_clean_room(room, rows=256, policy=RoomPolicy(min_batch_size=64))
    state.mkdir()
    before = _snapshot(room)
    context = room_context(room, run_config={"dp-noise-multiplier": 1.0}, node_config={CLEAN_ROOM_STATE_DIR: str(state)})
    reply = deliver(make_client_app(), train_instruction(), context)
    assert not reply.has_error()
    assert _snapshot(room) == before  # nothing written, nothing rewritten
    assert {p.name for p in state.iterdir()} == {RELEASES_FILE, ACCOUNTANT_FILE}

    # Control: without it, the same round writes both into the clean room's directory.
    other = tmp_path / "other"
    write_clean_room(other, rows=256, policy=RoomPolicy(min_batch_size=64))
    assert not deliver(make_client_app(), train_instruction(), room_context(other, run_config={"dp-noise-multiplier": 1.0})).has_error()
    assert {RELEASES_FILE, ACCOUNTANT_FILE} <= {p.name for p in other.iterdir()}


def test_a_state_dir_that_does_not_exist_is_refused_without_saying_where(tmp_path):
    room = tmp_path / "room"
    write_clean_room(room, rows=256, policy=RoomPolicy(min_batch_size=64))
    context = room_context(room, node_config={CLEAN_ROOM_STATE_DIR: str(tmp_path / "missing")})
    reply = deliver(make_client_app(), train_instruction(), context)
    assert reply.has_error() and reply.error.code == Refusal.FAILED
    assert "missing" not in reply.error.reason  # the platform learns the fixed code, not the path
