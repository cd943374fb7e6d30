"""The clean room's Flower ClientApp: unpack the instruction, compute, pack the reply.

All the work is in :mod:`pcvr.clean_room.task`; this adapter only reads the run
config and the node's facts, loads the clean room's data and the frozen
backbone, and validates the instruction before anything is computed (a
malformed instruction raises, and Flower answers the platform with an error).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pcvr.clean_room.dataset import load_training_data
from pcvr.clean_room.task import batch_gradient, batch_indices
from pcvr.data import schema
from pcvr.models.cvr import attach_adapters, load_backbone, parameter_counts, set_adapter_vector
from pcvr.protocols.messages import TrainIns, TrainReply
from pcvr.protocols.run_config import RunConfig

__all__ = ["app", "make_client_app", "clean_room_dir"]

CLEAN_ROOM_ID = "clean-room-id"
CLEAN_ROOM_DIR = "clean-room-dir"
PARTITION_ID = "partition-id"  # set by Flower's simulation engine


def clean_room_dir(data_dir: Path, clean_room_id: int) -> Path:
    """Where clean room ``clean_room_id`` keeps its backbone copy and its inputs."""
    return Path(data_dir) / f"clean_room_{clean_room_id}"


def _node_facts(node_config: Mapping[str, object], config: RunConfig) -> tuple[int, Path]:
    raw_id = node_config.get(CLEAN_ROOM_ID, node_config.get(PARTITION_ID))
    if raw_id is None:
        raise ValueError(f"node config needs {CLEAN_ROOM_ID!r} (or Flower's {PARTITION_ID!r} in simulation)")
    clean_room_id = int(raw_id)
    directory = node_config.get(CLEAN_ROOM_DIR)
    return clean_room_id, Path(str(directory)) if directory else clean_room_dir(config.data_dir, clean_room_id)


def make_client_app(defaults: Mapping[str, object] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``defaults`` overlaid by Flower's ``context.run_config``."""
    defaults = dict(defaults or {})
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        config = RunConfig.from_run_config({**defaults, **context.run_config})
        clean_room_id, directory = _node_facts(context.node_config, config)
        torch.set_num_threads(1)  # several clean rooms share the machine in simulation
        model = attach_adapters(load_backbone(directory / "backbone"), seed=config.seed)
        ins = TrainIns.from_record(msg.content, num_adapter_params=parameter_counts(model)["adapters"])
        set_adapter_vector(model, torch.from_numpy(ins.adapter_weights))
        data = load_training_data(
            directory / config.label_set / "train.parquet",
            num_categorical=len(schema.CATEGORICAL_FIELDS),
            num_dense=len(schema.DENSE_FIELDS),
        )
        index = batch_indices(
            len(data), round_=ins.round, batch_size=ins.batch_size, seed=config.seed, clean_room_id=clean_room_id
        )
        grad = batch_gradient(model, data, index, correction=ins.correction, min_batch_size=ins.min_batch_size)
        reply = TrainReply(round=ins.round, adapter_grad=grad.adapter_grad, num_examples=grad.num_examples, loss=grad.loss)
        return Message(reply.to_record(), reply_to=msg)

    return client_app


app = make_client_app()
