"""``index.html``: the report as one self-contained page (images as data URIs, no network).

Each plot comes with a headline sentence computed from the results it shows. A small
script checks on load that every image decoded (``img.complete && naturalWidth > 0``)
and counts script errors; it writes the verdict into ``#page-check``, which the
browser check (:mod:`pcvr.report.browser`) reads from the rendered DOM.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Mapping

from pcvr.report.plots import ATTACK_LABELS
from pcvr.report.results import as_float

__all__ = ["render_page", "headline", "GUARANTEE"]

GUARANTEE = (
    "Randomized response makes every label ε-label-DP with respect to everything downstream — gradients, model, "
    "metrics — by post-processing, whatever the gradients leak. Batch aggregation alone is not a guarantee: a "
    "platform that can recompute each sample's activations can read the batch's (noisy) positive count off the "
    "head's bias gradient, and when the batch is smaller than the adapter parameter count ({adapters:,} for this "
    "report's model) it can invert the gradient and read every example's noisy label; the audit below shows both. "
    "Without randomized response that count is exact: pcvr's protection of the labels rests on randomized response, "
    "not on aggregation. Compression and DP-SGD blur what the platform can read further; only DP-SGD is a guarantee "
    "for features as well as labels. Label DP protects whether a user converted, not which ads they clicked: the "
    "platform already holds the features. ε is per record and per label release; a record's labels are randomized "
    "once, so retraining on the same labels spends nothing more, while a fresh release would."
)

CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var check = document.getElementById("page-check");
  var errors = Number(document.body.getAttribute("data-script-errors") || "0");
  check.setAttribute("data-images", String(images.length));
  check.setAttribute("data-loaded", String(loaded));
  check.setAttribute("data-script-errors", String(errors));
  check.textContent = (loaded === images.length && errors === 0 ? "page-check: ok " : "page-check: FAILED ")
    + loaded + "/" + images.length + " images, " + errors + " script errors";
});
</script>
"""
ERROR_TRAP = """<script>
window.addEventListener("error", function (event) {
  if (event.target && event.target.tagName) { return; }  /* a resource (an image): counted by naturalWidth */
  var body = document.body || document.documentElement;
  body.setAttribute("data-script-errors", String(Number(body.getAttribute("data-script-errors") || "0") + 1));
}, true);
</script>"""


def _f(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return "∞" if math.isinf(value) else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    return _f(mean, digits) + ("" if std is None else f" ± {std:.{digits}f}")


def _points(plot: dict, label: str) -> list[tuple[float, float, float | None]]:
    series = next((s for s in plot["series"] if s["label"] == label), None)
    return [] if series is None else list(zip(series["x"], series["y"], series["yerr"] or [None] * len(series["x"])))


def _level(plot: dict, label: str) -> float | None:
    return next((level["y"] for level in plot["levels"] if level["label"] == label), None)


def _eps(value: float) -> str:
    return f"{value:g}"


def _metric_headline(plot: dict, document: dict, *, what: str) -> str:
    non_private, backbone = _level(plot, "non-private (ε = ∞)"), _level(plot, "frozen backbone")
    parts = []
    for correction in ("forward", "backward", "none"):
        points = _points(plot, f"correction {correction}")
        if points:
            (e0, y0, s0), (e1, y1, s1) = points[0], points[-1]
            if len(points) == 1:
                parts.append(f"with correction {correction} {what} is {_pm(y0, s0)} at ε={_eps(e0)}")
            else:
                parts.append(f"with correction {correction} {what} goes from {_pm(y0, s0)} at ε={_eps(e0)} to {_pm(y1, s1)} at ε={_eps(e1)}")
    text = "; ".join(parts) or "no finite-ε run at the reference settings"
    return (
        f"{text[0].upper()}{text[1:]} (mean ± standard deviation over {document['seeds']} seeds); "
        f"non-private {_f(non_private)}, frozen backbone {_f(backbone)}."
    )


def _calibration_headline(plot: dict, document: dict) -> str:
    none = _points(plot, "correction none")
    lead = ""
    if none:
        e, y, s = none[len(none) // 2]
        lead = f"Without correction, calibration at ε={_eps(e)} is {_pm(y, s, 2)}: the model predicts the noisy rate. "
    return lead + _metric_headline(plot, document, what="calibration Σp/Σy")


def _attack_headline(plot: dict, document: dict) -> str:
    per_epsilon = {}
    for series in plot["series"]:
        for x, y in zip(series["x"], series["y"]):
            if y is not None and (x not in per_epsilon or y > per_epsilon[x][1]):
                per_epsilon[x] = (series["label"], y)
    strongest = "; ".join(
        f"ε={_eps(x)}: {label} {y:.3f} (bound {math.exp(x) / (1 + math.exp(x)):.3f})" for x, (label, y) in sorted(per_epsilon.items())
    )
    audited = [r for r in document["rows"] if r["audit"]]
    failed = [r for r in audited if not r["audit_passed"]]
    control = document.get("control") or {}
    text = (
        f"Strongest attack on the canaries per ε, mean AUC over seeds: {strongest}. {len(audited) - len(failed)} of "
        f"{len(audited)} audited runs stay within the bound at {100 * document['audit_confidence']:.0f}% confidence."
    )
    perfect = [r for r in failed if any(r[f"attack_{a}_auc"] == 1.0 for a in ATTACK_LABELS)]
    if perfect:
        chances = sorted({(as_float(r["epsilon"]), r["audit_canaries"]) for r in perfect})
        odds = ", ".join(f"{100 * (1 - 1 / (1 + math.exp(e))) ** n:.1f}% at ε={_eps(e)}" for e, n in chances)
        text += (
            f" Of the {len(failed)} that do not, {len(perfect)} scored a perfect AUC of 1 on {perfect[0]['audit_canaries']} canaries, where the "
            "audit's distribution-free lower limit has no width; no canary's label flipped there, which randomized response "
            f"allows with probability {odds}: more canaries tell these apart."
        )
    return text + (
        f" The control (randomized response off, batch 1) reaches norm-attack AUC {_f(as_float(control.get('attack_norm_auc')), 3)}: "
        "the attacks do see labels when nothing protects them."
    )


def _bytes_headline(plot: dict, document: dict) -> str:
    points = [(s["label"].removeprefix("codec "), s["x"][0], s["y"][0], s["yerr"][0]) for s in plot["series"]]
    largest = max(points, key=lambda p: p[1])
    parts = [f"{codec} sends {x:,.0f} bytes up per round ({largest[1] / x:.1f}x fewer than {largest[0]}) at AUC {_pm(y, s)}"
             for codec, x, y, s in sorted(points, key=lambda p: p[1]) if codec != largest[0]]  # fmt: skip
    return f"Codec {largest[0]} sends {largest[1]:,.0f} bytes up per round at AUC {_pm(largest[2], largest[3])}; " + "; ".join(parts) + "."


def _dp_sgd_headline(plot: dict, document: dict) -> str:
    (series,) = plot["series"]
    without = _level(plot, "no DP-SGD")
    parts = [f"DP-SGD ε={x:.2f} gives AUC {_pm(y, s)}" for x, y, s in zip(series["x"], series["y"], series["yerr"])]
    delta = next((r["dp_sgd_delta"] for r in document["rows"] if r["dp_sgd_delta"] is not None), None)
    return "; ".join(parts) + f" (δ={delta:g}), against {_f(without)} without DP-SGD."


def _spread_headline(plot: dict, document: dict) -> str:
    parts = []
    for entry in document["planner"]:
        measured = ", ".join(f"{c} {100 * v:.1f}%" for c, v in entry["measured"].items() if v is not None)
        parts.append(f"at ε={_eps(entry['epsilon'])} the planner predicts {100 * entry['planner_relative_se']:.1f}%, "
                     f"the sweep measured {measured or 'n/a (one seed)'}")  # fmt: skip
    floor = document["planner"][0]["training_floor"] if document["planner"] else None
    return (
        "Relative spread of calibration over seeds: " + "; ".join(parts)
        + f". At ε=∞ training alone spreads it by {'n/a' if floor is None else f'{100 * floor:.1f}%'}; "
        f"with {document['seeds']} seeds a measured spread is itself uncertain by about ±{100 / math.sqrt(2 * max(1, document['seeds'] - 1)):.0f}%. "
        "A spread well below the planner's means the model did not fit its labels' rate in these rounds "
        "(it stays near the backbone's); one above it, that training adds its own."
    )


HEADLINES: dict[str, Callable[[dict, dict], str]] = {
    "auc_vs_epsilon": lambda p, d: _metric_headline(p, d, what="AUC"),
    "calibration_vs_epsilon": _calibration_headline,
    "ne_vs_epsilon": lambda p, d: _metric_headline(p, d, what="normalized entropy (lower is better)"),
    "attack_auc_vs_epsilon": _attack_headline,
    "bytes_vs_auc": _bytes_headline,
    "dp_sgd_vs_auc": _dp_sgd_headline,
    "calibration_spread_vs_epsilon": _spread_headline,
}


def headline(name: str, document: dict) -> str:
    """The sentence above plot ``name``, computed from the document's numbers."""
    return HEADLINES[name](document["plots"][name], document)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _planner_table(document: dict) -> str:
    rows = [
        [_eps(e["epsilon"]), f"{e['train_rows']:,}", f"{100 * e['flip_share']:.1f}%", f"{100 * e['planner_relative_se']:.1f}%",
         f"{100 * e['planner_relative_se_with_sampling']:.1f}%", f"{e['rows_for_3_percent']:,}",
         *[("n/a" if e["measured"][c] is None else f"{100 * e['measured'][c]:.1f}%") for c in ("forward", "backward")]]
        for e in document["planner"]
    ]  # fmt: skip
    return _table(
        ["ε", "training rows", "fake share of noisy positives", "planner: relative SE (these rows)",
         "planner: relative SE (population)", "rows for ±3% at 95%", "measured spread, forward", "measured spread, backward"],
        rows,
    )  # fmt: skip


def _ledger_html(document: dict) -> str:
    ledger = document["ledger"]
    rows = []
    for eps, entry in ledger["label_dp"].items():
        for level, summary in sorted(entry["levels"].items()):
            if summary["excluded"]:
                spent = "excluded (never leaves the advertiser)"
            elif summary["epsilon"] is None or as_float(summary["epsilon"]) == math.inf:
                spent = "∞ (randomized response off)"
            else:
                spent = _f(as_float(summary["epsilon"]), 2)
            rows.append([eps, level, spent, f"{summary['records']:,}"])
    text = _table(["run at ε", "consent level", "label-DP ε applied", "records"], rows)
    dp = "; ".join(f"σ={sigma}: ε={v['epsilon_max']:.2f} at δ={v['delta']:g}" for sigma, v in ledger["dp_sgd"].items())
    return text + (
        f"<p>DP-SGD (Opacus RDP accountant, the worst clean room): {html.escape(dp or 'not used in this grid')}. "
        f"Private evaluation spends ε={ledger['private_evaluation_epsilon']:g}: the clean rooms release only sums over "
        "their held-out split, post-processing of ε-label-DP labels.</p>"
    )


def _cells_table(document: dict) -> str:
    rows = []
    for e in document["aggregates"]:
        m, s = e["mean"], e["std"]
        rows.append([e["name"], str(e["seeds"]), _pm(as_float(m["auc"]), s["auc"]), _pm(as_float(m["calibration"]), s["calibration"], 3),
                     _pm(as_float(m["ne"]), s["ne"]), _pm(as_float(m["private_calibration"]), s["private_calibration"], 3),
                     f"{as_float(m['bytes_up_per_round']):,.0f}", _f(as_float(m["dp_sgd_epsilon"]), 2)])  # fmt: skip
    return _table(["configuration", "seeds", "AUC", "calibration", "NE", "private calibration", "bytes up/round", "DP-SGD ε"], rows)


def _holdout_words(document: dict) -> str:
    rows = document["reference"]["holdout_rows"]
    if document["world"].get("data") == "user":
        from pcvr.report.userdata import HOLDOUT_FRACTION

        return (
            f"{rows:,} of your clicks held out with their true labels (a keyed {HOLDOUT_FRACTION:.0%} of each advertiser's "
            "clicks, kept out of training; opted-out users left out)"
        )
    return f"the platform's {rows:,}-row holdout with true labels"


def render_page(document: dict, images: Mapping[str, bytes]) -> str:
    """The whole page; ``images`` maps each plot's file name to its PNG bytes."""
    sections = []
    for name, plot in document["plots"].items():
        uri = "data:image/png;base64," + base64.b64encode(images[plot["file"]]).decode("ascii")
        sections.append(
            f'<section id="{name}"><h2>{html.escape(plot["title"])}</h2><p class="headline">{html.escape(headline(name, document))}</p>'
            f'<img alt="{html.escape(plot["title"])}" src="{uri}"></section>'
        )
    reference = document["reference"]
    summary = (
        f"Grid <b>{html.escape(document['grid'])}</b>: {len(document['rows'])} runs ({len(document['aggregates'])} configurations × "
        f"up to {document['seeds']} seeds, each seed with its own randomized-response secrets), one federated run each on "
        f"{document['world']['rows']:,} rows across {document['world']['clean_rooms']} clean rooms, {document['rounds']} rounds; "
        f"metrics on {_holdout_words(document)}. {document['cells_run']} cells run now, "
        f"{document['cells_cached']} reused; {document['wall_s']:.0f} s."
    )
    guarantee = GUARANTEE.format(adapters=reference["parameters"]["adapters"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pcvr report: privacy–accuracy trade-off</title>
{ERROR_TRAP}
<style>
body {{ font-family: sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
.headline {{ font-size: 1.05rem; }}
table {{ border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }}
#page-check {{ color: #888; font-size: 0.8rem; }}
</style></head>
<body>
<h1>Privacy–accuracy trade-off</h1>
<p>{summary}</p>
<section id="guarantee"><h2>What the privacy guarantee is, and is not</h2><p>{html.escape(guarantee)}</p></section>
{''.join(sections)}
<section id="planner"><h2>Planner vs sweep</h2>
<p>Before spending budget, <code>pcvr plan</code> predicts what each ε costs; here it is run on these cells' own training rows
(base rate {100 * reference['train_positive_rate']:.2f}%) beside the spread of calibration the sweep measured over seeds.</p>
{_planner_table(document)}</section>
<section id="ledger"><h2>Privacy ledger</h2>{_ledger_html(document)}</section>
<section id="cells"><h2>Every configuration</h2>{_cells_table(document)}</section>
<p id="page-check">page-check: pending</p>
{CHECK_SCRIPT}
</body></html>
"""
