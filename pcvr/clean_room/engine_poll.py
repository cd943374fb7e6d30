"""How promptly Flower's simulation engine hands a clean room its message.

flwr 1.41's simulation engine moves instructions from its message store to its
workers in one thread that looks every 0.1 s
(``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``): on average
50 ms of every round is spent waiting for that look, against ~60 ms of a clean
room's compute. Flower offers no setting for it, so, inside the simulation engine
only, :func:`prompt_message_pickup` makes the same loop look every
:data:`PICKUP_INTERVAL_S`: Flower's own function runs unchanged, with its stop
event's waits shortened. It is a no-op anywhere else (a deployed SuperNode, a
test): the engine's module is patched only when the engine has imported it.
"""

from __future__ import annotations

import functools
import sys
import threading

PICKUP_INTERVAL_S = 0.005
_ENGINE = "flwr.server.superlink.fleet.vce.vce_api"


class _ShortWaits:
    """``threading.Event`` as the pickup loop uses it, every wait at most ``interval_s``."""

    def __init__(self, event: threading.Event, *, interval_s: float) -> None:
        self._event, self._interval_s = event, interval_s

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(self._interval_s if timeout is None else min(timeout, self._interval_s))


def prompt_message_pickup(*, interval_s: float = PICKUP_INTERVAL_S) -> bool:
    """Make the running simulation engine look for messages every ``interval_s``; True if it is running here."""
    engine = sys.modules.get(_ENGINE)
    if engine is None or getattr(engine.add_messages_to_queue, "pcvr_prompt", False):
        return engine is not None
    flowers = engine.add_messages_to_queue

    @functools.wraps(flowers)
    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):  # Flower's signature
        return flowers(state, queue, nodes_mapping, _ShortWaits(f_stop, interval_s=interval_s))

    add_messages_to_queue.pcvr_prompt = True  # type: ignore[attr-defined]
    engine.add_messages_to_queue = add_messages_to_queue
    return True
