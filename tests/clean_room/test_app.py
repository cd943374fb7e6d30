"""Tests of the ClientApp's plain helpers: a clean room's own DP-SGD settings."""

from __future__ import annotations

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
