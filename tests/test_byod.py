"""Bring your own data: the README's two worked examples, end to end through ``pcvr``'s main().

1. a CSV feature log whose categorical columns are strings, and a conversions CSV with
   the advertiser's own column names (a yes/no label, a consent column in its own words);
2. Criteo-format TSV (no header: label, I1..I13, C1..C26), two advertisers.

Each runs the six commands on small generated files (a few seconds of data, 20 rounds)
and checks that the private evaluation is printed and sane, and that each command wrote
only its own directory. Bad invocations fail with one line and write nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pcvr.cli import main
from pcvr.protocols.layout import CleanRoomDir, ExportDir, HandoffDir, PlatformDir

TRAINING = ["--rounds", "20", "--batch-size", "2048", "--min-batch-size", "1024"]
POLICY = '[levels]\nstandard = 3.0\nlimited = 1.0\nopt_out = "exclude"\n'


def _logit(rng: np.random.Generator, rows: int, *, users: int, ads: int) -> tuple[np.ndarray, ...]:
    """Users, ads, devices, prices and the true conversion logit of ``rows`` clicks (a fixed world per seed)."""
    world = np.random.default_rng(0)
    user_effect, ad_effect = world.normal(0, 1.0, users), world.normal(0, 1.0, ads)
    device_effect = np.array([0.4, -0.2, -0.6])
    user, ad, device = rng.integers(0, users, rows), rng.integers(0, ads, rows), rng.integers(0, 3, rows)
    price = rng.lognormal(3.0, 1.0, rows)
    logit = -2.3 + user_effect[user] + ad_effect[ad] + device_effect[device] - 0.3 * (np.log1p(price) - 3.0)
    return user, ad, device, price, logit


def _write_csv(path: Path, header: list[str], columns: list[list[str]]) -> None:
    path.write_text(",".join(header) + "\n" + "".join(",".join(row) + "\n" for row in zip(*columns)))


def write_csv_example(root: Path, *, rows: int = 24_000, seed: int = 1) -> tuple[Path, Path]:
    """The platform's files (clicks.csv, pretrain.csv, platform.toml) and the advertiser's (conversions.csv, advertiser.toml)."""
    rng = np.random.default_rng(seed)
    platform, advertiser = root / "platform-data", root / "advertiser-data"
    platform.mkdir(parents=True)
    advertiser.mkdir(parents=True)
    devices = np.array(["ios", "android", "web"])
    for name, count, prefix in (("pretrain.csv", rows, "p"), ("clicks.csv", rows, "c")):
        user, ad, device, price, logit = _logit(rng, count, users=500, ads=80)
        columns = [
            [f"{prefix}{i:07d}" for i in range(count)],
            [f"user-{u:04d}" for u in user],
            [f"ad_{a:03d}" for a in ad],
            list(devices[device]),
            [f"{p:.2f}" for p in price],
        ]
        converted = rng.random(count) < 1 / (1 + np.exp(-logit))
        if name == "pretrain.csv":
            _write_csv(platform / name, ["click_id", "user", "ad", "device", "price", "converted"], [*columns, [str(int(c)) for c in converted]])
        else:
            _write_csv(platform / name, ["click_id", "user", "ad", "device", "price"], columns)
            consent = rng.choice(np.array(["full", "partial", "withdrawn"]), count, p=[0.8, 0.15, 0.05])
            order = rng.permutation(count)  # the advertiser's own order, and its own column names
            _write_csv(
                advertiser / "conversions.csv",
                ["click", "purchased", "consent_given"],
                [[columns[0][i] for i in order], ["yes" if converted[i] else "no" for i in order], list(consent[order])],
            )
    (platform / "platform.toml").write_text(
        '[features]\npath = "clicks.csv"\nformat = "csv"\nclick_id = "click_id"\ndefault_buckets = 1000\n\n'
        '[[features.categorical]]\ncolumn = "user"\nbuckets = 2000\n\n'
        '[[features.categorical]]\ncolumn = "ad"\n\n'
        '[[features.categorical]]\ncolumn = "device"\nbuckets = 8\n\n'
        '[[features.dense]]\ncolumn = "price"\ntransform = "log1p"\n\n'
        '[pretrain]\npath = "pretrain.csv"\nformat = "csv"\nlabel = "converted"\npositive = ["1"]\nnegative = ["0"]\n'
    )
    (advertiser / "advertiser.toml").write_text(
        '[conversions]\npath = "conversions.csv"\nformat = "csv"\nclick_id = "click"\nlabel = "purchased"\n'
        'positive = ["yes"]\nnegative = ["no"]\nconsent = "consent_given"\n'
        'consent_levels = { full = "standard", partial = "limited", withdrawn = "opt_out" }\n'
    )
    return platform / "platform.toml", advertiser / "advertiser.toml"


def write_criteo_example(root: Path, *, rows: int = 16_000, parts: int = 2, seed: int = 2) -> tuple[Path, list[Path]]:
    """Criteo-format TSVs: the platform's pretrain file, and one click log per advertiser (whose label column is its conversions)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    files = []
    for name in ["pretrain.tsv", *(f"advertiser_{k}.tsv" for k in range(parts))]:
        user, ad, device, price, logit = _logit(rng, rows, users=400, ads=60)
        label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
        noise = rng.integers(0, 50, (rows, 11))  # integer columns that carry no signal; every 7th value missing
        lines = []
        for i in range(rows):
            integers = [str(int(price[i])), str(device[i])] + ["" if (i + j) % 7 == 0 else str(noise[i, j]) for j in range(11)]
            categoricals = [f"{(user[i] * 2654435761) % 2**32:08x}", f"{(ad[i] * 40503) % 2**32:08x}", f"{device[i]:08x}"]
            categoricals += ["" if i % 3 else "68fd1e64"] + [""] * 22
            lines.append("\t".join([str(label[i]), *integers, *categoricals]))
        (root / name).write_text("\n".join(lines) + "\n")
        files.append(root / name)
    dense = "".join(f'[[features.dense]]\ncolumn = "I{i}"\ntransform = "log1p"\nmissing = "zero"\n\n' for i in range(1, 14))
    categorical = "".join(f'[[features.categorical]]\ncolumn = "C{i}"\n\n' for i in range(1, 27))
    features = f'[features]\nformat = "criteo-tsv"\nclick_id = "row"\ndefault_buckets = 1000\n\n{categorical}{dense}'
    (root / "platform.toml").write_text(
        features.replace("[features]\n", '[features]\npath = "pretrain.tsv"\n', 1)
        + '[pretrain]\npath = "pretrain.tsv"\nformat = "criteo-tsv"\nlabel = "label"\npositive = ["1"]\nnegative = ["0"]\n'
    )
    specs = []
    for k in range(parts):
        (root / f"export_{k}.toml").write_text(features.replace("[features]\n", f'[features]\npath = "advertiser_{k}.tsv"\n', 1))
        (root / f"conversions_{k}.toml").write_text(
            f'[conversions]\npath = "advertiser_{k}.tsv"\nformat = "criteo-tsv"\nclick_id = "row"\nlabel = "label"\n'
            'positive = ["1"]\nnegative = ["0"]\nconsent_level = "standard"\n'
        )
        specs.append(root / f"export_{k}.toml")
    return root / "platform.toml", specs


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _run(capsys, root: Path, out: Path | tuple[Path, ...], *argv: str) -> str:
    """Run one command; it must succeed and change files only under ``out`` (its party's directories)."""
    before = _snapshot(root)
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    after = _snapshot(root)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    prefixes = tuple(str(p.relative_to(root)) + "/" for p in (out if isinstance(out, tuple) else (out,)))
    assert changed and all(name.startswith(prefixes) for name in changed), changed
    return captured.out


def _private_figures(out: str) -> dict[str, tuple[float, float]]:
    figures = {}
    for name in ("AUC", "NE", "calibration"):
        match = re.search(rf"^\s+{name}\s+([-\d.]+)\s+([-\d.]+)$", out, flags=re.MULTILINE)
        assert match, out
        figures[name] = (float(match[1]), float(match[2]))
    assert re.search(r"rows: [\d,]+ held-out rows in \d+ clean rooms?$", out, flags=re.MULTILINE), out
    return figures


def _assert_sane(figures: dict[str, tuple[float, float]]) -> None:
    auc, ne, calibration = figures["AUC"], figures["NE"], figures["calibration"]
    assert all(se > 0 for _, se in figures.values()), figures
    assert auc[0] - 3 * auc[1] > 0.55  # the model ranks far better than chance, beyond its noise
    assert ne[0] < 1.0 + 3 * ne[1]
    assert abs(calibration[0] - 1.0) < max(0.25, 4 * calibration[1])  # the forward correction holds it near 1


def test_a_csv_feature_log_and_an_advertisers_own_conversions_file(tmp_path, capsys):
    platform_spec, advertiser_spec = write_csv_example(tmp_path)
    keys = tmp_path / "keys"
    _run(capsys, tmp_path, keys, "keys", "new", "--out", str(keys / "join.key"))
    _run(capsys, tmp_path, keys, "keys", "new", "--out", str(keys / "rr.key"))
    (tmp_path / "policy.toml").write_text(POLICY)
    platform, export, handoff, room = (tmp_path / name for name in ("platform", "export", "handoff", "clean-room"))
    _run(capsys, tmp_path, platform, "platform", "pretrain", "--spec", str(platform_spec), "--out", str(platform))
    _run(
        capsys, tmp_path, export, "platform", "export", "--spec", str(platform_spec), "--platform-dir", str(platform),
        "--join-secret", str(keys / "join.key"), "--out", str(export),
    )
    _run(
        capsys, tmp_path, handoff, "advertiser", "hand-off", "--spec", str(advertiser_spec), "--policy", str(tmp_path / "policy.toml"),
        "--join-secret", str(keys / "join.key"), "--rr-secret", str(keys / "rr.key"), "--out", str(handoff),
    )
    assert HandoffDir(handoff).labels.exists() and "eps=3" in HandoffDir(handoff).manifest.read_text()
    _run(capsys, tmp_path, room, "clean-room", "join", "--export", str(export), "--handoff", str(handoff), "--out", str(room))
    assert CleanRoomDir(room).label_sets() == ["eps=3"] and CleanRoomDir(room).holdout_key.stat().st_mode & 0o077 == 0
    # Training writes the platform's run and each clean room's own release record, nothing else.
    out = _run(capsys, tmp_path, (platform / "runs", room), "train", "--platform-dir", str(platform), "--clean-rooms", str(room), *TRAINING)
    _assert_sane(_private_figures(out))
    assert not PlatformDir(platform).oracle.exists()  # a real platform has no true labels: none were used
    # A run the clean room cannot serve (a batch larger than its rows) is a failed run: exit 1, the room named.
    code = main(["train", "--platform-dir", str(platform), "--clean-rooms", str(room), "--run-name", "too-big",
                 "--rounds", "2", "--batch-size", "60000", "--min-batch-size", "60000"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pcvr:")]
    assert code == 1 and len(lines) == 1 and "clean room 0" in lines[0] and "too_few_rows" in lines[0], lines


def test_criteo_format_tsv_with_two_advertisers(tmp_path, capsys, monkeypatch):
    platform_spec, export_specs = write_criteo_example(tmp_path / "data")
    platform = tmp_path / "platform"
    _run(capsys, tmp_path, platform, "platform", "pretrain", "--spec", str(platform_spec), "--out", str(platform))
    (tmp_path / "policy.toml").write_text(POLICY)
    rooms = []
    for k, spec in enumerate(export_specs):
        key = tmp_path / f"keys_{k}"
        for name in ("join", "rr"):
            _run(capsys, tmp_path, key, "keys", "new", "--out", str(key / f"{name}.key"))
        export, handoff, room = (tmp_path / f"{name}_{k}" for name in ("export", "handoff", "room"))
        _run(
            capsys, tmp_path, export, "platform", "export", "--spec", str(spec), "--platform-dir", str(platform),
            "--join-secret", str(key / "join.key"), "--out", str(export),
        )
        _run(
            capsys, tmp_path, handoff, "advertiser", "hand-off", "--spec", str(spec.with_name(f"conversions_{k}.toml")),
            "--policy", str(tmp_path / "policy.toml"), "--join-secret", str(key / "join.key"), "--rr-secret", str(key / "rr.key"),
            "--out", str(handoff),
        )
        _run(capsys, tmp_path, room, "clean-room", "join", "--export", str(export), "--handoff", str(handoff), "--out", str(room))
        rooms.append(str(room))
    # Paths as README's example types them: relative to where the command runs, not to where Flower's processes run.
    monkeypatch.chdir(tmp_path)
    relative = [str(Path(room).relative_to(tmp_path)) for room in rooms]
    out = _run(capsys, tmp_path, (platform / "runs", *map(Path, rooms)), "train", "--platform-dir", "platform", "--clean-rooms", *relative, *TRAINING)
    figures = _private_figures(out)
    assert "in 2 clean rooms" in out
    _assert_sane(figures)


def _fails(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pcvr:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_bad_invocations_fail_with_one_line_and_write_nothing(tmp_path, capsys):
    platform_spec, advertiser_spec = write_csv_example(tmp_path, rows=3000)
    before = _snapshot(tmp_path)
    line = _fails(capsys, "platform", "pretrain", "--spec", str(advertiser_spec), "--out", str(tmp_path / "platform"))
    assert str(advertiser_spec) in line and "[features]" in line
    assert _snapshot(tmp_path) == before and not (tmp_path / "platform").exists()
    line = _fails(capsys, "keys", "new", "--out", str(platform_spec))
    assert "never overwrites" in line and _snapshot(tmp_path) == before
    line = _fails(capsys, "train", "--platform-dir", str(tmp_path / "nowhere"), "--clean-rooms", str(tmp_path), "--label-set", "eps=3")
    assert "--platform-dir" in line and "not a platform directory" in line
    line = _fails(capsys, "train", "--platform-dir", str(tmp_path / "nowhere"), "--clean-rooms", str(tmp_path / "advertiser-data"))
    assert line.endswith("advertiser-data: not a clean-room directory (no clean_room.json)")
    assert _snapshot(tmp_path) == before


def test_a_spec_that_does_not_match_the_backbone_is_refused(tmp_path, capsys):
    platform_spec, _ = write_csv_example(tmp_path, rows=3000)
    platform = tmp_path / "platform"
    assert main(["platform", "pretrain", "--spec", str(platform_spec), "--out", str(platform)]) == 0
    (tmp_path / "join.key").write_bytes(bytes(range(32)))
    other = platform_spec.with_name("other.toml")
    other.write_text(platform_spec.read_text().replace("buckets = 2000", "buckets = 3000"))
    capsys.readouterr()
    line = _fails(
        capsys, "platform", "export", "--spec", str(other), "--platform-dir", str(platform),
        "--join-secret", str(tmp_path / "join.key"), "--out", str(tmp_path / "export"),
    )
    assert str(other) in line and "differs from the backbone's encoding" in line
    assert not (tmp_path / "export").exists()
    line = _fails(
        capsys, "platform", "export", "--spec", str(platform_spec), "--platform-dir", str(platform),
        "--join-secret", str(tmp_path / "join.key"), "--out", str(platform),
    )
    assert "holds a platform directory" in line
