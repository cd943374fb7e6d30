"""The clean room's Flower ClientApp: unpack the instruction, compute, pack the reply.

The work is in plain functions (:mod:`pcvr.clean_room.task`, :mod:`.dp_sgd`,
:mod:`.session`, :mod:`pcvr.protocols.codecs`); this adapter reads the run
config and the node's facts, checks the instruction against the protocol and the
clean room's own policy (:mod:`pcvr.clean_room.policy`) before anything is
computed, and keeps the clean room's state between rounds in ``context.state``.

Everything a handler does runs inside one boundary (:func:`_answer`): whatever
fails, the platform gets only a fixed :class:`~pcvr.protocols.refusals.Refusal`
code; the details go to the clean room's own log. Names from the run config
(the label set) are plain names resolved inside the clean room's directory
(:class:`pcvr.protocols.layout.CleanRoomDir`); the platform never supplies a path.

Per round: apply the weight delta to the held weights → sample a batch → the
de-biased, batch-summed adapter gradient (optionally DP-SGD: per-example clip +
Gaussian noise, accounted in a ledger that survives restarts) — or, with local
steps, that many Adam steps on batches of their own and the weights' change →
add the error-feedback residual and compress → record the release → reply.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from pcvr.clean_room.dp_sgd import DPSGDConfig, PrivacyAccountant, noise_multiplier_for, poisson_batch
from pcvr.clean_room.engine_poll import prompt_message_pickup
from pcvr.clean_room.evaluate import evaluate_split, evaluation_ledger, record_release
from pcvr.clean_room.policy import ReleaseLog, RoomPolicy
from pcvr.clean_room.resident import Resident
from pcvr.clean_room.session import RoomState, carried_residual, load_state, save_state, weights_for
from pcvr.clean_room.task import AdamMoments, BatchGradient, batch_gradient, batch_indices, local_update
from pcvr.models.cvr import attach_adapters, backbone_digest, parameter_counts, set_adapter_vector
from pcvr.protocols.codecs import compress_with_feedback
from pcvr.protocols.eval_messages import EVALUATE_MESSAGE, EvaluateIns, EvaluateReply
from pcvr.protocols.messages import (
    PREFLIGHT_ACTION,
    LedgerIns,
    LedgerReply,
    PreflightIns,
    PreflightReply,
    ProtocolError,
    TrainIns,
    TrainReply,
)
from pcvr.protocols.layout import CleanRoomDir, clean_room_dirs_from_environment
from pcvr.protocols.refusals import Refusal, Refused
from pcvr.protocols.run_config import RunConfig

__all__ = ["app", "make_client_app", "dp_sgd_config"]

CLEAN_ROOM_ID = "clean-room-id"
CLEAN_ROOM_DIR = "clean-room-dir"
CLEAN_ROOM_STATE_DIR = "clean-room-state-dir"  # optional: where it writes, when its directory is read-only
PARTITION_ID = "partition-id"  # set by Flower's simulation engine
_DP_KEYS = tuple(f.name.replace("_", "-") for f in dataclasses.fields(RunConfig) if f.name.startswith("dp_"))

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Node:
    clean_room_id: int
    room: CleanRoomDir
    dp: DPSGDConfig | None
    policy: RoomPolicy
    files: Resident  # its backbone and rows, kept between messages where the process lives on

    @property
    def state(self) -> Path:
        """Where this clean room writes its release log and accountant."""
        return self.room.state


def dp_sgd_config(config: RunConfig, node_config: Mapping[str, object]) -> DPSGDConfig | None:
    """The clean room's DP-SGD settings: the run's, overridden by its own node config; None when off."""
    values = {key: node_config[key] for key in _DP_KEYS if key in node_config}
    merged = RunConfig.from_run_config({**config.to_run_config(), **values})
    if merged.dp_noise_multiplier == 0 and merged.dp_target_epsilon == 0:
        return None
    return DPSGDConfig(
        noise_multiplier=merged.dp_noise_multiplier or None,
        target_epsilon=merged.dp_target_epsilon or None,
        clip_norm=merged.dp_clip_norm,
        delta=merged.dp_delta,
    )


def _node_facts(
    node_config: Mapping[str, object], config: RunConfig, rooms: Mapping[int, Path], files: Resident
) -> _Node:
    """The clean room's own facts: its id and directory from its node config, or from the local
    launcher's ``rooms`` (clean-room id → directory) in simulation; never from the run config."""
    raw_id = node_config.get(CLEAN_ROOM_ID, node_config.get(PARTITION_ID))
    if raw_id is None:
        raise ValueError(f"node config needs {CLEAN_ROOM_ID!r} (or Flower's {PARTITION_ID!r} in simulation)")
    clean_room_id = int(raw_id)
    directory = node_config.get(CLEAN_ROOM_DIR) or rooms.get(clean_room_id)
    if not directory:
        raise ValueError(f"clean room {clean_room_id}: no directory: its node config needs {CLEAN_ROOM_DIR!r}")
    state = node_config.get(CLEAN_ROOM_STATE_DIR)
    if state and not Path(str(state)).is_dir():
        raise ValueError(f"clean room {clean_room_id}: {CLEAN_ROOM_STATE_DIR} {state} is not a directory")
    room = CleanRoomDir(Path(str(directory)), state_root=Path(str(state)) if state else None)
    return _Node(
        clean_room_id=clean_room_id,
        room=room,
        dp=dp_sgd_config(config, node_config),
        policy=RoomPolicy.load(room.root),
        files=files,
    )


def _run_key(config: RunConfig, run_id: int) -> str:
    """The run its releases and DP-SGD steps count against: a resumed run continues the one it resumes."""
    return f"{config.label_set}/run-{config.resume_run or run_id}"


def _accountant(node: _Node, config: RunConfig, run_id: int) -> PrivacyAccountant:
    """One file per clean room: every run on its rows composes, whatever its label set."""
    return PrivacyAccountant(node.room.accountant, run_key=_run_key(config, run_id))


@dataclass(frozen=True)
class _Released:
    """What may leave the clean room for one round: a batch-summed gradient, or the weight change of local steps."""

    update: np.ndarray
    num_examples: int
    loss: float | None
    noise_multiplier: float | None
    moments: AdamMoments | None = None  # the clean room's Adam state after local steps (stays)


def _released_update(
    model: torch.nn.Module, node: _Node, config: RunConfig, ins: TrainIns, room: RoomState, *, run_id: int
) -> tuple[_Released, torch.Tensor]:
    """The round's update as it may leave, and the rows it was computed on (which stay).

    With ``ins.local_steps`` K > 1 the clean room takes K Adam steps
    (:func:`~pcvr.clean_room.task.local_update`), each on its own full batch (round r
    uses the batches of steps (r−1)K+1 … rK of its private order) or, under DP-SGD, its
    own Poisson sample, every one of them accounted before anything leaves.
    """
    data = node.files.rows(node.room.label_set(config.label_set).train)
    floor = node.policy.batch_floor(ins.min_batch_size)
    node.policy.check_rows(len(data), floor=floor)
    round_, steps = ins.binding.round, ins.local_steps
    if node.dp is None:
        indices = [
            batch_indices(
                len(data), round_=(round_ - 1) * steps + k + 1, batch_size=ins.batch_size, seed=config.seed,
                clean_room_id=node.clean_room_id,
            )
            for k in range(steps)
        ]
        for index in indices:
            node.policy.check_rows(len(index), floor=floor)
        gradients = [
            lambda index=index: batch_gradient(model, data, index, correction=ins.correction, min_batch_size=floor)
            for index in indices
        ]
        return _finish(model, gradients, ins, room, sigma=None), torch.cat(indices)
    # DP-SGD: Poisson sampling from fresh entropy (what the accountant assumes, unknown to the
    # platform); the floor applies to the expected batch size, which is all that is reported.
    sample_rate = min(1.0, ins.batch_size / len(data))
    expected = round(sample_rate * len(data))
    node.policy.check_rows(expected, floor=floor)
    accountant = _accountant(node, config, run_id)
    planned = config.num_rounds * steps
    if node.dp.target_epsilon is not None and accountant.steps + steps > planned:
        raise Refused(Refusal.DP_BUDGET_SPENT, f"{accountant.steps} steps of the {planned} it was set for")
    sigma = room.noise_multiplier
    if sigma is None:
        sigma = noise_multiplier_for(node.dp, sample_rate=sample_rate, steps=planned)
    node.policy.check_noise(
        sigma,
        total_epsilon_after=accountant.total_epsilon_after(
            noise_multiplier=sigma, sample_rate=sample_rate, delta=node.dp.delta, steps=steps
        ),
    )
    from pcvr.clean_room.dp_release import private_batch_gradient  # Opacus: seconds to import, only when used

    generator = torch.Generator().manual_seed(secrets.randbits(63))
    used: list[torch.Tensor] = []

    def private_step() -> BatchGradient:
        index = poisson_batch(len(data), sample_rate=sample_rate, generator=generator)
        used.append(index)
        grad = private_batch_gradient(
            model, data, index, correction=ins.correction, min_batch_size=0,
            clip_norm=node.dp.clip_norm, noise_multiplier=sigma, generator=generator,
        )
        return BatchGradient(grad.adapter_grad, expected, None)  # the expected size: all that is reported

    released = _finish(model, [private_step] * steps, ins, room, sigma=sigma)
    accountant.record_step(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)  # before anything leaves
    return released, torch.cat(used)


def _finish(
    model: torch.nn.Module, gradients: list, ins: TrainIns, room: RoomState, *, sigma: float | None
) -> _Released:
    """One batch gradient as it is (one step), or the weight change of the local steps."""
    if ins.local_steps == 1:
        grad = gradients[0]()
        return _Released(grad.adapter_grad, grad.num_examples, grad.loss, sigma)
    update = local_update(model, gradients, learning_rate=ins.learning_rate, moments=room.moments)
    return _Released(update.delta, update.num_examples, update.loss, sigma, moments=update.moments)


def _guarded(context: Context, what: str, handle: Callable[[], RecordDict | None]) -> tuple[RecordDict | None, Refusal | None]:
    """The one error boundary: ``handle``'s record, or the fixed refusal code for whatever it raised.

    A refusal's detail, a malformed instruction's reason and any other failure's
    traceback go to the clean room's log only.
    """
    try:
        return handle(), None
    except Refused as exc:
        log.warning("node %d: %s refused: %s", context.node_id, what, exc)
        return None, exc.refusal
    except ProtocolError as exc:
        log.warning("node %d: %s rejected: %s", context.node_id, what, exc)
        return None, Refusal.MALFORMED
    except Exception:  # noqa: BLE001 - the detail stays in the clean room's log
        log.exception("node %d: %s failed", context.node_id, what)
        return None, Refusal.FAILED


def _answer(msg: Message, context: Context, what: str, handle: Callable[[], RecordDict]) -> Message:
    """``handle``'s record as the reply, or an error carrying only a refusal code and its fixed text."""
    record, refusal = _guarded(context, what, handle)
    if refusal is None:
        return Message(record, reply_to=msg)
    return Message(error=Error(code=int(refusal), reason=refusal.reason), reply_to=msg)


def _check_ready(node: _Node, config: RunConfig, ins: PreflightIns) -> None:
    """Everything round 1 will need, checked before it: names, policy, backbone, rows, files."""
    label_set = node.room.label_set(config.label_set)
    node.policy.check_run(label_set=config.label_set, codec=config.codec, dp_enabled=node.dp is not None)
    node.policy.check_batch_size(ins.batch_size)
    node.policy.check_releases(ReleaseLog(node.state, run_key=_run_key(config, ins.binding.run_id)))
    if backbone_digest(node.files.backbone(node.room.backbone)) != ins.backbone_digest:
        raise Refused(Refusal.BACKBONE_MISMATCH, f"{node.room.backbone} differs from the platform's backbone")
    json.loads(label_set.ledger.read_text())
    data = node.files.rows(label_set.train)
    node.policy.check_rows(min(len(data), ins.batch_size), floor=node.policy.batch_floor(ins.min_batch_size))


def _preflight(
    msg: Message, context: Context, config: RunConfig, rooms: Mapping[int, Path], files: Resident
) -> RecordDict:
    node = _node_facts(context.node_config, config, rooms, files)
    ins = PreflightIns.from_record(msg.content, run_id=context.run_id, node_id=context.node_id, max_bytes=config.max_message_bytes)
    _, refusal = _guarded(context, "pre-flight", lambda: _check_ready(node, config, ins))
    return PreflightReply(binding=ins.binding, clean_room_id=node.clean_room_id, refusal=int(refusal or 0)).to_record()


def _train(
    msg: Message, context: Context, config: RunConfig, rooms: Mapping[int, Path], files: Resident
) -> RecordDict:
    node = _node_facts(context.node_config, config, rooms, files)
    label_set = node.room.label_set(config.label_set)  # a plain name inside the clean room, or refused
    node.policy.check_run(label_set=config.label_set, codec=config.codec, dp_enabled=node.dp is not None)
    torch.set_num_threads(1)  # several clean rooms share the machine in simulation
    model = attach_adapters(node.files.backbone(node.room.backbone), seed=config.seed)
    length = parameter_counts(model)["adapters"]
    room = load_state(context.state, length=length)
    ins = TrainIns.from_record(
        msg.content,
        run_id=context.run_id,
        node_id=context.node_id,
        last_round=room.last_round,
        num_adapter_params=length,
        max_bytes=config.max_message_bytes,
    )
    weights = weights_for(room, ins, length=length)
    node.policy.check_batch_size(ins.batch_size)
    releases = ReleaseLog(node.state, run_key=_run_key(config, context.run_id))
    node.policy.check_releases(releases)
    round_ = ins.binding.round
    residual = carried_residual(room, ins, length=length)
    # From here the round is spent: even if it fails, the same instruction is never served again.
    save_state(context.state, dataclasses.replace(room, last_round=round_, residual=residual, pending=None))
    set_adapter_vector(model, torch.from_numpy(weights))
    released, index = _released_update(model, node, config, ins, room, run_id=context.run_id)
    if config.record_payloads:
        directory = label_set.batches(context.run_id)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / f"r{round_:05d}.npy", index.numpy())
    quantizer = np.random.default_rng(secrets.randbits(128))  # rounding draws the platform cannot know
    frame, next_residual = compress_with_feedback(released.update, residual, config.codec, generator=quantizer)
    releases.record(num_examples=released.num_examples)  # before anything leaves
    save_state(
        context.state,
        RoomState(
            held_round=round_,
            last_round=round_,
            weights=weights,
            residual=next_residual,
            pending=released.update + residual - next_residual,  # what this reply carries
            noise_multiplier=released.noise_multiplier,
            moments=released.moments if released.moments is not None else room.moments,
        ),
    )
    reply = TrainReply(
        binding=ins.binding,
        codec=config.codec,
        size=length,
        grad=frame,
        num_examples=released.num_examples,
        loss=released.loss,
    )
    return reply.to_record()


def _evaluate(
    msg: Message, context: Context, config: RunConfig, rooms: Mapping[int, Path], files: Resident
) -> RecordDict:
    """Score the held-out split with the weights sent; reply with its sums only (:mod:`.evaluate`)."""
    node = _node_facts(context.node_config, config, rooms, files)
    label_set = node.room.label_set(config.label_set)
    node.policy.check_run(label_set=config.label_set, codec=config.codec, dp_enabled=node.dp is not None)
    torch.set_num_threads(1)
    model = attach_adapters(node.files.backbone(node.room.backbone), seed=config.seed)
    ins = EvaluateIns.from_record(
        msg.content,
        run_id=context.run_id,
        node_id=context.node_id,
        num_adapter_params=parameter_counts(model)["adapters"],
        max_bytes=config.max_message_bytes,
    )
    path = label_set.eval
    if not path.exists():
        raise Refused(Refusal.NO_HOLDOUT, f"{path} does not exist")
    data = node.files.rows(path)
    floor = node.policy.batch_floor(ins.min_batch_size)
    node.policy.check_rows(len(data), floor=floor)
    set_adapter_vector(model, torch.from_numpy(ins.adapter_weights()))
    aggregates = evaluate_split(model, data, min_rows=floor)
    record_release(context.state, rows=len(data))  # before anything leaves
    return EvaluateReply(binding=ins.binding, aggregates=aggregates).to_record()


def _query(
    msg: Message, context: Context, config: RunConfig, rooms: Mapping[int, Path], files: Resident
) -> RecordDict:
    node = _node_facts(context.node_config, config, rooms, files)
    ins = LedgerIns.from_record(msg.content, run_id=context.run_id, node_id=context.node_id, max_bytes=config.max_message_bytes)
    ledger = {**privacy_ledger(node, config, run_id=context.run_id), "evaluation": evaluation_ledger(context.state)}
    return LedgerReply(binding=ins.binding, ledger=ledger).to_record()


def make_client_app(
    defaults: Mapping[str, object] | None = None, *, clean_room_dirs: Mapping[int, Path] | None = None
) -> ClientApp:
    """A ClientApp whose run config is ``defaults`` overlaid by Flower's ``context.run_config``.

    ``clean_room_dirs`` (clean-room id → its directory) is the local launcher's: in
    Flower's simulation engine, where a node has no node config of its own, clean room
    ``k`` is the node with partition id ``k``. Without it, the launcher's environment
    (:func:`pcvr.protocols.layout.clean_room_dirs_from_environment`) says, read when a
    message arrives. A deployed SuperNode names its directory in
    its node config (``clean-room-dir``), which takes precedence. The platform's run
    config never supplies a path.

    Every handler runs inside :func:`_answer`: the platform gets a reply or a fixed
    refusal code, never a clean room's error text.
    """
    defaults = dict(defaults or {})
    given = None if clean_room_dirs is None else {int(k): Path(v) for k, v in clean_room_dirs.items()}
    client_app = ClientApp()
    files = Resident()  # this ClientApp's backbone and rows, between messages

    def rooms_of() -> Mapping[int, Path]:
        return clean_room_dirs_from_environment() if given is None else given

    def config_of(context: Context) -> RunConfig:
        return RunConfig.from_run_config({**defaults, **context.run_config})

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return _answer(msg, context, "train", lambda: _train(msg, context, config_of(context), rooms_of(), files))

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _answer(msg, context, EVALUATE_MESSAGE, lambda: _evaluate(msg, context, config_of(context), rooms_of(), files))

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return _answer(msg, context, "ledger query", lambda: _query(msg, context, config_of(context), rooms_of(), files))

    @client_app.query(PREFLIGHT_ACTION)
    def preflight(msg: Message, context: Context) -> Message:
        return _answer(msg, context, "pre-flight", lambda: _preflight(msg, context, config_of(context), rooms_of(), files))

    return client_app


def privacy_ledger(node: _Node, config: RunConfig, *, run_id: int) -> dict[str, object]:
    """What protected this clean room's records in run ``run_id``: the values it enforced and the releases it made."""
    label_ledger = json.loads(node.room.label_set(config.label_set).ledger.read_text())
    label_ledger.pop("source", None)  # a path inside the advertiser's premises
    releases = ReleaseLog(node.state, run_key=_run_key(config, run_id))
    if node.dp is None:
        dp_sgd: dict = {"enabled": False}
    else:
        dp_sgd = {"enabled": True, "clip_norm": node.dp.clip_norm, **_accountant(node, config, run_id).summary(delta=node.dp.delta)}
    return {
        "clean_room_id": node.clean_room_id,
        "label_set": config.label_set,
        "label_dp": label_ledger,
        "dp_sgd": dp_sgd,
        "min_batch_size": node.policy.batch_floor(config.min_batch_size),
        "policy": node.policy.to_ledger(),
        "releases": releases.summary(),
        "codec": str(config.codec),
        "rounds_served": releases.in_run,
    }


app = make_client_app()
prompt_message_pickup()  # in Flower's simulation engine only: see engine_poll
