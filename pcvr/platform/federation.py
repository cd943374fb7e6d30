"""The platform's round loop over a Flower :class:`~flwr.serverapp.Grid`.

Each round: send every clean room the current adapter weights, collect replies,
validate each (a rejected reply is logged and never applied), aggregate, take
one optimizer step, checkpoint; evaluate on the holdout every ``eval_every``
rounds and at the end. Bytes are counted as Flower serializes the messages (the
sum of the deflated objects of each message's tree).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from pcvr.models.features import EncodedFeatures
from pcvr.platform.training import AdapterTrainer, RunLog, aggregate
from pcvr.protocols.messages import ProtocolError, TrainIns, TrainReply
from pcvr.protocols.run_config import RunConfig

__all__ = ["Holdout", "wire_bytes", "run_federated_training"]

log = logging.getLogger(__name__)
_POLL_S = 0.01
_NODE_WAIT_S = 120.0


@dataclass(frozen=True)
class Holdout:
    features: EncodedFeatures
    labels: np.ndarray


def wire_bytes(message: Message) -> int:
    """Bytes of ``message`` as Flower puts it on the wire: its deflated object tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def _wait_for_nodes(grid: Grid, count: int) -> list[int]:
    deadline = time.monotonic() + _NODE_WAIT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {count} clean rooms connected within {_NODE_WAIT_S:.0f} s")
        time.sleep(0.1)


def _exchange(grid: Grid, messages: list[Message], *, timeout: float) -> list[Message]:
    """Push, then pull every 10 ms (``Grid.send_and_receive`` sleeps 0.1–3 s between pulls)."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
        if pending:
            time.sleep(_POLL_S)
    return replies


def run_federated_training(
    grid: Grid, config: RunConfig, trainer: AdapterTrainer, holdout: Holdout, *, round_timeout: float = 600.0
) -> RunLog:
    """Run ``config.num_rounds`` rounds; returns the log (also checkpointed under ``config.run_dir``)."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    nodes = _wait_for_nodes(grid, config.clean_rooms)
    run_log = RunLog()
    train_s = 0.0  # wall time of the rounds themselves, evaluation excluded
    for round_ in range(trainer.steps + 1, config.num_rounds + 1):
        started = time.monotonic()
        ins = TrainIns(
            round=round_,
            adapter_weights=trainer.adapter_weights(),
            batch_size=config.batch_size,
            min_batch_size=config.min_batch_size,
            correction=config.correction,
        )
        messages = [Message(ins.to_record(), dst_node_id=node, message_type="train") for node in nodes]
        bytes_down = sum(wire_bytes(m) for m in messages)
        replies = _exchange(grid, messages, timeout=round_timeout)
        bytes_up = sum(wire_bytes(r) for r in replies)
        accepted = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = f"clean room error: {reply.error.reason}"
            else:
                try:
                    accepted.append(
                        TrainReply.from_record(
                            reply.content,
                            num_adapter_params=trainer.num_adapter_params,
                            expected_round=round_,
                            min_batch_size=config.min_batch_size,
                        )
                    )
                    continue
                except ProtocolError as exc:
                    reason = str(exc)
            run_log.rejected.append({"round": round_, "node": node, "reason": reason})
            log.warning("round %d: rejected reply from node %d: %s", round_, node, reason)
        if not accepted:
            raise RuntimeError(f"round {round_}: no valid reply ({len(replies)} received, all rejected)")
        trainer.step(aggregate(accepted))
        trainer.checkpoint(config.run_dir / "checkpoint.pt")
        examples = sum(r.num_examples for r in accepted)
        train_s += time.monotonic() - started
        run_log.rounds.append(
            {
                "round": round_,
                "clean_rooms": len(accepted),
                "examples": examples,
                "loss": sum(r.loss * r.num_examples for r in accepted) / examples,
                "bytes_down": bytes_down,
                "bytes_up": bytes_up,
                "wall_s": time.monotonic() - started,
            }
        )
        if round_ % config.eval_every == 0 or round_ == config.num_rounds:
            metrics = trainer.evaluate(holdout.features, holdout.labels)
            run_log.evaluations.append({"round": round_, "train_s": train_s, **metrics})
            log.info("round %d: %s", round_, metrics)
    return run_log
