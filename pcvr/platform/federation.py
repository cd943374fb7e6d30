"""The platform's round loop over a Flower :class:`~flwr.serverapp.Grid`.

Each round: send every clean room the current adapter weights (a compressed
delta against the version it acknowledged, :mod:`pcvr.platform.downlink`),
collect replies, validate each against the round's binding (a rejected reply is
counted, logged and never applied), decode, aggregate, take one optimizer step,
checkpoint; in a simulation (an oracle holdout with true labels), evaluate on it every
``eval_every`` rounds and at the end.
After the last round every clean room scores its held-out split and returns only
de-biased sums (:func:`collect_private_evaluation`), then is asked for its
privacy ledger.

Bytes are counted as Flower puts each message on the wire: the sum of the
deflated objects of the message's tree (metadata, record dict, records).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from pcvr.models.features import EncodedFeatures
from pcvr.platform.downlink import Downlink
from pcvr.platform.training import AdapterTrainer, Participation, PrivateEvaluation, RunLog, aggregate, clip_room_gradient
from pcvr.protocols.codecs import encode
from pcvr.protocols.eval_messages import EVALUATE_MESSAGE, WEIGHTS_CODEC, EvaluateIns, EvaluateReply
from pcvr.protocols.private_eval import EvalAggregates, combine, estimate
from pcvr.protocols.messages import (
    Binding,
    PREFLIGHT_ACTION,
    LedgerIns,
    LedgerReply,
    PreflightIns,
    PreflightReply,
    ProtocolError,
    TrainIns,
    TrainReply,
    record_to_bytes,
)
from pcvr.protocols.refusals import Refusal
from pcvr.protocols.run_config import RunConfig

__all__ = [
    "Holdout",
    "wire_bytes",
    "PayloadRecorder",
    "receive_replies",
    "apply_round",
    "preflight",
    "run_federated_training",
    "interrupted_run",
    "collect_private_evaluation",
    "collect_ledgers",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
_POLL_S = 0.01
_NODE_WAIT_S = 120.0
CHECKPOINT_FILE = "checkpoint.pt"  # in the run dir: the adapters and optimizer after the last completed round
MAX_EMPTY_ROUNDS = 3  # consecutive rounds without a valid reply before the run is abandoned


@dataclass(frozen=True)
class Holdout:
    features: EncodedFeatures
    labels: np.ndarray


def wire_bytes(message: Message) -> int:
    """Bytes of ``message`` as Flower puts it on the wire: its deflated object tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def interrupted_run(run_dir: Path) -> int:
    """The run the checkpoint in ``run_dir`` belongs to: what ``resume-run`` names to continue it.

    Raises:
        ValueError: no checkpoint there, or one that does not say (one line, naming it).
    """
    state = AdapterTrainer.saved_run_state(Path(run_dir) / CHECKPOINT_FILE)
    if not state or not isinstance(state.get("run"), int):
        raise ValueError(f"--resume: {Path(run_dir) / CHECKPOINT_FILE} does not say which run it belongs to")
    return state["run"]


class MembershipError(Exception):
    """The connected nodes are not the clean rooms the run is for; the run does not start."""


def _wait_for_nodes(grid: Grid, config: RunConfig) -> list[int]:
    """The nodes to train with: exactly the registered ones once all are online, else the first ``clean_rooms``.

    Raises:
        MembershipError: a node that is not registered is connected.
        TimeoutError: the clean rooms did not all connect in time.
    """
    registered = config.registered_nodes()
    deadline = time.monotonic() + _NODE_WAIT_S
    while True:
        online = set(grid.get_node_ids())
        unknown = sorted(online - set(registered)) if registered else []
        if unknown:
            raise MembershipError(
                f"node {unknown[0]} is connected but is not one of the registered clean rooms "
                f"({config.clean_room_nodes}); refusing to start"
            )
        if registered and set(registered) <= online:
            return sorted(registered)
        if not registered and len(online) >= config.clean_rooms:
            return sorted(online)
        if time.monotonic() > deadline:
            count = len(online & set(registered)) if registered else len(online)
            raise TimeoutError(f"only {count} of {config.clean_rooms} clean rooms connected within {_NODE_WAIT_S:.0f} s")
        time.sleep(0.1)


def _exchange(grid: Grid, messages: list[Message], *, timeout: float) -> tuple[list[Message], dict[str, int]]:
    """Push, then pull every 10 ms (``Grid.send_and_receive`` sleeps 0.1–3 s between pulls).

    Returns the replies and, by message id, the node each instruction was sent to
    (:func:`replying_node` needs it for the replies the SuperLink writes itself).
    """
    ids = list(grid.push_messages(messages))
    sent_to = {message_id: message.metadata.dst_node_id for message_id, message in zip(ids, messages)}
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
        if pending:
            time.sleep(_POLL_S)
    return replies, sent_to


def replying_node(reply: Message, sent_to: Mapping[str, int]) -> int:
    """The clean room a reply is about: its sender, or, when the SuperLink answers for a node
    it could not reach (Flower's NODE_UNAVAILABLE and the like), the node the instruction went to."""
    node = reply.metadata.src_node_id
    if node == SUPERLINK_NODE_ID:
        return sent_to.get(reply.metadata.reply_to_message_id, node)
    return node


class PayloadRecorder:
    """Keeps the exact serialized payloads sent and received, for ``pcvr audit``.

    ``<run_dir>/wire/r<round>-n<node>.sent`` and ``.received``: each a record
    serialized as Flower does (:func:`pcvr.protocols.messages.record_to_bytes`).
    """

    SENT = "sent"
    RECEIVED = "received"

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, round_: int, node_id: int, direction: str, message: Message) -> None:
        if self.directory is not None and message.has_content():  # an error reply has no payload
            self.path(self.directory, round_=round_, node_id=node_id, direction=direction).write_bytes(
                record_to_bytes(message.content)
            )

    @staticmethod
    def path(directory: Path, *, round_: int, node_id: int, direction: str) -> Path:
        return Path(directory) / f"r{round_:05d}-n{node_id}.{direction}"

    @classmethod
    def rounds(cls, directory: Path) -> list[tuple[int, int]]:
        """(round, node) of every recorded instruction, in round order."""
        names = (path.stem.split("-") for path in Path(directory).glob(f"*.{cls.SENT}"))
        return sorted((int(round_[1:]), int(node[1:])) for round_, node in names)


class RoundMissed(ProtocolError):
    """The SuperLink answered for a clean room it could not reach: the room missed the round.

    Not a rejection: nothing came from the clean room (it is offline, or its reply never
    arrived), so nothing was refused; the round counts as missed for that room.
    """


_UNREACHABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def _raise_if_refused(reply: Message) -> None:
    """An error reply becomes a rejection by its code, and by Flower's reason only when Flower wrote it.

    A clean room's refusal is named by its fixed text: the text on the wire is not a clean
    room's to choose. The SuperLink's own error keeps Flower's reason, since Flower wrote
    it: a node it cannot reach (offline, or its reply expired) is :class:`RoundMissed`;
    any other code is only named.
    """
    if not reply.has_error():
        return
    code = reply.error.code
    if reply.metadata.src_node_id == SUPERLINK_NODE_ID:
        kind = RoundMissed if code in _UNREACHABLE else ProtocolError
        raise kind(f"Flower: {Refusal.describe(code)}: {reply.error.reason}")
    raise ProtocolError(f"clean room refused: {Refusal.describe(code)}" if Refusal.is_refusal(code) else Refusal.describe(code))


def receive_replies(
    replies: list[Message],
    *,
    round_: int,
    expected: dict[int, Binding],
    config: RunConfig,
    num_adapter_params: int,
    sent_to: Mapping[str, int] | None = None,
) -> tuple[dict[int, TrainReply], list[dict]]:
    """Validate one round's replies; returns the accepted ones by node and the rejections.

    Each node may answer once, with a reply bound to this run, this round and itself;
    anything else — an error, a second reply, a reply from a node that was not asked,
    a malformed or oversized payload — is a rejection with its reason. ``sent_to``
    (message id → node, from :func:`_exchange`) attributes the SuperLink's own error
    replies to the node they are about; one saying the node could not be reached is
    entered with ``"missed": True`` (:class:`RoundMissed`), since the room sent nothing.
    """
    accepted: dict[int, TrainReply] = {}
    rejected: list[dict] = []
    for reply in replies:
        node = replying_node(reply, sent_to or {})
        try:
            if node not in expected:
                raise ProtocolError(f"reply from node {node}, which was not asked this round")
            if node in accepted:
                raise ProtocolError("a second reply for this round (replayed)")
            _raise_if_refused(reply)
            accepted[node] = TrainReply.from_record(
                reply.content,
                expected=expected[node],
                codec=config.codec,
                num_adapter_params=num_adapter_params,
                min_batch_size=config.min_batch_size,
                max_bytes=config.max_message_bytes,
                max_examples=config.batch_size * config.local_steps,
            )
        except RoundMissed as exc:
            rejected.append({"round": round_, "node": node, "reason": str(exc), "missed": True})
            log.warning("round %d: node %d missed the round: %s", round_, node, exc)
        except ProtocolError as exc:
            rejected.append({"round": round_, "node": node, "reason": str(exc)})
            log.warning("round %d: rejected reply from node %d: %s", round_, node, exc)
    return accepted, rejected


def apply_round(
    trainer: AdapterTrainer,
    replies: list[Message],
    *,
    round_: int,
    expected: dict[int, Binding],
    config: RunConfig,
    sent_to: Mapping[str, int] | None = None,
) -> tuple[dict[int, TrainReply], list[dict]]:
    """Validate the round's replies and, if any is valid, take one optimizer step with their mean.

    With ``config.local_steps`` > 1 each reply is a clean room's weight change after its
    local steps, and the step adds their example-weighted mean. Only validated replies
    reach :func:`aggregate`; with none, the model is left untouched.
    """
    length = trainer.num_adapter_params
    accepted, rejected = receive_replies(
        replies, round_=round_, expected=expected, config=config, num_adapter_params=length, sent_to=sent_to
    )
    if accepted and config.local_steps > 1:  # each reply is a weight change: average them, example-weighted
        nodes = sorted(accepted)
        deltas = [accepted[node].adapter_grad() for node in nodes]
        trainer.apply_delta(aggregate(
            [delta * accepted[node].num_examples for node, delta in zip(nodes, deltas)],
            num_examples=[accepted[node].num_examples for node in nodes],
        ))
    elif accepted:
        grads = []
        for node, reply in sorted(accepted.items()):  # one summation order, whatever order replies arrived in
            grad, factor = clip_room_gradient(reply.adapter_grad(), num_examples=reply.num_examples, max_norm=config.max_room_grad_norm)
            if factor < 1.0:
                log.warning("round %d: node %d: gradient clipped by %.3g to the per-example bound %g", round_, node, factor, config.max_room_grad_norm)
            grads.append(grad)
        trainer.step(aggregate(grads, num_examples=[reply.num_examples for _, reply in sorted(accepted.items())]))
    return accepted, rejected


def preflight(
    grid: Grid, nodes: list[int], *, run_id: int, config: RunConfig, backbone: bytes, timeout: float
) -> dict[int, Participation]:
    """Ask every clean room, before round 1, whether it can serve the run; node → its participation record.

    A clean room checks its names, its policy, its backbone against ``backbone`` (the
    platform's :func:`~pcvr.models.cvr.backbone_digest`), its files and its row count.
    """
    records = {
        node: PreflightIns(
            Binding(run_id=run_id, round=0, node_id=node),
            backbone_digest=backbone,
            batch_size=config.batch_size,
            min_batch_size=config.min_batch_size,
        ).to_record()
        for node in nodes
    }

    def parse(node: int, content: RecordDict) -> PreflightReply:
        expected = Binding(run_id=run_id, round=0, node_id=node)
        return PreflightReply.from_record(content, expected=expected, max_bytes=config.max_message_bytes)

    rooms = {}
    for node, answer in _ask(grid, records, message_type=f"query.{PREFLIGHT_ACTION}", parse=parse, timeout=timeout).items():
        if isinstance(answer, str):
            rooms[node] = Participation(node=node, preflight=answer)
        else:
            refused = None if answer.refusal == 0 else f"clean room refused: {Refusal.describe(answer.refusal)}"
            registered = config.registered_nodes().get(node, answer.clean_room_id)
            if refused is None and answer.clean_room_id != registered:
                refused = f"says it is clean room {answer.clean_room_id}, but is registered as clean room {registered}"
            rooms[node] = Participation(node=node, clean_room_id=answer.clean_room_id, preflight=refused)
    for room in rooms.values():
        if room.preflight is not None:
            log.error("pre-flight: %s cannot serve this run: %s", room.name, room.preflight)
    return rooms


def run_federated_training(
    grid: Grid,
    config: RunConfig,
    trainer: AdapterTrainer,
    holdout: Holdout | None,
    *,
    backbone: bytes,
    round_timeout: float = 600.0,
    on_round: Callable[[str], None] | None = None,
    resume: dict | None = None,
) -> RunLog:
    """Pre-flight, then ``config.num_rounds`` rounds; returns the log (also checkpointed under ``config.run_dir``).

    ``on_round`` gets one line per round (:func:`round_line`) as the round ends.
    ``resume`` (:meth:`RunLog.resume_state`, from the checkpoint the ``trainer`` was
    restored from) continues an interrupted run after its last checkpointed round: its
    log and each clean room's counts go on, and every clean room gets full weights first.
    ``holdout`` (true labels: a simulation's only) is evaluated on every ``eval_every``
    rounds and at the end; without it the clean rooms' private evaluation is all there is.

    A failed pre-flight check stops the run before round 1; ``MAX_EMPTY_ROUNDS``
    rounds in a row without a valid reply abandon it. Either way the log says why.
    """
    config.run_dir.mkdir(parents=True, exist_ok=True)
    run_id = grid.run.run_id
    logical_run = run_id if resume is None else int(resume["run"])
    run_log = RunLog() if resume is None else RunLog.resumed(resume)
    try:
        nodes = _wait_for_nodes(grid, config)
    except MembershipError as exc:
        run_log.abandoned = str(exc)
        log.error(run_log.abandoned)
        return run_log
    run_log.participation = preflight(grid, nodes, run_id=run_id, config=config, backbone=backbone, timeout=round_timeout)
    if any(room.preflight is not None for room in run_log.participation.values()):
        return run_log
    for room in run_log.participation.values():
        earlier = (resume or {}).get("participation", {}).get(str(room.clean_room_id))
        if earlier is not None:
            room.carry_over(earlier)
    length = trainer.num_adapter_params
    downlink = Downlink(config.downstream_codec, length=length, seed=config.seed)
    record = PayloadRecorder(config.run_dir / "wire" if config.record_payloads else None)
    train_s = 0.0 if resume is None else float(resume["train_s"])  # wall time of the rounds, evaluation excluded
    empty_rounds = 0
    first_round = 1 if resume is None else int(resume["round"]) + 1
    for round_ in range(first_round, config.num_rounds + 1):
        started = time.monotonic()
        weights = trainer.adapter_weights()
        local_learning_rate = trainer.local_learning_rate(local_steps=config.local_steps)
        expected = {node: Binding(run_id=run_id, round=round_, node_id=node) for node in nodes}
        messages = []
        for node in nodes:
            outgoing = downlink.prepare(node, round_=round_, weights=weights)
            ins = TrainIns(
                binding=expected[node],
                base_round=outgoing.base_round,
                applied_round=outgoing.applied_round,
                codec=outgoing.codec,
                size=length,
                weights=outgoing.frame,
                batch_size=config.batch_size,
                min_batch_size=config.min_batch_size,
                correction=config.correction,
                local_steps=config.local_steps,
                learning_rate=local_learning_rate,
            )
            messages.append(Message(ins.to_record(), dst_node_id=node, message_type="train"))
            record(round_, node, PayloadRecorder.SENT, messages[-1])
        bytes_down = sum(wire_bytes(m) for m in messages)
        instructed = time.monotonic()
        replies, sent_to = _exchange(grid, messages, timeout=round_timeout)
        exchanged = time.monotonic()
        bytes_up = sum(wire_bytes(r) for r in replies)
        for reply in replies:
            record(round_, reply.metadata.src_node_id, PayloadRecorder.RECEIVED, reply)
        accepted, rejected = apply_round(trainer, replies, round_=round_, expected=expected, config=config, sent_to=sent_to)
        run_log.rejected.extend(entry for entry in rejected if not entry.get("missed"))
        missed = []  # the clean rooms that sent nothing this round (offline, or no reply in time)
        for node in nodes:
            reasons = [entry["reason"] for entry in rejected if entry["node"] == node and not entry.get("missed")]
            run_log.participation[node].count(accepted=node in accepted, reasons=reasons)
            if node not in accepted and not reasons:
                missed.append(run_log.participation[node].name)
            if node in accepted:
                downlink.acknowledge(node, round_=round_)
            else:
                downlink.forget(node)
        run_log.steps = trainer.steps
        empty_rounds = 0 if accepted else empty_rounds + 1
        if not accepted:
            log.warning("round %d: no valid reply; no step this round", round_)
        examples = [reply.num_examples for reply in accepted.values()]
        losses = [(r.loss, r.num_examples) for r in accepted.values() if r.loss is not None]
        applied = time.monotonic()
        run_log.rounds.append(
            {
                "round": round_,
                "clean_rooms": len(accepted),
                "missed": sorted(missed),
                "examples": sum(examples),
                "loss": sum(l * n for l, n in losses) / sum(n for _, n in losses) if losses else None,
                "bytes_down": bytes_down,
                "bytes_up": bytes_up,
                "wall_s": applied - started,
                # where the round's time went, on the platform's clock: building and serializing the
                # instructions; waiting for the replies (the clean rooms' work and the engine's transport);
                # validating, decoding, aggregating and stepping; writing the checkpoint
                "instructions_s": instructed - started,
                "exchange_s": exchanged - instructed,
                "apply_s": applied - exchanged,
            }
        )
        trainer.checkpoint(
            config.run_dir / CHECKPOINT_FILE,
            run_state=run_log.resume_state(run=logical_run, round_=round_, train_s=train_s + applied - started),
        )
        run_log.rounds[-1]["checkpoint_s"] = time.monotonic() - applied
        run_log.rounds[-1]["wall_s"] = time.monotonic() - started
        train_s += run_log.rounds[-1]["wall_s"]
        last = round_ == config.num_rounds
        if empty_rounds >= MAX_EMPTY_ROUNDS:
            run_log.abandoned = f"run abandoned at round {round_}: no valid reply for {empty_rounds} rounds in a row"
            log.error(run_log.abandoned)
            last = True
        evaluation = None
        if holdout is not None and (round_ % config.eval_every == 0 or last):
            evaluating = time.monotonic()
            evaluation = trainer.evaluate(holdout.features, holdout.labels)
            run_log.evaluations.append({"round": round_, "train_s": train_s, "eval_s": time.monotonic() - evaluating, **evaluation})
            log.info("round %d: %s", round_, evaluation)
        if on_round is not None:
            on_round(round_line(run_log.rounds[-1], rounds=config.num_rounds, clean_rooms=len(nodes), evaluation=evaluation))
        if last:
            break
    if run_log.rounds:
        run_log.private = collect_private_evaluation(
            grid, run_log.participation, run_id=run_id, round_=run_log.rounds[-1]["round"], config=config,
            weights=trainer.adapter_weights(), timeout=round_timeout,
        )
    run_log.ledgers = collect_ledgers(grid, nodes, run_id=run_id, config=config, timeout=round_timeout)
    return run_log


ROUND_LINE_PREFIX = "pcvr round"  # the lines `pcvr deploy` shows from the ServerApp's output
RUN_FAILED_PREFIX = "pcvr run failed"


def round_line(entry: dict, *, rounds: int, clean_rooms: int, evaluation: dict | None) -> str:
    """One round as a person reads it, e.g. ``pcvr round 5/10: 3/3 clean rooms, loss 0.0931, 41.2 s; AUC 0.8123 …``."""
    loss = "no loss" if entry["loss"] is None else f"loss {entry['loss']:.4f}"
    line = f"{ROUND_LINE_PREFIX} {entry['round']}/{rounds}: {entry['clean_rooms']}/{clean_rooms} clean rooms, {loss}, {entry['wall_s']:.1f} s"
    if entry.get("missed"):
        line += f" ({', '.join(entry['missed'])} missed the round)"
    if evaluation is not None:
        line += f"; AUC {evaluation['auc']:.4f}, NE {evaluation['ne']:.4f}, calibration {evaluation['calibration']:.3f}"
    return line


def _ask(
    grid: Grid,
    records: dict[int, RecordDict],
    *,
    message_type: str,
    parse: Callable[[int, RecordDict], T],
    timeout: float,
) -> dict[int, T | str]:
    """Send each node its record; node → its parsed reply, or why there is none (a refusal's fixed text)."""
    messages = [Message(record, dst_node_id=node, message_type=message_type) for node, record in records.items()]
    answers: dict[int, T | str] = {node: "no reply" for node in records}
    replies, sent_to = _exchange(grid, messages, timeout=timeout)
    for reply in replies:
        node = replying_node(reply, sent_to)
        if node not in records:
            continue
        try:
            _raise_if_refused(reply)
            answers[node] = parse(node, reply.content)
        except ProtocolError as exc:
            answers[node] = str(exc)
    return answers


def collect_private_evaluation(
    grid: Grid,
    rooms: dict[int, Participation],
    *,
    run_id: int,
    round_: int,
    config: RunConfig,
    weights: np.ndarray,
    timeout: float,
) -> PrivateEvaluation:
    """Send every clean room the final weights; combine the sums of their held-out splits into estimates.

    Each reply is validated (binding, fields, at least ``config.min_batch_size`` rows);
    the estimate is made only when every clean room answered validly.
    """
    frame = encode(weights, WEIGHTS_CODEC, generator=np.random.default_rng(0))  # lossless: no draw is used
    bindings = {node: Binding(run_id=run_id, round=round_, node_id=node) for node in rooms}
    records = {
        node: EvaluateIns(binding, size=len(weights), weights=frame, min_batch_size=config.min_batch_size).to_record()
        for node, binding in bindings.items()
    }

    def parse(node: int, content: RecordDict) -> EvalAggregates:
        reply = EvaluateReply.from_record(
            content, expected=bindings[node], min_rows=config.min_batch_size, max_bytes=config.max_message_bytes
        )
        return reply.aggregates

    answers = _ask(grid, records, message_type=EVALUATE_MESSAGE, parse=parse, timeout=timeout)
    status = {rooms[node].name: answer if isinstance(answer, str) else "ok" for node, answer in sorted(answers.items())}
    failed = [f"{name}: {why}" for name, why in status.items() if why != "ok"]
    if failed:
        log.warning("private evaluation: %s", "; ".join(failed))
        return PrivateEvaluation(round=round_, metrics=None, rooms=status, unavailable="; ".join(failed))
    try:
        metrics = estimate(combine(answer for answer in answers.values() if not isinstance(answer, str)))
    except ValueError as exc:
        return PrivateEvaluation(round=round_, metrics=None, rooms=status, unavailable=str(exc))
    return PrivateEvaluation(round=round_, metrics=metrics, rooms=status)


def collect_ledgers(grid: Grid, nodes: list[int], *, run_id: int, config: RunConfig, timeout: float) -> dict[str, dict]:
    """Ask every clean room what protected its records in this run; node → ledger (or the error)."""
    round_ = config.num_rounds + 1
    records = {node: LedgerIns(Binding(run_id=run_id, round=round_, node_id=node)).to_record() for node in nodes}

    def parse(node: int, content: RecordDict) -> dict:
        expected = Binding(run_id=run_id, round=round_, node_id=node)
        return LedgerReply.from_record(content, expected=expected, max_bytes=config.max_message_bytes).ledger

    answers = _ask(grid, records, message_type="query", parse=parse, timeout=timeout)
    return {str(node): {"error": answer} if isinstance(answer, str) else answer for node, answer in answers.items()}
