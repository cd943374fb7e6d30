"""The clean room enforces its own policy against a platform that asks for more than it allows.

Each test drives the real ClientApp with instructions and run configs a lying
platform would send, and checks the fixed refusal code it answers with; each has a
control in which the same clean room serves an honest request, so the refusal is
the policy's doing.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from pcvr.clean_room.app import make_client_app
from pcvr.clean_room.dp_sgd import epsilon_of
from pcvr.clean_room.policy import DPRequirement, RoomPolicy
from pcvr.data.io import DataError
from pcvr.protocols.codecs import Codec
from pcvr.protocols.messages import LedgerIns, LedgerReply, Binding, TrainReply
from pcvr.protocols.refusals import Refusal
from support import NODE_ID, RUN_ID, deliver, room_context, train_instruction, write_clean_room

ROWS = 200


def serve(tmp_path, policy: RoomPolicy | None, *, rounds=1, run_config=None, node_config=None, instruction=None, context=None):
    """Serve ``rounds`` instructions; returns the last reply and the context (its state carries over)."""
    if context is None:
        write_clean_room(tmp_path, rows=ROWS, policy=policy)
        context = room_context(tmp_path, run_config=run_config, node_config=node_config)
    app = make_client_app()
    reply = None
    for round_ in range(1, rounds + 1):
        content = instruction(round_) if instruction else train_instruction(round_=round_)
        reply = deliver(app, content, context)
    return reply, context


def refusal(reply) -> Refusal | None:
    if not reply.has_error():
        return None
    assert reply.error.reason == Refusal(reply.error.code).reason  # the fixed text, nothing else
    return Refusal(reply.error.code)


def ledger_of(tmp_path, context) -> dict:
    content = LedgerIns(Binding(run_id=RUN_ID, round=99, node_id=NODE_ID)).to_record()
    reply = deliver(make_client_app(), content, context, message_type="query")
    assert not reply.has_error(), reply.error
    return LedgerReply.from_record(reply.content, expected=Binding(run_id=RUN_ID, round=99, node_id=NODE_ID), max_bytes=1 << 20).ledger


def test_policy_reads_back_what_it_writes() -> None:
    policy = RoomPolicy(
        min_batch_size=512, codecs=(Codec.parse("q8"),), label_sets=("eps=3",), max_releases_per_run=5,
        max_releases_total=9, dp_sgd=DPRequirement.BUDGET, max_total_epsilon=4.0,
    )
    import tomllib

    assert RoomPolicy.from_mapping(tomllib.loads(policy.to_toml())) == policy


@pytest.mark.parametrize(
    "text, message",
    [
        ("min_batch_size = 0\n", "min_batch_size must be an integer >= 1"),
        ("min_batch_sise = 10\n", "unknown key"),
        ("[dp_sgd]\nrequire = \"always\"\n", "dp_sgd.require must be one of"),
        ("label_sets = [\"../x\"]\n", "not a plain name"),
        ("min_batch_size = [\n", "not a valid clean-room policy"),
    ],
)
def test_a_bad_policy_file_is_one_line_naming_it(tmp_path, text, message) -> None:
    (tmp_path / "policy.toml").write_text(text)
    with pytest.raises(DataError, match=message) as error:
        RoomPolicy.load(tmp_path)
    assert str(tmp_path / "policy.toml") in str(error.value) and "\n" not in str(error.value)


def test_the_floor_holds_whatever_the_platform_asks(tmp_path) -> None:
    """batch_size=1, min_batch_size=1 in the instruction: refused; the ledger reports the floor enforced."""
    lying = lambda round_: train_instruction(round_=round_, batch_size=1, min_batch_size=1)  # noqa: E731
    reply, context = serve(tmp_path, RoomPolicy(min_batch_size=64), instruction=lying)
    assert refusal(reply) is Refusal.BATCH_BELOW_FLOOR
    reply, context = serve(tmp_path, None, context=context, instruction=lambda r: train_instruction(round_=2))
    assert refusal(reply) is None and TrainReply.from_record(
        reply.content, expected=Binding(RUN_ID, 2, NODE_ID), codec=Codec.parse("none"), num_adapter_params=len_adapters(),
        min_batch_size=64, max_bytes=1 << 20,
    ).num_examples == 64
    ledger = ledger_of(tmp_path, context)
    assert ledger["min_batch_size"] == 64 and ledger["policy"]["min_batch_size"] == 64
    assert ledger["releases"] == {"in_run": 1, "total": 1, "min_examples": 64}


def test_a_low_floor_in_the_instruction_does_not_lower_the_policy_floor(tmp_path) -> None:
    """A batch that passes the instruction's floor but not the policy's is never computed."""
    lying = lambda round_: train_instruction(round_=round_, batch_size=32, min_batch_size=1)  # noqa: E731
    reply, _ = serve(tmp_path, RoomPolicy(min_batch_size=64), instruction=lying)
    assert refusal(reply) is Refusal.BATCH_BELOW_FLOOR
    control, _ = serve(tmp_path / "control", RoomPolicy(min_batch_size=32), instruction=lying)
    assert refusal(control) is None


def test_a_clean_room_with_fewer_rows_than_its_floor_refuses(tmp_path) -> None:
    reply, _ = serve(tmp_path, RoomPolicy(min_batch_size=ROWS + 1), run_config={"batch-size": 4096},
                     instruction=lambda r: train_instruction(round_=r, batch_size=4096, min_batch_size=64))
    assert refusal(reply) is Refusal.TOO_FEW_ROWS


def test_only_allowed_codecs_leave(tmp_path) -> None:
    policy = RoomPolicy(min_batch_size=64, codecs=(Codec.parse("q8"),))
    reply, _ = serve(tmp_path / "a", policy, run_config={"codec": "none"})
    assert refusal(reply) is Refusal.CODEC_NOT_ALLOWED
    control, _ = serve(tmp_path / "b", policy, run_config={"codec": "q8"})
    assert refusal(control) is None


def test_only_allowed_label_sets_are_trained(tmp_path) -> None:
    reply, _ = serve(tmp_path / "a", RoomPolicy(min_batch_size=64, label_sets=("non_private",)))
    assert refusal(reply) is Refusal.LABEL_SET_NOT_ALLOWED
    control, _ = serve(tmp_path / "b", RoomPolicy(min_batch_size=64, label_sets=("eps=3",)))
    assert refusal(control) is None


@pytest.mark.parametrize("sigma, refused", [(0.0, True), (0.5, True), (1.0, False)])
def test_dp_sgd_noise_is_required_when_the_policy_says_so(tmp_path, sigma, refused) -> None:
    policy = RoomPolicy(min_batch_size=32, dp_sgd=DPRequirement.NOISE, min_noise_multiplier=1.0)
    reply, _ = serve(tmp_path, policy, run_config={"dp-noise-multiplier": sigma})
    assert refusal(reply) is (Refusal.DP_SGD_REQUIRED if refused else None)


def test_a_clean_room_node_config_cannot_be_weaker_than_its_policy(tmp_path) -> None:
    policy = RoomPolicy(min_batch_size=32, dp_sgd=DPRequirement.NOISE, min_noise_multiplier=1.0)
    reply, _ = serve(tmp_path, policy, run_config={"dp-noise-multiplier": 2.0}, node_config={"dp-noise-multiplier": 0.0})
    assert refusal(reply) is Refusal.DP_SGD_REQUIRED


def test_the_dp_sgd_budget_stops_releases_once_spent(tmp_path) -> None:
    """A total-ε budget between one and two releases' ε: round 1 is served, round 2 refused."""
    sigma, q, delta = 1.0, 64 / ROWS, 1e-6
    one, two = (epsilon_of([(sigma, q, steps)], delta=delta) for steps in (1, 2))
    policy = RoomPolicy(min_batch_size=32, dp_sgd=DPRequirement.BUDGET, max_total_epsilon=(one + two) / 2)
    run = {"dp-noise-multiplier": sigma, "dp-delta": delta}
    first, context = serve(tmp_path, policy, run_config=run)
    assert refusal(first) is None
    second, _ = serve(tmp_path, None, context=context, instruction=lambda r: train_instruction(round_=2))
    assert refusal(second) is Refusal.DP_BUDGET_SPENT
    assert ledger_of(tmp_path, context)["dp_sgd"]["steps"] == 1


def test_releases_per_run_are_capped(tmp_path) -> None:
    reply, context = serve(tmp_path, RoomPolicy(min_batch_size=64, max_releases_per_run=2), rounds=2)
    assert refusal(reply) is None
    reply, _ = serve(tmp_path, None, context=context, instruction=lambda r: train_instruction(round_=3))
    assert refusal(reply) is Refusal.RELEASES_PER_RUN_SPENT
    assert ledger_of(tmp_path, context)["releases"]["in_run"] == 2


def test_releases_in_total_are_capped_across_runs(tmp_path) -> None:
    policy = RoomPolicy(min_batch_size=64, max_releases_total=3)
    reply, _ = serve(tmp_path, policy, rounds=2)
    assert refusal(reply) is None
    # another label set on the same rows (another run key, a fresh state): one more release, then none
    shutil.copytree(tmp_path / "eps=3", tmp_path / "eps=1")
    second = room_context(tmp_path, run_config={"label-set": "eps=1"})
    replies = [deliver(make_client_app(), train_instruction(round_=r), second) for r in (1, 2)]
    assert [refusal(r) for r in replies] == [None, Refusal.RELEASES_TOTAL_SPENT]
    releases = json.loads((tmp_path / "releases.json").read_text())["runs"]
    assert sum(entry["releases"] for entry in releases.values()) == 3


def len_adapters() -> int:
    from pcvr.models.cvr import attach_adapters, parameter_counts
    from support import make_backbone

    return parameter_counts(attach_adapters(make_backbone()))["adapters"]


def test_no_policy_file_means_the_default_floor(tmp_path) -> None:
    assert RoomPolicy.load(tmp_path) == RoomPolicy() and RoomPolicy().min_batch_size == 1024
    assert math.isinf(RoomPolicy().max_total_epsilon)
