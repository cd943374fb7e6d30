"""Names from another party are plain names; paths built from them stay inside their root."""

from __future__ import annotations

import pytest

from pcvr.protocols.names import check_name, resolve_inside


@pytest.mark.parametrize("name", ["eps=3", "non_private", "audit-eps=0.5,b=1024,topk:0.01+q8", "a"])
def test_plain_names_pass(name) -> None:
    assert check_name(name, what="label set") == name


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", "/etc", "a\\b", ".hidden", "eps..3", "x" * 65, "a b", 3, None])
def test_anything_else_is_refused(name) -> None:
    with pytest.raises(ValueError, match="is not a plain name"):
        check_name(name, what="label set")


def test_a_symlink_out_of_the_root_is_refused(tmp_path) -> None:
    root, outside = tmp_path / "room", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "inside").mkdir()
    (root / "link").symlink_to(outside)
    (root / "inside" / "train.parquet").symlink_to(outside / "train.parquet")
    assert resolve_inside(root, "inside", what="label set") == (root / "inside").resolve()
    with pytest.raises(ValueError, match="leads outside"):
        resolve_inside(root, "link", what="label set")
    with pytest.raises(ValueError, match="leads outside"):
        resolve_inside(root, "inside", "train.parquet", what="label set")
