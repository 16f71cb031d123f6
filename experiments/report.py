"""Output people can read: a stdout table, a JSON document, a self-contained HTML report.

The HTML report has no external assets: its two plots (the difference's confidence sequence as
outcomes accumulated, the per-arm latency distributions) are inline SVG drawn here.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.decision import METRIC_SHARE
from experiments.judge import ArmSummary, Evaluation, SeriesPoint
from experiments.stats import Interval
from router.logschema import Arm, RoutingMode

_COLORS = {Arm.CHAMPION: "#1f77b4", Arm.CHALLENGER: "#d62728", Arm.SHADOW: "#d62728"}


# --- JSON ------------------------------------------------------------------------------------


def to_dict(evaluation: Evaluation) -> dict[str, Any]:
    """Everything in the evaluation, JSON-ready (non-finite numbers become null)."""
    out: dict[str, Any] = dataclasses.asdict(evaluation)
    for f in dataclasses.fields(evaluation):  # the per-arm figures: a property asdict leaves out
        arm = getattr(evaluation, f.name)
        if isinstance(arm, ArmSummary):
            out[f.name]["error_rate"] = arm.error_rate
    if evaluation.adjustment is not None:  # likewise the share of variance it removed
        out["adjustment"]["variance_reduction"] = evaluation.adjustment.variance_reduction
    cleaned: dict[str, Any] = finite(out)
    return cleaned


def finite(value: Any) -> Any:
    """``value`` with non-finite floats as None, recursively (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(evaluation: Evaluation, path: Path) -> None:
    path.write_text(json.dumps(to_dict(evaluation), indent=2) + "\n", encoding="utf-8")


# --- text ------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".4f") -> str:
    if x is None or not math.isfinite(x):
        return "-" if x is None else ("+inf" if x > 0 else "-inf")
    return format(x, spec)


def _interval(i: Interval | None, spec: str = "+.4f") -> str:
    if i is None:
        return "-"
    return f"{_fmt(i.estimate, spec)} [{_fmt(i.lower, spec)}, {_fmt(i.upper, spec)}]"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def text_table(evaluation: Evaluation) -> str:
    """The summary printed on stdout: per-arm figures, difference, SRM, guardrails, decision."""
    e = evaluation
    lines = [
        f"Experiment {e.experiment_id} ({e.mode} mode, metric {e.metric}, "
        f"{'higher' if e.higher_is_better else 'lower'} is better; alpha {e.alpha:g}, "
        f"N* {e.planned_samples}, outcome window {e.outcome_window_s:g} s)",
        f"method: {_method_line(e)}",
        f"guardrails: {guardrail_settings(e)}",
        f"unit of analysis: {e.unit} (the unit of randomisation); intent-to-treat"
        + (f"; {e.metric} capped at {e.cap:.4g}" if e.cap is not None else ""),
        "",
        f"intervals: {e.interval_label or 'none computed yet'}",
        f"{'arm':<11} {'version':>7} {'requests':>8} {'n':>7}  "
        f"{e.metric + ' (interval)':<30} {'p50 ms':>8} {'p95 ms':>8} {'errors':>7}",
    ]
    for arm in (e.champion, e.challenger):
        mean = "-"
        if arm.metric_interval is not None:
            mean = _interval(arm.metric_interval, ".4f")
        elif arm.metric_mean is not None:
            mean = _fmt(arm.metric_mean)
        rate = "-" if arm.error_rate is None else f"{arm.error_rate:.2%}"
        lines.append(
            f"{arm.arm:<11} {'v' + str(arm.version):>7} {arm.requests:>8} {arm.n:>7}  "
            f"{mean:<30} {_ms(arm.latency.p50):>8} {_ms(arm.latency.p95):>8} {rate:>7}"
        )
    lines.append("")
    if e.difference is not None:
        d = e.difference
        kind = "paired, " if d.paired else ("adjusted, " if d.adjusted else "")
        if len(e.periods) > 1 and not d.paired:
            kind = "stratified by split period, "
        lines.append(
            f"difference ({kind}positive = challenger better): {_interval(d.absolute)}"
            + (f"; relative {_interval(d.relative, '+.2%')}" if d.relative is not None else "")
        )
    else:
        lines.append("difference: not computed (too few rows)")
    if e.adjustment is not None:
        lines.append(f"covariate adjustment: {_adjustment_line(e)}")
    if e.look is not None:
        lines += [f"look note: {note}" for note in e.look.notes]
    if e.srm is None and e.mode == RoutingMode.SHADOW:
        lines.append("sample ratio: not applicable (shadow mode: every request scored by both)")
    elif e.srm is None:
        lines.append("sample ratio: not checked (no units logged for this experiment yet)")
    lines += _split_lines(e)
    for c in e.checks:
        verdict = "not checked yet" if not c.checked else ("ok" if c.passed else "FAIL")
        lines.append(f"check {c.name.replace('_', ' ')}: {verdict} ({c.detail})")
    for a in (e.champion, e.challenger):
        if a.fallbacks or a.client_errors:
            lines.append(
                f"{a.arm}: {a.fallbacks} fallbacks (judged on the answer served), "
                f"{a.client_errors} client errors (not judged)"
            )
    for g in e.guardrails:
        lines.append(f"guardrail {g.name}: {'pass' if g.passed else 'FAIL'} ({g.detail})")
    if not e.guardrails:
        lines.append("guardrails: not evaluated (too few rows)")
    if e.prometheus is not None:
        p = e.prometheus
        if p.error:
            lines.append(f"prometheus: unavailable ({p.error})")
        else:
            rates = ", ".join(f"{a} {r:.2%}" for a, r in sorted(p.error_rate.items())) or "-"
            p95 = ", ".join(f"{a} {v * 1e3:.2f} ms" for a, v in sorted(p.latency_p95.items()))
            lines.append(
                f"prometheus ({p.window_s} s window, informational): "
                f"error rate {rates}; p95 {p95 or '-'}"
            )
    if e.skipped_rows:
        lines.append(f"note: {e.skipped_rows} rows with outcomes could not carry {e.metric}")
    lines += ["", f"decision: {e.decision.upper()}. {e.reason}"]
    return "\n".join(lines)


def _method_line(e: Evaluation) -> str:
    look = e.look
    if e.method == "confidence_sequence":
        text = "always-valid confidence sequence (valid at any look; N* tunes where it is tightest)"
        if look is not None:
            text += f"; look {look.number}, {look.units} judged units"
        return text
    text = "group-sequential, O'Brien-Fleming-type alpha spending over judged units / N*"
    if look is None:
        return text + "; no look yet (nothing judged)"
    boundary = (
        "none (nothing left to spend)"
        if math.isinf(look.boundary)
        else (f"|z| >= {look.boundary:.3f}")
    )
    spent = f", alpha spent {look.alpha_spent:.4g}" if look.alpha_spent is not None else ""
    state = " (final analysis)" if look.final else (" (past the final)" if look.past_final else "")
    return (
        f"{text}; look {look.number}{state} at t = {look.fraction:.3f} "
        f"({look.units} of {look.planned} units), {len(look.fractions)} look(s) in the design, "
        f"boundary {boundary}{spent}"
    )


def guardrail_settings(e: Evaluation) -> str:
    """The guardrails as configured, in one line (the report's header)."""
    g = e.guardrail_settings
    latency = f"p95 latency +{g.max_latency_p95_increase:.0%}"
    if g.max_latency_p95_ms is not None:
        latency += f" or within {g.max_latency_p95_ms:g} ms"
    return f"error rate +{g.max_error_rate_increase:.2%}; {latency}"


def _adjustment_line(e: Evaluation) -> str:
    a = e.adjustment
    assert a is not None
    if not a.on:
        return f"off ({a.reason})"
    reduction = a.variance_reduction
    return (
        "on, the champion's prediction as covariate (cross-fitted); "
        f"variance {-(reduction or 0.0):+.1%} against the unadjusted difference, "
        f"slope {a.theta:.3g}, balance z {a.balance_z:+.2f}, covariate imputed for "
        f"{a.missing_champion:.1%} / {a.missing_challenger:.1%} of rows"
    )


def _split_lines(e: Evaluation) -> list[str]:
    """The split in force, each period of one weight (when it changed), and the ramp's stage."""
    lines = []
    if e.split is not None:
        s = e.split
        lines.append(
            f"split in force: challenger weight {s.challenger_weight:g} (from {s.source}, "
            f"epoch {s.epoch})"
        )
    if len(e.periods) > 1:
        lines.append("periods (each judged at its own weight; the difference combines them):")
        for p in e.periods:
            share = "-" if p.combination_weight is None else f"{p.combination_weight:.2f}"
            lines.append(
                f"  weight {p.weight:g}: units champion {p.champion_units}, challenger "
                f"{p.challenger_units}; judged rows {p.champion_n}/{p.challenger_n}; "
                f"share of the estimate {share}"
            )
    if e.ramp is not None:
        r = e.ramp
        stages = " -> ".join(f"{w:g}" for w in r.stages)
        lines.append(f"ramp {stages}: stage {r.stage} of {len(r.stages)}, {r.action}")
    return lines


# --- HTML ------------------------------------------------------------------------------------


def write_html(evaluation: Evaluation, path: Path) -> None:
    path.write_text(html_report(evaluation), encoding="utf-8")


def html_report(evaluation: Evaluation) -> str:
    """A self-contained page: the table, the confidence-sequence plot, the latency plot."""
    e = evaluation
    esc = html.escape
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{esc(e.experiment_id)}: {esc(e.decision)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
pre {{ background: #f6f8fa; padding: 1em; white-space: pre-wrap; font-size: 13px; }}
.decision {{ font-size: 1.3em; font-weight: 600; }}
.promote {{ color: #1a7f37; }} .reject {{ color: #cf222e; }}
.inconclusive {{ color: #9a6700; }} .invalid {{ color: #8250df; }}
figure {{ margin: 1.5em 0; }} figcaption {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>{esc(e.model_name)}: v{esc(str(e.aliases.champion))} vs v{esc(str(e.aliases.challenger))}</h1>
<p class="decision {esc(e.decision)}">{esc(e.decision.upper())}: {esc(e.reason)}</p>
<pre>{esc(text_table(e))}</pre>
<figure>{_series_svg(e.series, e.min_effect)}
<figcaption>Difference in {esc(e.metric)} (positive = challenger better), unadjusted, with its
always-valid {(1 - e.alpha * METRIC_SHARE) * 100:.4g}% confidence sequence as outcomes accumulated
(the trajectory; valid at every point). The decision uses
{esc(e.interval_label or "no interval yet")}.</figcaption></figure>
<figure>{_latency_svg(e)}
<figcaption>Predict latency per arm (share of requests per log-spaced bin).</figcaption></figure>
</body></html>
"""


_W, _H, _PAD = 720, 300, 50
# A generous width per character of an 11 px label (digits, signs, separators): the left margin is
# sized from the y labels, so that no label is cut at the SVG's edge whatever its magnitude.
_CHAR_W = 7.0


def _scale(lo: float, hi: float, out_lo: float, out_hi: float) -> Any:
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def _series_svg(series: Sequence[SeriesPoint], min_effect: float) -> str:
    if not series:
        return "<p>No confidence sequence yet (too few outcomes).</p>"
    xs = [p.n_champion + p.n_challenger for p in series]
    bounds = [v for p in series for v in (p.lower, p.upper) if math.isfinite(v)] + [0.0]
    y_lo, y_hi = min(bounds), max(bounds)
    y_labels = (_tick(y_lo), _tick(y_hi))
    pad = _left_pad(y_labels)
    fx = _scale(min(xs), max(xs), pad, _W - 10)
    fy = _scale(y_lo, y_hi, _H - 30, 10)

    def clamp(v: float) -> float:
        return min(max(v, y_lo), y_hi)

    upper = " ".join(
        f"{fx(x):.1f},{fy(clamp(p.upper)):.1f}" for x, p in zip(xs, series, strict=True)
    )
    lower = " ".join(
        f"{fx(x):.1f},{fy(clamp(p.lower)):.1f}"
        for x, p in reversed(list(zip(xs, series, strict=True)))
    )
    est = " ".join(f"{fx(x):.1f},{fy(p.estimate):.1f}" for x, p in zip(xs, series, strict=True))
    parts = [
        f'<polygon points="{upper} {lower}" fill="#d62728" fill-opacity="0.18"/>',
        f'<polyline points="{est}" fill="none" stroke="#d62728" stroke-width="2"/>',
        _hline(pad, fy(0.0), "#444", "0"),
    ]
    if min_effect and y_lo <= min_effect <= y_hi:
        label = f"min_effect {min_effect:g}"
        parts.append(_hline(pad, fy(min_effect), "#1a7f37", label, dash=True))
    parts += _axes(pad, f"{min(xs)}", f"{max(xs)} rows with outcomes", *y_labels)
    return _svg(parts, "Confidence sequence of the difference")


def _latency_svg(e: Evaluation) -> str:
    arms = [a for a in (e.champion, e.challenger) if a.latency.hist_counts]
    if not arms:
        return "<p>No latencies logged.</p>"
    edges = arms[0].latency.hist_edges
    logs = [math.log10(x) for x in edges]
    shares = {a.arm: [c / max(a.latency.n, 1) for c in a.latency.hist_counts] for a in arms}
    top = max(max(s) for s in shares.values()) or 1.0
    y_labels = ("0", f"{top:.0%}")
    pad = _left_pad(y_labels)
    fx = _scale(logs[0], logs[-1], pad, _W - 10)
    fy = _scale(0.0, top, _H - 30, 10)
    parts: list[str] = []
    for i, arm in enumerate(arms):
        pts = [f"{fx(logs[0]):.1f},{fy(0):.1f}"]
        for k, share in enumerate(shares[arm.arm]):
            pts += [f"{fx(logs[k]):.1f},{fy(share):.1f}", f"{fx(logs[k + 1]):.1f},{fy(share):.1f}"]
        pts.append(f"{fx(logs[-1]):.1f},{fy(0):.1f}")
        color = _COLORS.get(arm.arm, "#555")
        parts.append(
            f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="2"/>'
        )
        if arm.latency.p95 is not None:
            x = fx(math.log10(arm.latency.p95))
            parts.append(
                f'<line x1="{x:.1f}" y1="10" x2="{x:.1f}" y2="{_H - 30}" stroke="{color}" '
                'stroke-dasharray="4 3"/>'
            )
        parts.append(
            f'<text x="{_W - 200}" y="{24 + 16 * i}" fill="{color}" font-size="12">'
            f"{html.escape(arm.arm)} v{html.escape(str(arm.version))} "
            f"(p95 {_ms(arm.latency.p95)} ms)"
            "</text>"
        )
    parts += _axes(pad, f"{edges[0] * 1e3:.2f} ms", f"{edges[-1] * 1e3:.2f} ms", *y_labels)
    return _svg(parts, "Predict latency distributions")


def _tick(v: float) -> str:
    """An axis label a person reads at a glance: three significant digits, digits grouped, no
    exponent between 0.001 and 100,000 (``-1,238``, ``+0.0123``)."""
    size = abs(v)
    if size == 0:
        return "0"
    if not 1e-3 <= size < 1e5:
        return f"{v:+.3g}"
    decimals = max(0, 2 - math.floor(math.log10(size)))
    return f"{v:+,.{decimals}f}"


def _left_pad(y_labels: Sequence[str]) -> float:
    """The plot's left edge: room for the longest y label, right-aligned before the axis."""
    return max(_PAD, 10 + _CHAR_W * max(len(label) for label in y_labels))


def _hline(pad: float, y: float, color: str, label: str, dash: bool = False) -> str:
    style = ' stroke-dasharray="6 4"' if dash else ""
    return (
        f'<line x1="{pad}" y1="{y:.1f}" x2="{_W - 10}" y2="{y:.1f}" stroke="{color}"{style}/>'
        f'<text x="{pad + 4}" y="{y - 4:.1f}" fill="{color}" font-size="11">'
        f"{html.escape(label)}</text>"
    )


def _axes(pad: float, x_lo: str, x_hi: str, y_lo: str, y_hi: str) -> list[str]:
    esc = html.escape
    return [
        f'<line x1="{pad}" y1="{_H - 30}" x2="{_W - 10}" y2="{_H - 30}" stroke="#999"/>',
        f'<line x1="{pad}" y1="10" x2="{pad}" y2="{_H - 30}" stroke="#999"/>',
        f'<text x="{pad}" y="{_H - 12}" font-size="11">{esc(x_lo)}</text>',
        f'<text x="{_W - 10}" y="{_H - 12}" font-size="11" text-anchor="end">{esc(x_hi)}</text>',
        f'<text x="{pad - 4}" y="{_H - 30}" font-size="11" text-anchor="end">{esc(y_lo)}</text>',
        f'<text x="{pad - 4}" y="18" font-size="11" text-anchor="end">{esc(y_hi)}</text>',
    ]


def _svg(parts: Sequence[str], title: str) -> str:
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img"><title>{html.escape(title)}</title>\n{body}\n</svg>'
    )
