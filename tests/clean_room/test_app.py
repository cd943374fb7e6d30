"""Tests of the ClientApp's plain helpers: a clean room's own DP-SGD settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pcvr.clean_room.app import dp_sgd_config
from pcvr.protocols.run_config import RunConfig


def test_dp_sgd_is_off_unless_asked_for() -> None:
    assert dp_sgd_config(RunConfig(), {}) is None


def test_the_run_config_sets_dp_sgd_for_every_clean_room() -> None:
    config = dp_sgd_config(RunConfig(dp_noise_multiplier=1.2, dp_clip_norm=0.5), {"partition-id": 0})
    assert config is not None and config.noise_multiplier == 1.2 and config.clip_norm == 0.5
    assert config.target_epsilon is None and config.delta == RunConfig().dp_delta


def test_a_clean_room_node_config_overrides_the_run() -> None:
    """The advertiser decides its own protection: its SuperNode's node config wins."""
    run = RunConfig(dp_noise_multiplier=0.8)
    own = dp_sgd_config(run, {"dp-noise-multiplier": 0.0, "dp-target-epsilon": 2.0, "dp-delta": 1e-7})
    assert own is not None and own.noise_multiplier is None and own.target_epsilon == 2.0 and own.delta == 1e-7
    assert dp_sgd_config(run, {"dp-noise-multiplier": 0.0}) is None  # this clean room opts out


def test_invalid_node_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="dp-noise-multiplier must be >= 0"):
        dp_sgd_config(RunConfig(), {"dp-noise-multiplier": -1.0})


def _preflight(app, directory, *, node_config: dict, run_config: dict | None = None):
    from flwr.app import Context, RecordDict

    from pcvr.models.cvr import backbone_digest
    from pcvr.protocols.messages import Binding, PreflightIns, PreflightReply
    from support import NODE_ID, RUN_ID, deliver, make_backbone

    binding = Binding(run_id=RUN_ID, round=0, node_id=NODE_ID)
    ins = PreflightIns(binding, backbone_digest=backbone_digest(make_backbone()), batch_size=64, min_batch_size=64)
    run = {"label-set": "eps=3", "batch-size": 64, "min-batch-size": 64, "codec": "none", **(run_config or {})}
    context = Context(run_id=RUN_ID, node_id=NODE_ID, node_config=node_config, state=RecordDict(), run_config=run)
    reply = deliver(app, ins.to_record(), context, message_type="query.preflight")
    if reply.has_error():  # the clean room could not even say who it is
        return SimpleNamespace(refusal=reply.error.code, clean_room_id=None)
    return PreflightReply.from_record(reply.content, expected=binding, max_bytes=1 << 20)


def test_in_simulation_a_clean_rooms_directory_comes_from_the_launcher_by_partition_id(tmp_path) -> None:
    from pcvr.clean_room.app import make_client_app
    from pcvr.clean_room.policy import RoomPolicy
    from support import write_clean_room

    write_clean_room(tmp_path / "room1", rows=200, policy=RoomPolicy(min_batch_size=64))
    app = make_client_app(clean_room_dirs={1: tmp_path / "room1"})
    reply = _preflight(app, None, node_config={"partition-id": 1})
    assert reply.refusal == 0 and reply.clean_room_id == 1
    # Partition 0 has no directory from the launcher: it cannot serve, whatever the platform says.
    assert _preflight(app, None, node_config={"partition-id": 0}).refusal != 0


def test_the_platforms_run_config_never_names_a_clean_rooms_directory(tmp_path) -> None:
    from pcvr.clean_room.app import make_client_app
    from pcvr.clean_room.policy import RoomPolicy
    from support import write_clean_room

    write_clean_room(tmp_path / "clean_room_0", rows=200, policy=RoomPolicy(min_batch_size=64))
    with pytest.raises(ValueError, match="unknown key 'clean-room-dir'"):
        RunConfig.from_run_config({"clean-room-dir": str(tmp_path / "clean_room_0")})
    # A platform directory laid out like a simulation's gives a clean room nothing.
    reply = _preflight(make_client_app(), None, node_config={"partition-id": 0}, run_config={"platform-dir": str(tmp_path)})
    assert reply.refusal != 0
    # A deployed SuperNode's own node config names its directory, and wins over the launcher's.
    app = make_client_app(clean_room_dirs={0: tmp_path / "elsewhere"})
    assert _preflight(app, None, node_config={"clean-room-id": 0, "clean-room-dir": str(tmp_path / "clean_room_0")}).refusal == 0
