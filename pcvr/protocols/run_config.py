"""The run-wide settings both the platform and the clean rooms read, parsed once.

Flower hands them over as ``context.run_config`` (kebab-case keys, from
``[tool.flwr.app.config]`` in ``pyproject.toml`` plus ``--run-config``
overrides). :meth:`RunConfig.from_run_config` is the only place those keys are read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pcvr.protocols.codecs import Codec
from pcvr.protocols.label_dp import Correction

__all__ = ["RunConfig", "MAX_LOCAL_STEPS"]

MAX_LOCAL_STEPS = 1000  # local steps a round may carry (a bound on the work one instruction asks for)


@dataclass(frozen=True)
class RunConfig:
    """Settings of one federated training run.

    Attributes:
        platform_dir: the platform's own directory (:class:`pcvr.protocols.layout.PlatformDir`:
            ``pcvr platform pretrain`` writes it); only the platform reads it. Clean rooms
            find their directories in their own node config, never here.
        label_set: which prepared clean-room label input to train on (e.g. ``eps=3``).
        run_dir: where the platform writes checkpoints and ``result.json``.
        num_rounds: federated rounds; one optimizer step per round.
        clean_rooms: how many clean rooms the platform waits for before round 1.
        batch_size: rows per clean-room batch gradient.
        min_batch_size: a clean room never sends a gradient over fewer rows.
        correction: label-noise correction the clean rooms apply.
        learning_rate: the platform's Adam step size on the adapters.
        eval_every: evaluate on the holdout every this many rounds (and at the end).
        seed: seeds the adapters' initialisation and the clean rooms' batch sampling.
        codec: how clean rooms compress their gradients (``pcvr.protocols.codecs``;
            ``none`` sends dense float32), with error feedback.
        downstream_codec: how the platform compresses the adapter-weight deltas it sends.
        max_message_bytes: a received message larger than this is rejected unread.
        record_payloads: keep a copy of every payload sent and received (for ``pcvr audit``).
        dp_noise_multiplier: DP-SGD noise σ in the clean rooms (0: off); a clean room's
            node config may set its own.
        dp_target_epsilon: alternatively, the DP-SGD ε to reach after ``num_rounds``
            rounds, from which σ is derived (0: off).
        dp_clip_norm: DP-SGD per-example L2 clip norm C.
        dp_delta: DP-SGD δ.
        min_participation: the share of rounds every clean room must serve (an accepted
            reply); a run in which one served fewer is a failed run.
        max_room_grad_norm: the platform clips each clean room's decoded gradient so its
            per-example mean has at most this L2 norm before aggregating (0: off), so one
            misbehaving clean room cannot dominate an update.
        local_steps: what a round carries. 1: every clean room sends one batch's summed
            gradient and the platform takes one Adam step on their mean. More: every clean
            room takes this many Adam steps itself, each on its own ``batch_size`` batch,
            and sends the change of its weights; the platform applies their example-weighted
            mean (federated averaging). DP-SGD accounts every local step.
        resume_run: the run id of an interrupted run to continue from the checkpoint in
            ``run_dir`` (0: a new run). The platform resumes after the last checkpointed
            round; the clean rooms keep counting that run's releases and DP-SGD steps under
            this id, so a resumed run is one run to their accountants.
        clean_room_nodes: the registered clean rooms, ``"<clean-room id>:<node id>,..."``
            (``pcvr deploy register`` writes them to ``nodes.json``). When set, the
            platform trains with exactly these nodes: it refuses to start while another
            node is connected or a node reports another clean-room id. Empty (the
            simulation, whose node ids are random): the first ``clean_rooms`` nodes.
    """

    platform_dir: Path = Path("runs/demo/platform")
    label_set: str = "eps=3"
    run_dir: Path = Path("runs/demo/platform/runs/flwr-run")
    num_rounds: int = 100
    clean_rooms: int = 3
    batch_size: int = 8192
    min_batch_size: int = 1024
    correction: Correction = Correction.FORWARD
    learning_rate: float = 0.02
    eval_every: int = 25
    seed: int = 0
    codec: Codec = Codec.parse("q8")
    downstream_codec: Codec = Codec.parse("q8")
    max_message_bytes: int = 1 << 20
    record_payloads: bool = False
    dp_noise_multiplier: float = 0.0
    dp_target_epsilon: float = 0.0
    dp_clip_norm: float = 1.0
    dp_delta: float = 1e-6
    min_participation: float = 0.9
    max_room_grad_norm: float = 0.0
    local_steps: int = 1
    resume_run: int = 0
    clean_room_nodes: str = ""

    def __post_init__(self) -> None:
        for name in ("num_rounds", "clean_rooms", "batch_size", "min_batch_size", "eval_every", "max_message_bytes", "local_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"run config: {name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.batch_size < self.min_batch_size:
            raise ValueError(
                f"run config: batch-size ({self.batch_size}) is below min-batch-size ({self.min_batch_size})"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"run config: learning-rate must be > 0; got {self.learning_rate}")
        for name in ("dp_noise_multiplier", "dp_target_epsilon", "max_room_grad_norm"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"run config: {name.replace('_', '-')} must be >= 0 (0: off); got {getattr(self, name)}")
        if self.dp_noise_multiplier > 0 and self.dp_target_epsilon > 0:
            raise ValueError("run config: set dp-noise-multiplier or dp-target-epsilon, not both")
        if not (self.dp_clip_norm > 0 and math.isfinite(self.dp_clip_norm)):
            raise ValueError(f"run config: dp-clip-norm must be > 0; got {self.dp_clip_norm}")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"run config: dp-delta must be in (0, 1); got {self.dp_delta}")
        if self.resume_run < 0:
            raise ValueError(f"run config: resume-run must be a run id >= 0 (0: a new run); got {self.resume_run}")
        if self.local_steps > MAX_LOCAL_STEPS:
            raise ValueError(f"run config: local-steps must be <= {MAX_LOCAL_STEPS}; got {self.local_steps}")
        if self.local_steps > 1 and self.max_room_grad_norm > 0:
            raise ValueError("run config: max-room-grad-norm bounds gradients; it applies only with local-steps = 1")
        if not 0 <= self.min_participation <= 1:
            raise ValueError(f"run config: min-participation must be in [0, 1]; got {self.min_participation}")
        registered = self.registered_nodes()
        if registered and len(registered) != self.clean_rooms:
            raise ValueError(
                f"run config: clean-room-nodes names {len(registered)} clean rooms but clean-rooms is {self.clean_rooms}"
            )

    def registered_nodes(self) -> dict[int, int]:
        """``clean_room_nodes`` parsed: Flower node id → clean-room id (empty when unset)."""
        nodes: dict[int, int] = {}
        for entry in filter(None, (part.strip() for part in self.clean_room_nodes.split(","))):
            room, _, node = entry.partition(":")
            if not (room.isdigit() and node.isdigit()):
                raise ValueError(f"run config: clean-room-nodes: {entry!r} is not <clean-room id>:<node id>")
            if int(node) in nodes or int(room) in nodes.values():
                raise ValueError(f"run config: clean-room-nodes: {entry!r} repeats a node or a clean room")
            nodes[int(node)] = int(room)
        return nodes

    @staticmethod
    def format_nodes(node_ids: Mapping[int, int]) -> str:
        """clean-room id → node id, as ``clean_room_nodes`` holds it."""
        return ",".join(f"{room}:{node}" for room, node in sorted(node_ids.items()))

    @classmethod
    def from_run_config(cls, values: Mapping[str, object]) -> "RunConfig":
        """Parse Flower's run config (kebab-case keys); unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, object] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(n.replace("_", "-") for n in fields))
                raise ValueError(f"run config: unknown key {key!r} (known: {known})")
            default = fields[name].default
            try:
                if isinstance(default, Path):
                    kwargs[name] = Path(str(value))
                elif isinstance(default, Correction):
                    kwargs[name] = Correction.parse(str(value))
                elif isinstance(default, Codec):
                    kwargs[name] = Codec.parse(str(value))
                elif isinstance(default, bool):
                    kwargs[name] = _parse_bool(value)
                elif isinstance(value, bool):
                    raise ValueError(f"expected a {type(default).__name__}, got {value!r}")
                elif isinstance(default, int):
                    if isinstance(value, float) and not value.is_integer():
                        raise ValueError(f"expected an integer, got {value!r}")
                    kwargs[name] = int(value)
                else:
                    kwargs[name] = type(default)(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"run config: {key}: {exc}") from None
        return cls(**kwargs)

    def anchored(self) -> "RunConfig":
        """The same config with every path absolute, a relative one read against this process's working directory.

        Flower runs the ServerApp in a process of its own whose working directory is
        the run's, not the one a user typed ``--work-dir runs/demo`` in.
        """
        paths = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Path)}
        return dataclasses.replace(self, **{name: path.absolute() for name, path in paths.items()})

    def to_run_config(self) -> dict[str, str | int | float]:
        """The inverse of :meth:`from_run_config`.

        Flower carries a run config's integers as signed 64-bit values; a Flower run id
        is unsigned 64-bit, so one above 2**63 − 1 (``resume-run``: half of all run ids)
        goes as its decimal string, which :meth:`from_run_config` reads back.
        """
        out: dict[str, str | int | float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (Path, Codec)):
                value = str(value)
            elif isinstance(value, Correction):
                value = value.value
            elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
                value = str(value)
            out[f.name.replace("_", "-")] = value
        return out


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")
