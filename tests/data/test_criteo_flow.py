"""A Criteo-format TSV through every data step: pretrain, export, hand-off, join (row numbers as click ids)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcvr.advertiser.handoff import hand_off
from pcvr.advertiser.policy import ConsentPolicy
from pcvr.clean_room.dataset import join_inputs, load_training_data
from pcvr.data.io import DataError, read_ipc
from pcvr.data.spec import DatasetSpec
from pcvr.platform.features import export_features
from pcvr.platform.pretrain import pretrain_from_spec
from pcvr.protocols.keys import pseudonymous_keys


def _criteo_lines(n: int, *, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        label = int(rng.random() < 0.25)
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(0, 1000) * (1 + label))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 30 + 10 * label)):08x}" for _ in range(26)]
        lines.append("\t".join([str(label), *ints, *cats]))
    return lines


def _spec(directory, files: list[str]) -> DatasetSpec:
    paths = "[" + ", ".join(f'"{f}"' for f in files) + "]"
    dense = "".join(f'[[features.dense]]\ncolumn = "I{i}"\ntransform = "log1p"\nmissing = "zero"\n\n' for i in range(1, 14))
    cats = "".join(f'[[features.categorical]]\ncolumn = "C{i}"\n\n' for i in range(1, 27))
    text = (
        f'[features]\npath = {paths}\nformat = "criteo-tsv"\nclick_id = "row"\ndefault_buckets = 1000\nchunk_rows = 50\n\n{cats}{dense}'
        f'[pretrain]\npath = {paths}\nformat = "criteo-tsv"\nlabel = "label"\npositive = ["1"]\nnegative = ["0"]\n\n'
        f'[conversions]\npath = {paths}\nformat = "criteo-tsv"\nclick_id = "row"\nlabel = "label"\npositive = ["1"]\n'
        'negative = ["0"]\nconsent_level = "standard"\n'
    )
    (directory / "criteo.toml").write_text(text)
    return DatasetSpec.load(directory / "criteo.toml")


def test_criteo_tsv_flows_through_every_step(tmp_path):
    (tmp_path / "day_0.tsv").write_text("\n".join(_criteo_lines(130, seed=0)) + "\n")
    (tmp_path / "day_1.tsv").write_text("\n".join(_criteo_lines(70, seed=1)) + "\n")
    spec = _spec(tmp_path, ["day_0.tsv", "day_1.tsv"])
    encoding = pretrain_from_spec(spec, tmp_path / "backbone", epochs=1, generator=torch.Generator().manual_seed(0))
    assert len(encoding.buckets) == 26 and encoding.num_dense == 13
    secret = b"s" * 32
    assert export_features(spec, backbone_dir=tmp_path / "backbone", join_secret=secret, out_path=tmp_path / "f.arrow") == 200
    keys = read_ipc(tmp_path / "f.arrow").column("join_key").to_pylist()
    assert keys == pseudonymous_keys([str(i) for i in range(200)], secret=secret)  # rows counted over both files
    ledger = hand_off(spec, policy=ConsentPolicy.default(), join_secret=secret, rr_secret=b"r" * 32, out_dir=tmp_path / "h")
    assert ledger.records == 200 and ledger.levels["standard"]["records"] == 200
    summary = join_inputs(
        tmp_path / "f.arrow", tmp_path / "h" / "labels.arrow", train_path=tmp_path / "c" / "train.arrow",
        eval_path=tmp_path / "c" / "eval.arrow", holdout_key=b"k" * 32,
    )
    assert summary.rows + summary.eval_rows == 200 and summary.features_without_label == 0
    data = load_training_data(tmp_path / "c" / "train.arrow")
    assert data.features.categorical.shape == (summary.rows, 26) and data.features.dense.shape == (summary.rows, 13)
    assert int(data.features.categorical.max()) <= 1000  # bucket 1000 is the shared missing-value bucket
    assert (data.features.categorical == 1000).any()


def test_criteo_label_outside_the_map_names_the_line(tmp_path):
    lines = _criteo_lines(60, seed=2)
    lines[41] = "7" + lines[41][1:]
    (tmp_path / "day_0.tsv").write_text("\n".join(lines) + "\n")
    spec = _spec(tmp_path, ["day_0.tsv"])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'day_0.tsv'}: row 41: column 'label' has '7'; expected one of '1', '0'$"):
        hand_off(spec, policy=ConsentPolicy.default(), join_secret=b"s" * 32, rr_secret=b"r" * 32, out_dir=tmp_path / "h")
    assert not (tmp_path / "h").exists() or list((tmp_path / "h").iterdir()) == []
