"""The clean room's backbone and rows kept between messages (pcvr.clean_room.resident)."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
from ray import cloudpickle  # how Flower's simulation engine ships the ClientApp to its workers

import pcvr.clean_room.resident as resident
from pcvr.clean_room.app import make_client_app
from pcvr.clean_room.policy import RoomPolicy
from pcvr.clean_room.resident import Resident
from pcvr.protocols.layout import CleanRoomDir
from support import deliver, fields_of, room_context, train_instruction, write_clean_room


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """How many times the real loaders ran."""
    calls = {"rows": 0, "backbone": 0}

    def counting(name, load):
        def wrapped(path):
            calls[name] += 1
            return load(path)
        return wrapped

    monkeypatch.setattr(resident, "load_training_data", counting("rows", resident.load_training_data))
    monkeypatch.setattr(resident, "load_backbone", counting("backbone", resident.load_backbone))
    return calls


def test_a_file_is_read_once_while_it_is_unchanged_and_again_when_rewritten(tmp_path, counted) -> None:
    write_clean_room(tmp_path / "room", rows=300)
    train = CleanRoomDir(tmp_path / "room").label_set("eps=3").train
    store = Resident()
    first = store.rows(train)
    assert store.rows(train) is first and counted["rows"] == 1
    data = train.read_bytes()
    train.unlink()
    train.write_bytes(data)  # the same bytes in a new file: a new inode
    os.utime(train, ns=(1, 1))
    assert store.rows(train) is not first and counted["rows"] == 2  # the control: a replaced file is read again


def test_the_least_recently_used_file_is_dropped_beyond_capacity(tmp_path, counted) -> None:
    rooms = [tmp_path / f"room{k}" for k in range(3)]
    for room in rooms:
        write_clean_room(room, rows=200)
    store = Resident(capacity=2)
    trains = [CleanRoomDir(room).label_set("eps=3").train for room in rooms]
    for train in trains:
        store.rows(train)
    store.rows(trains[2])
    assert counted["rows"] == 3
    store.rows(trains[0])  # dropped when the third came in
    assert counted["rows"] == 4
    with pytest.raises(ValueError, match="capacity"):
        Resident(capacity=0)


def test_a_pickled_store_is_the_same_store_in_the_same_process() -> None:
    store = Resident()
    assert pickle.loads(pickle.dumps(store)) is store
    assert pickle.loads(pickle.dumps(Resident())) is not store


def test_rounds_served_from_a_shipped_client_app_read_the_files_once_and_answer_as_a_fresh_one(tmp_path, counted) -> None:
    write_clean_room(tmp_path / "room", rows=500, policy=RoomPolicy(min_batch_size=64))
    app = make_client_app()
    context = room_context(tmp_path / "room")
    for round_ in (1, 2):
        shipped = cloudpickle.loads(cloudpickle.dumps(app))  # a fresh copy per message, as Ray delivers it
        before = copy.deepcopy(context)
        reply = deliver(shipped, train_instruction(round_=round_), context)
        assert not reply.has_error(), reply.error
    assert counted == {"rows": 1, "backbone": 1}

    # the round-2 answer of a ClientApp that read nothing before it, from the same state
    fresh = deliver(make_client_app(), train_instruction(round_=2), before)
    assert counted == {"rows": 2, "backbone": 2}  # the control: a new ClientApp reads its files
    assert fields_of(reply.content) == fields_of(fresh.content)  # the same gradient, byte for byte
