"""Prepared state keyed by its inputs: reused while they are unchanged, rebuilt or refused otherwise."""

from __future__ import annotations


import pytest

from pcvr.data.io import DataError
from pcvr.data.prepared import OnChange, prepare_artifact, record_path, require_secret


def builder(path, calls):
    def build():
        calls.append(1)
        path.write_text(f"built {len(calls)}")

    return build


def test_an_artifact_is_rebuilt_exactly_when_an_input_changes(tmp_path) -> None:
    source, artifact, calls = tmp_path / "source.csv", tmp_path / "artifact", []
    source.write_text("a,b\n1,2\n")
    inputs = {"source": source, "epsilon": 3.0, "secret": b"k" * 32}
    assert prepare_artifact(artifact, inputs, builder(artifact, calls)) is True
    assert prepare_artifact(artifact, inputs, builder(artifact, calls)) is False and len(calls) == 1
    assert prepare_artifact(artifact, {**inputs, "epsilon": 1.0}, builder(artifact, calls)) is True
    source.write_text("a,b\n1,3\n")
    assert prepare_artifact(artifact, {**inputs, "epsilon": 1.0}, builder(artifact, calls)) is True
    assert len(calls) == 3
    assert b"k" * 32 not in record_path(artifact).read_bytes()  # a secret is recorded as a digest only


def test_an_artifact_without_a_record_is_not_trusted(tmp_path) -> None:
    artifact, calls = tmp_path / "artifact", []
    artifact.write_text("from an older version, or half-written")
    assert prepare_artifact(artifact, {"x": 1}, builder(artifact, calls)) is True and artifact.read_text() == "built 1"


def test_a_refused_change_is_one_line_naming_the_artifact_and_the_input(tmp_path) -> None:
    artifact, calls = tmp_path / "artifact", []
    prepare_artifact(artifact, {"policy": {"standard": 3.0}, "seed": 0}, builder(artifact, calls))
    with pytest.raises(DataError) as error:
        prepare_artifact(artifact, {"policy": {"standard": 1.0}, "seed": 0}, builder(artifact, calls), on_change=OnChange.REFUSE)
    assert str(error.value) == f"{artifact}: prepared from other inputs (policy changed); use a new --work-dir"
    assert len(calls) == 1


def test_a_failed_rebuild_leaves_no_record_that_vouches_for_it(tmp_path) -> None:
    artifact, calls = tmp_path / "artifact", []
    prepare_artifact(artifact, {"x": 1}, builder(artifact, calls))

    def failing() -> None:
        artifact.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        prepare_artifact(artifact, {"x": 2}, failing)
    assert not record_path(artifact).exists()
    assert prepare_artifact(artifact, {"x": 2}, builder(artifact, calls)) is True


def test_a_missing_secret_beside_data_made_with_it_is_an_error(tmp_path) -> None:
    secret, data = tmp_path / "rr.key", tmp_path / "labels.parquet"
    require_secret(secret, made_with_it=[data])  # nothing made with it yet: it may be created
    data.write_bytes(b"labels")
    with pytest.raises(DataError, match="rr.key: secret is missing, but .*labels.parquet was made with it"):
        require_secret(secret, made_with_it=[data])
    secret.write_bytes(b"s" * 32)
    require_secret(secret, made_with_it=[data])
