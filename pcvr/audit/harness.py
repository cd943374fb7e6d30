"""``pcvr audit``: attack what the platform actually received, and score the attacks on canaries.

For each audited setting:

1. every clean room gets an audit label set: a sample of its joined rows with
   canaries planted (:mod:`pcvr.audit.canaries`);
2. one federated run in Flower's simulation engine, with the platform keeping
   the exact serialized payloads it sent and received, and each clean room
   keeping (on its side) which rows made each batch;
3. an attacker with the platform's knowledge — the features it exported, the
   weights it sent — plus, as a worst case, each batch's membership, decodes
   every received payload exactly as the platform does and runs the attacks of
   :mod:`pcvr.audit.attacks`: norm and direction scores (Li et al. 2022), the
   batch's positive count from the bias gradient, least-squares inversion of
   the adapter gradient on the recomputed per-example logit gradients;
4. each attack is scored on the canaries: AUC with a bootstrap interval against
   the label-DP bound e^ε/(1+e^ε), and an empirical ε lower bound.

The **control** runs the same pipeline with randomized response off, batch size 1
and no compression: there the norm attack must reach AUC ≥ 0.9 and the positive
count must be exact, or the audit cannot see leakage and says it is broken.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pcvr.audit import attacks
from pcvr.audit.canaries import CanarySet, plant_canaries
from pcvr.audit.recompute import bias_offset_index, logit_jacobian, loss_slopes
from pcvr.audit.metrics import (
    attack_accuracy,
    attack_auc,
    auc_lower_limit,
    epsilon_lower_bound,
    label_dp_auc_bound,
)
from pcvr.clean_room.dataset import CleanRoomData, load_training_data
from pcvr.clean_room.policy import RoomPolicy
from pcvr.clean_room.session import RoomState, weights_for
from pcvr.data.io import write_bytes_atomic
from pcvr.models.cvr import CVRNet, adapter_parameters, attach_adapters, load_backbone, set_adapter_vector
from pcvr.platform.federation import PayloadRecorder
from pcvr.protocols.codecs import Codec
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.layout import PRIVACY_LEDGER_FILE
from pcvr.protocols.messages import Binding, ProtocolError, TrainIns, TrainReply, record_from_bytes
from pcvr.protocols.keys import load_or_create_secret
from pcvr.simulate import NON_PRIVATE, SimulationSpec, prepare, run_setting

__all__ = ["AuditSetting", "control_setting", "run_audit", "audit_setting", "format_audit"]

log = logging.getLogger(__name__)
ATTACKS = ("norm", "direction", "positive_count", "least_squares")
CONTROL_MIN_NORM_AUC = 0.9


@dataclass(frozen=True)
class AuditSetting:
    """One audited configuration of the protocol."""

    name: str
    epsilon: float  # label-DP ε of the canaries (math.inf: randomized response off)
    batch_size: int
    canaries_per_room: int
    rows_per_room: int
    correction: Correction = Correction.FORWARD
    codec: Codec = field(default_factory=lambda: Codec.parse("none"))
    dp_noise_multiplier: float = 0.0
    learning_rate: float | None = None  # None: the run's

    def __post_init__(self) -> None:
        for name in ("batch_size", "canaries_per_room", "rows_per_room"):
            if getattr(self, name) < 1:
                raise ValueError(f"audit setting {self.name}: {name.replace('_', '-')} must be >= 1")
        if self.canaries_per_room > self.rows_per_room:
            raise ValueError(f"audit setting {self.name}: more canaries than rows per clean room")
        if not self.epsilon > 0 or self.dp_noise_multiplier < 0:
            raise ValueError(f"audit setting {self.name}: epsilon must be > 0 and the noise multiplier >= 0")

    @property
    def rounds(self) -> int:
        return max(1, self.rows_per_room // self.batch_size)  # one epoch: every canary is in one batch

    @property
    def label_set(self) -> str:
        return f"audit-{self.name}"


def control_setting(*, canaries_per_room: int) -> AuditSetting:
    """Randomized response off, batch size 1, dense gradients: attacks must succeed here.

    Every row of the control is a canary, and canaries are half positive by design;
    trained at the usual step size, the model would move to predicting 50% and the
    norm attack (which relies on the rarity of conversions, Li et al. 2022) would be
    blind for a reason that has nothing to do with protection. So the control keeps
    the model at the backbone (a negligible step size): each payload still is one
    example's exact gradient.
    """
    return AuditSetting(
        name="control",
        epsilon=math.inf,
        batch_size=1,
        canaries_per_room=canaries_per_room,
        rows_per_room=canaries_per_room,
        correction=Correction.NONE,
        codec=Codec.parse("none"),
        learning_rate=1e-9,
    )


# --- running a setting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Room:
    clean_room_id: int
    data: CleanRoomData
    canaries: CanarySet


def _floor(setting: AuditSetting) -> int:
    """The minimum batch of an audited run (under DP-SGD the Poisson batch varies, so 1)."""
    return setting.batch_size if setting.dp_noise_multiplier == 0 else 1


def _plant(spec: SimulationSpec, setting: AuditSetting, generator: np.random.Generator) -> dict[int, _Room]:
    source_set = NON_PRIVATE if math.isinf(setting.epsilon) else spec.private_label_set
    rooms = {}
    for k in range(spec.world.advertisers):
        room = spec.layout.clean_room(k)
        # The advertiser audits its own clean room: its policy admits the batch size audited.
        write_bytes_atomic(room.policy, RoomPolicy(min_batch_size=_floor(setting)).to_toml().encode())
        out_dir = Path(room.root) / setting.label_set
        shutil.rmtree(out_dir, ignore_errors=True)
        canaries = plant_canaries(
            room.label_set(source_set).train,
            out_dir,
            rows=setting.rows_per_room,
            canaries=setting.canaries_per_room,
            epsilon=setting.epsilon,
            rr_secret=load_or_create_secret(spec.layout.secrets(k).rr),
            generator=generator,
        )
        data = load_training_data(
            room.label_set(setting.label_set).train)
        rooms[k] = _Room(clean_room_id=k, data=data, canaries=canaries)
    return rooms


def _replay(run_dir: Path, run_id: int, length: int, codec: Codec):
    """Yield (round, node, weights the node computed on, decoded gradient) from the recorded payloads."""
    wire = run_dir / "wire"
    held: dict[int, RoomState] = {}
    for round_, node in PayloadRecorder.rounds(wire):
        room = held.get(node, RoomState())
        sent = PayloadRecorder.path(wire, round_=round_, node_id=node, direction=PayloadRecorder.SENT)
        ins = TrainIns.from_record(
            record_from_bytes(sent.read_bytes()),
            run_id=run_id,
            node_id=node,
            last_round=round_ - 1,
            num_adapter_params=length,
            max_bytes=1 << 30,
        )
        weights = weights_for(room, ins, length=length)
        received = PayloadRecorder.path(wire, round_=round_, node_id=node, direction=PayloadRecorder.RECEIVED)
        try:
            reply = TrainReply.from_record(
                record_from_bytes(received.read_bytes()),
                expected=Binding(run_id=run_id, round=round_, node_id=node),
                codec=codec,
                num_adapter_params=length,
                min_batch_size=1,
                max_bytes=1 << 30,
            )
        except (FileNotFoundError, ProtocolError):  # no reply, or one the platform rejected: never applied
            held.pop(node, None)
            continue
        held[node] = RoomState(held_round=round_, last_round=round_, weights=weights)
        yield round_, node, weights, reply.adapter_grad()


def _run(spec: SimulationSpec, setting: AuditSetting) -> tuple[dict, dict[int, int]]:
    """One recorded federated run of ``setting``; returns its result and node id → clean room id."""
    result = run_setting(
        spec,
        name=setting.label_set,
        label_set=setting.label_set,
        correction=setting.correction,
        num_rounds=setting.rounds,
        batch_size=setting.batch_size,
        min_batch_size=_floor(setting),
        eval_every=setting.rounds,
        codec=setting.codec,
        downstream_codec=Codec.parse("none"),
        dp_noise_multiplier=setting.dp_noise_multiplier,
        dp_target_epsilon=0.0,
        record_payloads=True,
        **({} if setting.learning_rate is None else {"learning_rate": setting.learning_rate}),
    )
    if result["failures"]:
        raise RuntimeError(f"audit {setting.name}: the recorded run failed: {result['failures'][0]}")
    ledger = json.loads((spec.layout.platform.run_dir(setting.label_set) / PRIVACY_LEDGER_FILE).read_text())
    missing = {node: entry["error"] for node, entry in ledger["clean_rooms"].items() if "error" in entry}
    if missing:
        raise RuntimeError(f"audit {setting.name}: clean rooms did not report their ledger: {missing}")
    return result, {int(node): entry["clean_room_id"] for node, entry in ledger["clean_rooms"].items()}


def _attack_payload(
    model: CVRNet, room: _Room, batch: torch.Tensor, received: np.ndarray, *, correction: Correction, bias_index: int
) -> tuple[dict[int, dict[str, float]], float]:
    """Every attack on one received gradient: canary number → attack → score, and the count's error."""
    logits, jacobian = logit_jacobian(model, room.data.features.take(batch))
    flips = room.data.flip_probs[batch].numpy().astype(np.float64)
    slope_0, slope_1 = loss_slopes(logits, flips, correction=correction)
    expected_noisy = flips + (1 - 2 * flips) / (1 + np.exp(-logits))  # E[ỹ] of each member, from the model
    count = attacks.positive_count(
        float(received[bias_index]), grad_if_negative=slope_0, grad_if_positive=slope_1, prior=expected_noisy
    )
    count_error = abs(count - float(room.data.noisy_labels[batch].sum()))
    label_scores = (
        attacks.label_scores_from_coefficients(
            attacks.least_squares_coefficients(received.astype(np.float64), jacobian.astype(np.float64)),
            grad_if_negative=slope_0,
            grad_if_positive=slope_1,
        )
        if len(batch) < received.size  # otherwise the system is underdetermined: the attack does not apply
        else None
    )
    positions = {int(row): i for i, row in enumerate(batch.tolist())}
    norm = float(attacks.norm_scores(received[None])[0])
    scores: dict[int, dict[str, float]] = {}
    for number, row in enumerate(room.canaries.rows.tolist()):
        i = positions.get(row)
        if i is None:
            continue
        reference = jacobian[i] * slope_1[i]  # the canary's own gradient, were it positive
        scores[number] = {
            "norm": norm,
            "direction": float(attacks.direction_scores(received[None], reference[None])[0]),
            "positive_count": count - (expected_noisy.sum() - expected_noisy[i]),
            "least_squares": math.nan if label_scores is None else float(label_scores[i]),
        }
    return scores, count_error


def audit_setting(spec: SimulationSpec, setting: AuditSetting, *, seed: int, confidence: float) -> dict:
    """Plant, run, attack, score one setting; returns its figures."""
    rooms = _plant(spec, setting, np.random.default_rng(np.random.SeedSequence([seed, 0xA0D17])))
    result, node_room = _run(spec, setting)
    model = attach_adapters(load_backbone(spec.layout.platform.backbone), seed=spec.seed)
    length = sum(p.numel() for p in adapter_parameters(model))
    bias_index = bias_offset_index(model)
    run_dir = spec.layout.platform.run_dir(setting.label_set)
    scores: dict[tuple[int, int], dict[str, list[float]]] = {}  # (clean room, canary) → attack → per payload
    count_errors: list[float] = []  # |estimated − true| noisy positive count, per payload
    for round_, node, weights, received in _replay(run_dir, result["run_id"], length, setting.codec):
        room = rooms[node_room[node]]
        batches = spec.layout.clean_room(room.clean_room_id).label_set(setting.label_set).batches(result["run_id"])
        batch = torch.from_numpy(np.load(batches / f"r{round_:05d}.npy"))
        if len(batch) == 0:  # an empty Poisson batch under DP-SGD: the payload is noise alone
            continue
        set_adapter_vector(model, torch.from_numpy(weights))
        payload_scores, count_error = _attack_payload(
            model, room, batch, received, correction=setting.correction, bias_index=bias_index
        )
        count_errors.append(count_error)
        for number, by_attack in payload_scores.items():
            entry = scores.setdefault((room.clean_room_id, number), {name: [] for name in ATTACKS})
            for name, value in by_attack.items():
                entry[name].append(value)
    return _score(setting, rooms, scores, count_errors, result, confidence=confidence, seed=seed)


def _score(
    setting: AuditSetting,
    rooms: dict[int, _Room],
    scores: dict[tuple[int, int], dict[str, list[float]]],
    count_errors: list[float],
    result: dict,
    *,
    confidence: float,
    seed: int,
) -> dict:
    """Score every attack on the canaries.

    Each canary's score is the mean over the payloads it was in (one, without
    DP-SGD's Poisson sampling). The pass decision tests each attack at
    ``confidence`` split over the attacks (Bonferroni): its AUC's lower limit
    (:func:`auc_lower_limit`, valid for any score distribution) must not exceed
    the label-DP bound, and its empirical ε lower bound must not exceed ε. The
    bootstrap interval is reported for reading, at ``confidence``.
    """
    keys = sorted(scores)
    labels = np.array([rooms[k].canaries.labels[n] for k, n in keys], dtype=np.int8)
    bound = label_dp_auc_bound(epsilon=setting.epsilon)
    per_attack = 1.0 - (1.0 - confidence) / len(ATTACKS)
    figures: dict[str, dict] = {}
    passed = True
    for name in ATTACKS:
        values = np.array([np.mean(scores[key][name]) for key in keys], dtype=np.float64)
        if values.size == 0:
            figures[name] = {"applicable": False, "reason": "no canary was in any received payload"}
            passed = False
            continue
        if np.isnan(values).all():
            figures[name] = {"applicable": False, "reason": "batch not smaller than the adapter parameter count"}
            continue
        if labels.min() == labels.max():
            figures[name] = {"applicable": False, "reason": "every scored canary has the same label"}
            passed = False
            continue
        generator = np.random.default_rng(np.random.SeedSequence([seed, ATTACKS.index(name)]))
        auc = attack_auc(values, labels, confidence=confidence, generator=generator)
        positives = int(labels.sum())
        limit = auc_lower_limit(auc.value, positives=positives, negatives=labels.size - positives, confidence=per_attack)
        eps_lb = epsilon_lower_bound(values, labels, confidence=per_attack, generator=generator)
        within = limit <= bound and eps_lb <= setting.epsilon
        passed &= within
        figures[name] = {
            "auc": auc.to_dict(),
            "auc_lower_limit": limit,
            "epsilon_lower_bound": eps_lb,
            "within_bound": within,
        }
    errors = np.array(count_errors)
    figures["count_exact"] = (
        {**attack_accuracy(errors < 0.5, confidence=confidence).to_dict(), "mean_abs_error": float(errors.mean())}
        if errors.size
        else None
    )
    return {
        "setting": setting.name,
        "epsilon": None if math.isinf(setting.epsilon) else setting.epsilon,
        "auc_bound": bound,
        "batch_size": setting.batch_size,
        "codec": str(setting.codec),
        "correction": setting.correction.value,
        "dp_noise_multiplier": setting.dp_noise_multiplier,
        "rounds": setting.rounds,
        "payloads": len(count_errors),
        "canaries_scored": int(labels.size),
        "canaries_positive": int(labels.sum()),
        "attacks": figures,
        "passed": bool(passed),
        "rejected": result["rejected"],
    }


def run_audit(
    spec: SimulationSpec, *, settings: list[AuditSetting], control: AuditSetting, seed: int = 0, confidence: float = 0.95
) -> dict:
    """Audit ``settings`` and the ``control``; ``passed`` only if the control shows leakage and every setting stays in bounds."""
    prepare(spec)
    control_result = audit_setting(spec, control, seed=seed, confidence=confidence)
    norm_auc = control_result["attacks"]["norm"].get("auc", {}).get("value", 0.0)
    count_exact = (control_result["attacks"]["count_exact"] or {}).get("value", 0.0)
    control_ok = norm_auc >= CONTROL_MIN_NORM_AUC and count_exact == 1.0
    control_result["passed"] = bool(control_ok)
    control_result["verdict"] = (
        "the attacks see the labels when nothing protects them"
        if control_ok
        else f"AUDIT BROKEN: with RR off and batch 1 the norm attack reached AUC {norm_auc:.3f} "
        f"(needs >= {CONTROL_MIN_NORM_AUC}) and the positive count was exact in {100 * count_exact:.1f}% of batches "
        "(needs 100%); the attacks cannot detect leakage, so nothing below proves anything"
    )
    results = [audit_setting(spec, setting, seed=seed, confidence=confidence) for setting in settings]
    return {
        "audit": "label leakage",
        "confidence": confidence,
        "control": control_result,
        "settings": results,
        "passed": bool(control_ok and all(r["passed"] for r in results)),
    }


def format_audit(report: dict) -> str:
    """A table of every attack's AUC (with interval) and ε lower bound, per setting."""
    lines = []
    for result in [report["control"], *report["settings"]]:
        eps = "∞ (RR off)" if result["epsilon"] is None else f"{result['epsilon']:g}"
        lines.append(
            f"{result['setting']}: ε={eps}, batch {result['batch_size']}, codec {result['codec']}, "
            f"DP-SGD σ={result['dp_noise_multiplier']:g}; {result['canaries_scored']} canaries in {result['payloads']} payloads; "
            f"label-DP bound on AUC {result['auc_bound']:.4f}"
        )
        lines.append(f"  {'attack':<16} {'AUC':>7} {'95% interval':>17} {'limit tested':>13} {'ε lower bound':>14}")
        for name in ATTACKS:
            figures = result["attacks"][name]
            if not figures.get("auc"):
                lines.append(f"  {name:<16} {'n/a':>7}   ({figures['reason']})")
                continue
            auc = figures["auc"]
            lines.append(
                f"  {name:<16} {auc['value']:>7.4f} [{auc['low']:.4f}, {auc['high']:.4f}] "
                f"{figures['auc_lower_limit']:>13.4f} {figures['epsilon_lower_bound']:>14.3f}"
            )
        exact = result["attacks"]["count_exact"]
        if exact:
            lines.append(
                f"  batch positive count exact in {100 * exact['value']:.1f}% of {exact['n']} batches "
                f"(mean error {exact['mean_abs_error']:.2f} positives)"
            )
        lines.append(f"  {'control' if result is report['control'] else 'within bounds'}: {result['passed']}")
        if result is report["control"]:
            lines.append(f"  {result['verdict']}")
        lines.append("")
    lines.append(f"passed: {report['passed']}")
    return "\n".join(lines)
