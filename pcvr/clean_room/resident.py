"""What a clean room's ClientApp keeps in memory between messages: its backbone and its rows.

Flower's simulation engine serves every message of a clean room from a long-lived
worker process, so a round need not re-read the backbone and the Arrow file of
rows it read the round before. (A deployed SuperNode starts a fresh ClientApp
process per message; there the store is simply empty every time.)

A file is reused only while it is the same file: the key is its path with its
device, inode, size and modification time, so a rewritten or replaced file is
read again. What is kept is only ever read: :func:`~pcvr.models.cvr.attach_adapters`
copies the backbone, and training indexes the rows without changing them.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

from pcvr.clean_room.dataset import CleanRoomData, load_training_data
from pcvr.models.cvr import CVRNet, load_backbone

T = TypeVar("T")

BACKBONE_FILES = ("config.json", "backbone.pt")  # what load_backbone reads from its directory
DEFAULT_CAPACITY = 12  # a worker may serve every clean room of a simulation: rows, held-out rows, backbone each


def file_identity(path: Path) -> tuple[str, int, int, int, int]:
    """The path with what changes when the file is rewritten or replaced; OSError if it is gone."""
    stat = os.stat(path)
    return str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class Resident:
    """Loaded files kept for the next message, least recently used dropped beyond ``capacity``.

    Flower's simulation engine sends the ClientApp to its Ray workers with every
    message, pickled; a store pickles as its token, and each worker process keeps
    the one store of that token (:data:`_STORES`), so what a message loaded is
    there for the next one the same worker serves.
    """

    _STORES: ClassVar[dict[str, "Resident"]] = {}
    _STORES_LOCK: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY, token: str | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity}")
        self.capacity = capacity
        self.token = token or uuid.uuid4().hex
        self.loads = 0  # files actually read, for tests and benchmarks
        self._entries: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        with Resident._STORES_LOCK:
            Resident._STORES.setdefault(self.token, self)

    def __reduce__(self):
        return (_store_of, (self.token, self.capacity))

    def _get(self, key: tuple, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]  # type: ignore[return-value]
        value = load()
        with self._lock:
            self.loads += 1
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def rows(self, path: Path) -> CleanRoomData:
        """:func:`~pcvr.clean_room.dataset.load_training_data` of ``path``, read once while it is unchanged."""
        try:
            key = ("rows", file_identity(path))
        except OSError:
            return load_training_data(path)  # gone or unreadable: the loader names it
        return self._get(key, lambda: load_training_data(path))

    def backbone(self, directory: Path) -> CVRNet:
        """:func:`~pcvr.models.cvr.load_backbone` of ``directory`` (frozen; callers copy it before adapting)."""
        try:
            key = ("backbone", *(file_identity(Path(directory) / name) for name in BACKBONE_FILES))
        except OSError:
            return load_backbone(directory)  # the loader names what is missing
        return self._get(key, lambda: load_backbone(directory))


def _store_of(token: str, capacity: int) -> Resident:
    """The store of ``token`` in this process (made empty on first use): how a pickled store comes back."""
    with Resident._STORES_LOCK:
        store = Resident._STORES.get(token)
    if store is None:
        Resident(capacity=capacity, token=token)  # registers itself; a racing thread's store wins
        store = Resident._STORES[token]
    return store
