"""Flower's simulation engine looks for a clean room's message promptly (pcvr.clean_room.engine_poll)."""

from __future__ import annotations

import importlib
import inspect
import queue
import sys
import threading
import types

import pytest

from pcvr.clean_room import engine_poll


class _RecordingStop(threading.Event):
    """The engine's stop event, recording each wait's timeout; set after ``waits`` of them."""

    def __init__(self, *, waits: int) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []
        self._waits = waits

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        if len(self.timeouts) >= self._waits:
            self.set()
        return super().wait(0)


class _State:
    def get_message_ins(self, *, node_id: int, limit: int) -> list:
        return []


@pytest.fixture
def engine(monkeypatch) -> types.ModuleType:
    """Flower's engine module with its own loop in place (restored afterwards)."""
    module = importlib.import_module(engine_poll._ENGINE)
    monkeypatch.setattr(module, "add_messages_to_queue", inspect.unwrap(module.add_messages_to_queue))
    return module


def _waits_of(loop) -> list[float | None]:
    stop = _RecordingStop(waits=3)
    loop(_State(), queue.Queue(), {7: 0}, stop)
    return stop.timeouts


def test_inside_the_engine_its_loop_looks_every_few_milliseconds(engine) -> None:
    assert _waits_of(engine.add_messages_to_queue) == [0.1, 0.1, 0.1]  # the control: Flower's own pace
    assert engine_poll.prompt_message_pickup() is True
    assert _waits_of(engine.add_messages_to_queue) == [engine_poll.PICKUP_INTERVAL_S] * 3
    patched = engine.add_messages_to_queue
    assert engine_poll.prompt_message_pickup() is True and engine.add_messages_to_queue is patched  # once only


def test_outside_the_engine_nothing_is_imported_or_patched(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, engine_poll._ENGINE, raising=False)
    assert engine_poll.prompt_message_pickup() is False
    assert engine_poll._ENGINE not in sys.modules
