"""The party directory layout is pinned: a changed name breaks every party that reads another's output."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcvr.protocols.layout import (
    PARTY_DIRS,
    CleanRoomDir,
    ExportDir,
    HandoffDir,
    PlatformDir,
    SimulationDir,
    claim,
    party_of,
)
from pcvr.protocols.refusals import Refusal, Refused


def _relative(root: Path, path: Path) -> str:
    return str(path.relative_to(root))


def test_every_party_directory_is_laid_out_as_documented(tmp_path):
    platform = PlatformDir(tmp_path)
    assert [_relative(tmp_path, p) for p in (platform.manifest, platform.backbone, platform.oracle_holdout, platform.oracle_spec)] == [
        "platform.json", "backbone", "oracle/holdout.parquet", "oracle/spec.toml",
    ]
    assert _relative(tmp_path, platform.run_dir("eps=3,forward")) == "runs/eps=3,forward"
    export = ExportDir(tmp_path)
    assert [_relative(tmp_path, p) for p in (export.manifest, export.features, export.backbone)] == [
        "export.json", "features.arrow", "backbone",
    ]
    handoff = HandoffDir(tmp_path)
    assert [_relative(tmp_path, p) for p in (handoff.manifest, handoff.labels, handoff.ledger)] == [
        "handoff.json", "labels.arrow", "ledger.json",
    ]
    room = CleanRoomDir(tmp_path)
    assert [_relative(tmp_path, p) for p in (room.manifest, room.policy, room.backbone, room.holdout_key, room.releases, room.accountant)] == [
        "clean_room.json", "policy.toml", "backbone", "secrets/holdout.key", "releases.json", "dp_accountant.json",
    ]
    label_set = room.label_set("eps=3")
    assert [_relative(tmp_path.resolve(), p) for p in (label_set.train, label_set.eval, label_set.ledger, label_set.batches(7))] == [
        "eps=3/train.arrow", "eps=3/eval.arrow", "eps=3/ledger.json", "eps=3/batches/run-7",
    ]


def test_the_simulation_composes_the_party_directories(tmp_path):
    work = SimulationDir(tmp_path)
    assert _relative(tmp_path, work.platform.root) == "platform"
    assert _relative(tmp_path, work.export(2).root) == "exports/advertiser_2"
    assert _relative(tmp_path, work.handoff(2, "eps=3").root) == "handoffs/advertiser_2/eps=3"
    assert _relative(tmp_path, work.clean_room(2).root) == "clean_room_2"
    assert [_relative(tmp_path, p) for p in (work.secrets(1).join, work.secrets(1).rr)] == [
        "secrets/advertiser_1/join.key", "secrets/advertiser_1/rr.key",
    ]
    assert [_relative(tmp_path, p) for p in (work.world, work.summary, work.certs)] == ["world", "summary.json", "certs"]
    with pytest.raises(ValueError, match="not a plain name"):
        work.handoff(0, "../platform")


def test_manifests_are_distinct_so_each_directory_has_one_owner(tmp_path):
    assert len({kind.MANIFEST for kind in PARTY_DIRS}) == len(PARTY_DIRS)
    for kind in PARTY_DIRS:
        directory = tmp_path / kind.__name__
        directory.mkdir()
        assert party_of(directory) is None
        (directory / kind.MANIFEST).write_text("{}")
        assert party_of(directory) is kind


def test_a_name_that_climbs_out_of_the_clean_room_is_refused(tmp_path):
    room = CleanRoomDir(tmp_path / "room")
    (tmp_path / "room").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "room" / "link").symlink_to(tmp_path / "elsewhere")
    for name in ("../x", "/etc", "a/b", "link"):
        with pytest.raises(Refused) as caught:
            room.label_set(name)
        assert caught.value.refusal is Refusal.BAD_NAME
    with pytest.raises(ValueError, match="not a plain name"):
        PlatformDir(tmp_path).run_dir("../../etc")


def test_claim_refuses_another_partys_directory_and_foreign_folders(tmp_path):
    claim(tmp_path / "new", ExportDir)  # missing: fine
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty", ExportDir)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / ExportDir.MANIFEST).write_text("{}")
    claim(tmp_path / "mine", ExportDir)  # its own: may be rewritten
    (tmp_path / "handoff").mkdir()
    (tmp_path / "handoff" / HandoffDir.MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match=r"holds an advertiser hand-off \(handoff.json\), not a platform export"):
        claim(tmp_path / "handoff", ExportDir)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a clean-room directory"):
        claim(tmp_path / "foreign", CleanRoomDir)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        claim(tmp_path / "file", PlatformDir, flag="--platform-dir")
