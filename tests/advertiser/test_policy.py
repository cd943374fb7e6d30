"""Consent policy: ε per consent level, or exclusion (pcvr.advertiser.policy)."""

from __future__ import annotations

import math

import pytest

from pcvr.advertiser.policy import EXCLUDE, ConsentPolicy
from pcvr.data.schema import ConsentLevel

STANDARD, LIMITED, OPT_OUT = ConsentLevel.STANDARD, ConsentLevel.LIMITED, ConsentLevel.OPT_OUT


def test_default_policy():
    policy = ConsentPolicy.default()
    assert policy.epsilon_for(STANDARD) == 3.0
    assert policy.epsilon_for(LIMITED) == 1.0
    assert policy.epsilon_for(OPT_OUT) is None
    assert policy.to_dict() == {"standard": 3.0, "limited": 1.0, "opt_out": EXCLUDE}


def test_from_mapping_round_trips_through_to_dict():
    policy = ConsentPolicy.from_mapping({"standard": "inf", "limited": 2, "opt_out": "exclude"})
    assert policy.epsilon_for(STANDARD) == math.inf
    assert policy.epsilon_for(LIMITED) == 2.0
    assert policy.to_dict() == {"standard": "inf", "limited": 2.0, "opt_out": "exclude"}
    assert ConsentPolicy.from_mapping(policy.to_dict()) == policy


def test_other_levels_may_be_excluded():
    policy = ConsentPolicy.from_mapping({"standard": 3.0, "limited": "exclude", "opt_out": "exclude"})
    assert policy.epsilon_for(LIMITED) is None


@pytest.mark.parametrize("opt_out", [2.0, 1, 0.5, "inf", math.inf])
def test_opt_out_mapped_to_an_epsilon_is_rejected(opt_out):
    with pytest.raises(ValueError, match="opt_out"):
        ConsentPolicy.from_mapping({"standard": 3.0, "limited": 1.0, "opt_out": opt_out})


def test_opt_out_epsilon_rejected_by_constructor_too():
    with pytest.raises(ValueError, match="opt_out"):
        ConsentPolicy(((STANDARD, 3.0), (LIMITED, 1.0), (OPT_OUT, 8.0)))


def test_missing_level_is_named():
    with pytest.raises(ValueError, match="limited"):
        ConsentPolicy.from_mapping({"standard": 3.0, "opt_out": "exclude"})


def test_unknown_level_is_named_with_source():
    with pytest.raises(ValueError) as excinfo:
        ConsentPolicy.from_mapping(
            {"standard": 3.0, "limited": 1.0, "opt_out": "exclude", "gold": 9.0}, source="policy.toml"
        )
    assert "policy.toml" in str(excinfo.value) and "'gold'" in str(excinfo.value)


@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.nan, -math.inf, "three", "3", True, None, [3.0]])
def test_bad_epsilon_values_are_rejected_naming_the_level(value):
    with pytest.raises(ValueError, match="limited"):
        ConsentPolicy.from_mapping({"standard": 3.0, "limited": value, "opt_out": "exclude"})


def test_from_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('[levels]\nstandard = 4.0\nlimited = 0.5\nopt_out = "exclude"\n')
    policy = ConsentPolicy.from_file(path)
    assert policy.to_dict() == {"standard": 4.0, "limited": 0.5, "opt_out": "exclude"}


@pytest.mark.parametrize(
    "text",
    [
        "[levels\nstandard = 3.0\n",  # not TOML
        'standard = 3.0\nlimited = 1.0\nopt_out = "exclude"\n',  # no [levels] table
        '[levels]\nstandard = 3.0\nlimited = 1.0\nopt_out = 3.0\n',  # opt_out with ε
        '[levels]\nstandard = 3.0\nlimited = -1.0\nopt_out = "exclude"\n',
    ],
)
def test_bad_policy_files_name_the_path(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as excinfo:
        ConsentPolicy.from_file(path)
    assert str(path) in str(excinfo.value)


def test_missing_policy_file_names_the_path(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ValueError) as excinfo:
        ConsentPolicy.from_file(path)
    assert str(path) in str(excinfo.value)


def test_capped_sets_standard_and_caps_the_rest():
    policy = ConsentPolicy.default()
    at_two = policy.capped(epsilon=2.0)
    assert at_two.to_dict() == {"standard": 2.0, "limited": 1.0, "opt_out": "exclude"}
    at_half = policy.capped(epsilon=0.5)
    assert at_half.to_dict() == {"standard": 0.5, "limited": 0.5, "opt_out": "exclude"}
    at_eight = policy.capped(epsilon=8.0)
    assert at_eight.to_dict() == {"standard": 8.0, "limited": 1.0, "opt_out": "exclude"}
    assert policy == ConsentPolicy.default()  # not mutated


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.nan])
def test_capped_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        ConsentPolicy.default().capped(epsilon=epsilon)
