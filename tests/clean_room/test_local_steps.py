"""A round that carries local steps, through the real ClientApp: what leaves, what stays, what is accounted."""

from __future__ import annotations

import json

import numpy as np

from pcvr.clean_room.app import make_client_app
from pcvr.clean_room.dataset import load_training_data
from pcvr.clean_room.policy import RoomPolicy
from pcvr.clean_room.session import load_state
from pcvr.clean_room.task import batch_gradient, batch_indices, local_update
from pcvr.models.cvr import attach_adapters, get_adapter_vector
from pcvr.protocols.codecs import Codec
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.layout import ACCOUNTANT_FILE, CleanRoomDir
from pcvr.protocols.messages import Binding, TrainReply
from support import NODE_ID, RUN_ID, deliver, fields_of, make_backbone, room_context, train_instruction, write_clean_room

STEPS, BATCH = 3, 64
POLICY = RoomPolicy(min_batch_size=BATCH)


def served(reply) -> TrainReply:
    assert not reply.has_error(), reply.error
    return TrainReply.from_record(
        reply.content, expected=Binding(run_id=RUN_ID, round=1, node_id=NODE_ID), codec=Codec.parse("none"),
        num_adapter_params=len(get_adapter_vector(attach_adapters(make_backbone()))), min_batch_size=BATCH,
        max_bytes=1 << 20, max_examples=BATCH * STEPS,
    )


def test_the_reply_is_the_weight_change_of_its_local_steps(tmp_path) -> None:
    write_clean_room(tmp_path / "room", rows=500, policy=POLICY)
    context = room_context(tmp_path / "room", run_config={"local-steps": STEPS})
    raw = deliver(make_client_app(), train_instruction(local_steps=STEPS, learning_rate=0.05), context)
    reply = served(raw)

    # the same steps, computed here: the batches of steps 1..3 of the clean room's private order
    model = attach_adapters(make_backbone(), seed=0)
    data = load_training_data(CleanRoomDir(tmp_path / "room").label_set("eps=3").train)
    batches = [batch_indices(len(data), round_=k, batch_size=BATCH, seed=0, clean_room_id=0) for k in (1, 2, 3)]
    steps = [lambda i=i: batch_gradient(model, data, i, correction=Correction.FORWARD, min_batch_size=BATCH) for i in batches]
    expected = local_update(model, steps, learning_rate=0.05, moments=None)
    assert reply.num_examples == STEPS * BATCH
    assert np.abs(expected.delta).max() > 1e-3
    np.testing.assert_allclose(reply.adapter_grad(), expected.delta, atol=1e-6)

    # the Adam moments stay in the clean room's state for the next round; the reply has a gradient reply's fields only
    held = load_state(context.state, length=len(expected.delta))
    assert held.moments is not None and held.moments.step == STEPS
    np.testing.assert_allclose(held.moments.exp_avg, expected.moments.exp_avg, atol=1e-7)
    write_clean_room(tmp_path / "other", rows=500, policy=POLICY)
    gradient_raw = deliver(make_client_app(), train_instruction(), room_context(tmp_path / "other"))
    assert served(gradient_raw).num_examples == BATCH  # control: one step is one batch's gradient
    assert set(fields_of(raw.content)) == set(fields_of(gradient_raw.content))


def test_dp_sgd_accounts_every_local_step(tmp_path) -> None:
    dp = {"dp-noise-multiplier": 1.0, "num-rounds": 4}
    write_clean_room(tmp_path / "room", rows=500, policy=POLICY)
    context = room_context(tmp_path / "room", run_config={"local-steps": STEPS, **dp})
    reply = served(deliver(make_client_app(), train_instruction(local_steps=STEPS, learning_rate=0.05), context))
    assert reply.loss is None  # under DP-SGD only the noised update leaves
    (history,) = json.loads((tmp_path / "room" / ACCOUNTANT_FILE).read_text())["runs"].values()
    assert sum(steps for _, _, steps in history) == STEPS  # three releases, not one

    write_clean_room(tmp_path / "one", rows=500, policy=POLICY)
    served(deliver(make_client_app(), train_instruction(), room_context(tmp_path / "one", run_config=dp)))
    (control,) = json.loads((tmp_path / "one" / ACCOUNTANT_FILE).read_text())["runs"].values()
    assert sum(steps for _, _, steps in control) == 1  # control: a gradient round is one release
