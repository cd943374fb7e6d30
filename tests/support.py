"""Helpers shared by test modules: a tiny model and clean-room data, and a sender that lies.

Importable from any test module (``pythonpath = ["tests"]`` in ``pyproject.toml``).
"""

from __future__ import annotations

import math
import os
import random
import socket
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict

from pcvr.clean_room.dataset import CleanRoomData
from pcvr.models.cvr import (
    CVRNet,
    ModelConfig,
    attach_adapters,
    get_adapter_vector,
    parameter_counts,
    set_adapter_vector,
)
from pcvr.models.features import EncodedFeatures
from pcvr.platform.training import AdapterTrainer
from pcvr.protocols import messages
from pcvr.protocols.messages import SECTION

TINY = ModelConfig(buckets=(97, 31, 11, 5, 7, 3, 5, 3), num_dense=18, embedding_dim=4, mlp_dims=(16, 8))


def make_backbone(config: ModelConfig = TINY, *, seed: int = 0) -> CVRNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CVRNet(config)


def make_trainer(*, seed: int = 0, learning_rate: float = 0.01, total_steps: int = 10) -> AdapterTrainer:
    return AdapterTrainer(make_backbone(), learning_rate=learning_rate, total_steps=total_steps, seed=seed)


def adapted_model(config: ModelConfig = TINY, *, seed: int = 0) -> torch.nn.Module:
    """Adapted tiny model with nonzero adapters, so every adapter parameter gets a gradient."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = attach_adapters(CVRNet(config), seed=seed)
    size = parameter_counts(model)["adapters"]
    shift = 0.2 * torch.randn(size, generator=torch.Generator().manual_seed(seed + 1))
    set_adapter_vector(model, get_adapter_vector(model) + shift)
    return model


def clean_room_data(n: int, *, seed: int, config: ModelConfig = TINY) -> CleanRoomData:
    """Random rows with consent levels mixed in one batch: no noise, ε=3 and ε=1."""
    generator = torch.Generator().manual_seed(seed)
    categorical = torch.stack([torch.randint(0, b, (n,), generator=generator) for b in config.buckets], dim=1)
    dense = torch.randn(n, config.num_dense, generator=generator)
    noisy_labels = (torch.rand(n, generator=generator) < 0.3).float()
    flip_probs = torch.tensor([0.0, 1 / (1 + math.exp(3.0)), 1 / (1 + math.exp(1.0))])[
        torch.randint(0, 3, (n,), generator=generator)
    ]
    return CleanRoomData(EncodedFeatures(categorical, dense), noisy_labels, flip_probs)


def fields_of(record: RecordDict) -> dict:
    """The fields of a pcvr message, as a plain dict."""
    return dict(record[SECTION].items())


def resealed(record: RecordDict, *, drop: tuple[str, ...] = (), **changes: object) -> RecordDict:
    """A sender that follows the framing but lies: change fields (``base_round`` → ``base-round``),
    drop some, and recompute the digest."""
    values = {k: v for k, v in fields_of(record).items() if k != "digest" and k not in drop}
    values.update({k.replace("_", "-"): v for k, v in changes.items()})
    values["digest"] = messages._digest(values)
    return RecordDict({SECTION: ConfigRecord(values)})  # type: ignore[arg-type]


# --- a clean room on disk, and a platform that talks to its ClientApp directly ------------------

RUN_ID, NODE_ID = 11, 2**40 + 7


def write_clean_room(
    directory, *, rows: int, seed: int = 0, label_set: str = "eps=3", policy=None, eval_rows: int = 0
) -> None:
    """A clean room's directory as ``pcvr prepare`` leaves it: backbone copy, joined rows, label ledger, policy;
    with ``eval_rows``, a held-out split of that many other rows."""
    import json
    from pathlib import Path

    import pyarrow as pa

    from pcvr.data.io import write_ipc

    from pcvr.data import schema
    from pcvr.models.cvr import save_backbone
    from pcvr.models.features import cat_column, dense_column
    from pcvr.protocols.layout import CleanRoomDir

    def joined_rows(count: int, *, seed: int, first_key: int):
        data = clean_room_data(count, seed=seed)
        keys = [i.to_bytes(32, "big") for i in range(first_key, first_key + count)]
        columns = {schema.JOIN_KEY: pa.array(keys, type=pa.binary(32))}
        columns |= {cat_column(i): data.features.categorical[:, i].numpy() for i in range(data.features.categorical.shape[1])}
        columns |= {dense_column(j): data.features.dense[:, j].numpy() for j in range(data.features.dense.shape[1])}
        columns |= {schema.NOISY_LABEL: data.noisy_labels.numpy().astype("int8"), schema.EPSILON: [3.0] * count}
        columns |= {schema.FLIP_PROB: data.flip_probs.numpy().astype("float64")}
        return pa.table(columns)

    room = CleanRoomDir(Path(directory))
    save_backbone(make_backbone(), room.backbone)
    Path(directory, label_set).mkdir(parents=True, exist_ok=True)
    joined = room.label_set(label_set)
    train = joined_rows(rows, seed=seed, first_key=0)
    write_ipc(joined.train, train.schema, train.to_batches())
    if eval_rows:
        held_out = joined_rows(eval_rows, seed=seed + 1, first_key=rows)
        write_ipc(joined.eval, held_out.schema, held_out.to_batches())
    ledger = {"source": "/advertiser/conversions.parquet", "records": rows, "levels": {}}
    joined.ledger.write_text(json.dumps(ledger))
    if policy is not None:
        room.policy.write_text(policy.to_toml())


def train_instruction(*, round_: int = 1, batch_size: int = 64, min_batch_size: int = 64, **changes: object) -> RecordDict:
    """What an honest platform sends for ``round_`` (full weights); ``changes`` make it lie, resealed."""
    import numpy as np

    from pcvr.protocols.codecs import Codec, encode
    from pcvr.protocols.label_dp import Correction
    from pcvr.protocols.messages import Binding, TrainIns

    length = parameter_counts(attach_adapters(make_backbone()))["adapters"]
    codec = Codec.parse("none")
    weights = get_adapter_vector(attach_adapters(make_backbone(), seed=0)).numpy()
    record = TrainIns(
        binding=Binding(run_id=RUN_ID, round=round_, node_id=NODE_ID),
        base_round=0,
        codec=codec,
        size=length,
        weights=encode(weights, codec, generator=np.random.default_rng(0)),
        batch_size=batch_size,
        min_batch_size=min_batch_size,
        correction=Correction.FORWARD,
    ).to_record()
    return resealed(record, **changes) if changes else record


def deliver(client_app, content: RecordDict, context, *, message_type: str = "train"):
    """Hand ``content`` to ``client_app`` as Flower would; returns its reply."""
    import time

    from flwr.app import Message
    from flwr.common import Metadata

    metadata = Metadata(
        run_id=context.run_id, message_id="m" * 64, src_node_id=1, dst_node_id=context.node_id, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600.0, message_type=message_type,
    )
    return client_app(Message(metadata=metadata, content=content), context)


def room_context(directory, *, run_config: dict | None = None, node_config: dict | None = None):
    """A Flower context for the clean room in ``directory`` (one state across calls: reuse it)."""
    from flwr.app import Context

    node = {"clean-room-id": 0, "clean-room-dir": str(directory), **(node_config or {})}
    run = {"label-set": "eps=3", "batch-size": 64, "min-batch-size": 64, "codec": "none", **(run_config or {})}
    return Context(run_id=RUN_ID, node_id=NODE_ID, node_config=node, state=RecordDict(), run_config=run)


def train_reply_message(node: int, update, *, run_id: int, round_: int, examples: int):
    """A clean room's honest-looking reply (codec none) to round ``round_``, as the platform pulls it."""
    import time

    import numpy as np
    from flwr.app import Message
    from flwr.common import Metadata

    from pcvr.protocols.codecs import Codec, encode
    from pcvr.protocols.messages import Binding, TrainReply

    codec = Codec.parse("none")
    record = TrainReply(
        binding=Binding(run_id=run_id, round=round_, node_id=node), codec=codec, size=update.size,
        grad=encode(update, codec, generator=np.random.default_rng(0)), num_examples=examples,
    ).to_record()
    metadata = Metadata(
        run_id=run_id, message_id="", src_node_id=node, dst_node_id=1, reply_to_message_id="r" * 64, group_id="1",
        created_at=time.time(), ttl=600.0, message_type="train",
    )
    return Message(metadata=metadata, content=record)


class InProcessGrid:
    """A Flower grid in the test's process: each pushed message goes to its node's ClientApp at once.

    ``contexts`` maps node id → that clean room's Flower context (:func:`room_context`);
    ``crash_at`` (message type, round) raises :class:`SimulatedCrash` when the platform
    pushes that round's messages, as if its process were killed there. ``killed_at``
    (node → round) takes that clean room down for that round's train message — the
    SuperLink answers for it that the node is unavailable, as Flower does — and brings it
    back for the next with empty state, as a restarted SuperNode comes back.
    """

    def __init__(
        self, contexts: dict, *, run_id: int, crash_at: tuple[str, int] | None = None, killed_at: dict | None = None
    ) -> None:
        from types import SimpleNamespace

        from pcvr.clean_room.app import make_client_app

        self.contexts, self.app, self.replies, self.crash_at = contexts, make_client_app(), {}, crash_at
        self.killed_at = dict(killed_at or {})
        self.run = SimpleNamespace(run_id=run_id)
        self._sent = 0

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        import time

        from flwr.app import Message
        from flwr.common import Metadata

        ids = []
        for message in messages:
            kind = message.metadata.message_type
            if self.crash_at is not None and kind == self.crash_at[0] and fields_of(message.content)["round"] == self.crash_at[1]:
                raise SimulatedCrash(f"killed while pushing {kind} of round {self.crash_at[1]}")
            node = message.metadata.dst_node_id
            self._sent += 1
            message_id = f"{self._sent:064d}"
            metadata = Metadata(
                run_id=self.run.run_id, message_id=message_id, src_node_id=1, dst_node_id=node, reply_to_message_id="",
                group_id="1", created_at=time.time(), ttl=600.0, message_type=kind,
            )
            if kind == "train" and self.killed_at.get(node) == fields_of(message.content)["round"]:
                self.replies[message_id] = _unavailable(metadata)
                self.contexts[node].state = type(self.contexts[node].state)()  # restarted: its memory is gone
            else:
                self.replies[message_id] = self.app(Message(metadata=metadata, content=message.content), self.contexts[node])
            ids.append(message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _unavailable(instruction):
    """The SuperLink's own reply for an instruction whose node is offline (Flower's NODE_UNAVAILABLE)."""
    import time

    from flwr.app import Error
    from flwr.app.message import make_message
    from flwr.common import Metadata
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    metadata = Metadata(
        run_id=instruction.run_id, message_id="", src_node_id=SUPERLINK_NODE_ID, dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id=instruction.message_id, group_id="1", created_at=time.time(), ttl=600.0,
        message_type=instruction.message_type,
    )
    return make_message(metadata=metadata, error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"))


class SimulatedCrash(Exception):
    """The platform's process dies here (:class:`InProcessGrid`'s ``crash_at``)."""


_PORTS = random.Random(os.getpid())  # one draw after another: two deployments in one process get different ports


def free_port_block(count: int) -> int:
    """A port p with p .. p+count all free on 127.0.0.1 right now (deployment tests)."""
    for _ in range(200):
        base = _PORTS.randrange(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count + 1):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free block of ports on 127.0.0.1")


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
