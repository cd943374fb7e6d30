"""Run-wide settings parsed from Flower's run config (pcvr.protocols.run_config)."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import pytest

from pcvr.protocols.codecs import Codec
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.run_config import RunConfig

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_round_trip_defaults():
    config = RunConfig()
    assert RunConfig.from_run_config(config.to_run_config()) == config


def test_round_trip_every_field_changed():
    config = RunConfig(
        platform_dir=Path("/data/platform"),
        label_set="eps=1",
        run_dir=Path("out/run-7"),
        num_rounds=3,
        clean_rooms=2,
        batch_size=512,
        min_batch_size=256,
        correction=Correction.BACKWARD,
        learning_rate=0.5,
        eval_every=1,
        seed=42,
        codec=Codec.parse("topk:0.05+q4"),
        downstream_codec=Codec.parse("none"),
        max_message_bytes=4096,
        record_payloads=True,
        dp_noise_multiplier=1.1,
        dp_target_epsilon=0.0,
        dp_clip_norm=0.5,
        dp_delta=1e-5,
        min_participation=0.5,
        max_room_grad_norm=2.0,
        resume_run=7,
        clean_room_nodes="0:11,1:12",
    )
    unchanged = {"dp_target_epsilon", "local_steps"}  # each excludes a field set here (dp-noise-multiplier, max-room-grad-norm)
    assert all(getattr(config, f.name) != f.default for f in dataclasses.fields(RunConfig) if f.name not in unchanged)
    many_steps = dataclasses.replace(config, max_room_grad_norm=0.0, local_steps=8)
    assert RunConfig.from_run_config(many_steps.to_run_config()) == many_steps
    flat = config.to_run_config()
    assert set(flat) == {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    assert all(isinstance(v, (str, int, float)) for v in flat.values())
    assert flat["correction"] == "backward" and flat["platform-dir"] == "/data/platform"
    assert flat["codec"] == "topk:0.05+q4" and flat["record-payloads"] is True
    assert RunConfig.from_run_config(flat) == config
    # what `flwr run --run-config` hands over for strings and booleans
    assert RunConfig.from_run_config({**flat, "record-payloads": "false"}).record_payloads is False


@pytest.mark.parametrize(
    "values, message",
    [
        ({"codec": "zip"}, "run config: codec: codec must be"),
        ({"record-payloads": "yes"}, "expected true or false"),
        ({"dp-noise-multiplier": 1.0, "dp-target-epsilon": 2.0}, "not both"),
        ({"dp-noise-multiplier": -1.0}, "dp-noise-multiplier must be >= 0"),
        ({"dp-delta": 1.0}, "dp-delta must be in"),
        ({"dp-clip-norm": 0.0}, "dp-clip-norm must be > 0"),
        ({"max-message-bytes": 0}, "max-message-bytes must be >= 1"),
        ({"local-steps": 0}, "local-steps must be >= 1"),
        ({"resume-run": -1}, "resume-run must be a run id >= 0"),
        ({"local-steps": 1001}, "local-steps must be <= 1000"),
        ({"local-steps": 4, "max-room-grad-norm": 1.0}, "applies only with local-steps = 1"),
    ],
)
def test_wire_and_dp_settings_are_validated(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig.from_run_config(values)


def test_partial_config_keeps_defaults():
    config = RunConfig.from_run_config({"num-rounds": 4, "correction": "none"})
    assert config == dataclasses.replace(RunConfig(), num_rounds=4, correction=Correction.NONE)


def test_string_values_are_converted():
    config = RunConfig.from_run_config({"num-rounds": "7", "learning-rate": "0.1", "platform-dir": "d"})
    assert config.num_rounds == 7 and config.learning_rate == 0.1 and config.platform_dir == Path("d")


def test_pyproject_app_config_matches_dataclass_defaults():
    document = tomllib.loads(PYPROJECT.read_text())
    app_config = document["tool"]["flwr"]["app"]["config"]
    parsed = RunConfig.from_run_config(app_config)
    assert parsed == RunConfig()


def test_unknown_key_is_named():
    with pytest.raises(ValueError) as excinfo:
        RunConfig.from_run_config({"num-round": 3})
    message = str(excinfo.value)
    assert "'num-round'" in message
    assert "num-rounds" in message  # the known keys are listed


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-rounds", 0),
        ("num-rounds", "many"),
        ("num-rounds", 2.5),
        ("num-rounds", True),
        ("clean-rooms", -1),
        ("batch-size", 0),
        ("min-batch-size", 0),
        ("batch-size", 512),  # below the default min-batch-size 1024
        ("eval-every", 0),
        ("learning-rate", 0.0),
        ("learning-rate", -0.1),
        ("learning-rate", math.nan),
        ("learning-rate", math.inf),
        ("learning-rate", "fast"),
        ("correction", "Forward"),
        ("correction", "debias"),
        ("seed", "x"),
    ],
)
def test_bad_values_raise_naming_the_key(key, value):
    with pytest.raises(ValueError) as excinfo:
        RunConfig.from_run_config({key: value})
    assert key in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="min-batch-size"):
        RunConfig(batch_size=100, min_batch_size=200)


def test_from_run_config_does_not_mutate_input():
    values = {"num-rounds": "5", "correction": "backward"}
    snapshot = dict(values)
    RunConfig.from_run_config(values)
    assert values == snapshot


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().num_rounds = 3  # type: ignore[misc]


def test_anchored_makes_every_path_absolute_against_the_working_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = RunConfig(platform_dir=Path("runs/demo/platform"), run_dir=Path("/elsewhere/run"), num_rounds=7)
    anchored = config.anchored()
    assert anchored.platform_dir == tmp_path / "runs/demo/platform" and anchored.run_dir == Path("/elsewhere/run")
    assert dataclasses.replace(anchored, platform_dir=config.platform_dir) == config  # nothing else changed


def test_a_run_id_above_the_signed_range_crosses_flowers_run_config() -> None:
    """Half of Flower's run ids exceed 2**63 - 1; Flower's user config holds signed 64-bit integers."""
    from flwr.common.serde import user_config_from_proto, user_config_to_proto

    run_id = 18267941206355143629  # a real one, which a resumed ClientApp could not be started with
    config = RunConfig(resume_run=run_id)
    crossed = user_config_from_proto(user_config_to_proto(config.to_run_config()))
    assert RunConfig.from_run_config(crossed).resume_run == run_id
    assert RunConfig.from_run_config(config.to_run_config()) == config
    with pytest.raises(ValueError, match="out of range"):  # the control: the bare integer does not cross
        user_config_to_proto({"resume-run": run_id})
