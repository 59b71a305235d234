"""A claim checked on recorded runs: its effect size, a 95 % confidence interval and a verdict (no MLflow here).

A claim (an experiment's `claims:` in YAML, typed by config.ClaimConfig) compares a metric between two sets
of runs, `a` and `b`, each picked by config values (`max` / `min`: the largest or smallest value the runs
have), e.g. "the deepest plain net's training accuracy is below the shallowest one's". The effect is
mean(a) - mean(b) (of log10 of the metric with `scale: log10`, so `by` counts orders of magnitude), with
Welch's t interval: it does not assume that both sets vary alike (a plain net's seeds spread far more than
a ResNet's), and with 2-5 runs a side the t quantile, not the normal one, gives the interval its width.
The interval is over the runs on each side: the seeds, and any setting the claim leaves free.
Verdict: `holds` if the whole interval is past the threshold, `does not hold` if none of it is, else
`undecided`, as it is with one run on a side (no interval exists then).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping

HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "undecided"
LEVEL = 0.95
CLAIMS_TAG, VERDICT_TAG = "claims", "claim.{}"  # on a sweep's MLflow run: its claims (JSON), each verdict
EXACT = ("num_parameters", "flops_per_sample")  # a net's size: no seed changes it, no interval needed
FLOAT32_TINY = 1.4e-45  # the smallest positive float32: a ratio that underflowed to 0 is at most this


@dataclass(frozen=True)
class Verdict:
    name: str
    says: str
    verdict: str
    effect: float | None  # mean(a) - mean(b), in the claim's scale
    low: float | None  # the 95 % interval (None: fewer than 2 runs on a side)
    high: float | None
    n_a: int
    n_b: int
    note: str = ""
    unit: str = ""  # how the effect reads: accuracies in percentage points, log10 in orders of magnitude
    factor: float = 1.0

    @property
    def title(self) -> str:
        return f"`{self.name}`" + (f": {self.says}" if self.says else "")

    def interval(self) -> str:
        if self.effect is None:
            return "no runs on a side"
        f = self.factor
        if self.low is None:
            why = "one run on a side" if min(self.n_a, self.n_b) < 2 else "no spread"
            return f"{f * self.effect:+.3g} {self.unit} ({why}: no interval)"
        return f"{f * self.effect:+.3g} {self.unit} [{f * self.low:+.3g}, {f * self.high:+.3g}]"


def flat(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{model: {family: plain}} -> {"model.family": "plain"}."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _pick(runs: list[Mapping[str, str]], where: Mapping[str, Any]) -> list[int]:
    """Indexes of the runs whose params match `where`; `max` / `min` is the largest or smallest value among
    the runs the other keys pick (the deepest ResNet, not the deepest net, when the family is fixed)."""
    fixed = {k: str(v) for k, v in flat(where).items() if str(v) not in ("max", "min")}
    picked = [i for i, r in enumerate(runs) if all(str(r.get(k)) == v for k, v in fixed.items())]
    for key, extreme in ((k, v) for k, v in flat(where).items() if str(v) in ("max", "min")):
        values = [float(runs[i][key]) for i in picked if _number(runs[i].get(key))]
        want = (max if extreme == "max" else min)(values) if values else None
        picked = [i for i in picked if _number(runs[i].get(key)) and float(runs[i][key]) == want]
    return picked


def _number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _values(runs: list[Mapping[str, float]], picked: list[int], metric: str,
            log10: bool) -> tuple[list[float], list[str]]:
    """The metric of the picked runs that recorded a finite value (log10 of it if asked), and notes on what
    was left out (a failed run; a ratio 0/0 or x/0) or bounded (a ratio that underflowed to 0 counts as
    the smallest float32, FLOAT32_TINY: its log10, -44.9, is an upper bound, not a measurement)."""
    found = [runs[i].get(metric) for i in picked]
    values = [v for v in found if v is not None and math.isfinite(v)]
    notes = [f"{len(found) - len(values)} without a finite {metric} left out"] if len(values) < len(found) else []
    if log10:
        if zeros := sum(v <= 0 for v in values):
            notes.append(f"{zeros} of 0 (underflow) counted as {FLOAT32_TINY:g}")
        values = [math.log10(max(v, FLOAT32_TINY)) for v in values]
    return values, notes


def welch(a: list[float], b: list[float], level: float = LEVEL) -> tuple[float, float | None, float | None]:
    """mean(a) - mean(b) and Welch's t interval at `level` (None, None with fewer than 2 values on a side)."""
    effect = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return effect, None, None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:  # no spread on either side: Welch's degrees of freedom are 0/0, no interval exists
        return effect, None, None
    from scipy import stats  # here: tracking.py imports this module's tag names in every job

    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(va + vb)
    return effect, effect - half, effect + half


def mean_interval(values: list[float], level: float = LEVEL) -> tuple[float, float | None, float | None]:
    """The mean and its t interval at `level` (None, None for one value): the band of a curve over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def check(name: str, claim: Mapping[str, Any], params: list[Mapping[str, str]],
          metrics: list[Mapping[str, float]]) -> Verdict:
    """The verdict of one claim over runs given as their params and final metrics (the same order)."""
    log10 = claim.get("scale", "linear") == "log10"
    picked = {side: _pick(params, claim[side]) for side in ("a", "b")}
    (a, notes_a), (b, notes_b) = (_values(metrics, picked[side], claim["metric"], log10) for side in ("a", "b"))
    notes = [f"{side} picks no run" for side in ("a", "b") if not picked[side]]
    notes += [f"{side}: {n}" for side, found in (("a", notes_a), ("b", notes_b)) for n in found]
    says, (unit, factor) = str(claim.get("says") or ""), _unit(claim)
    if not a or not b:
        return Verdict(name, says, UNDECIDED, None, None, None, len(a), len(b), "; ".join(notes), unit, factor)
    effect, low, high = welch(a, b)
    if low is None and claim["metric"] in EXACT:  # the same net, the same size: the effect is exact
        low = high = effect
    elif low is None and len(a) > 1 and len(b) > 1:
        notes.append("no spread on either side: no interval")
    threshold = _threshold(claim)
    beyond: Callable[[float], bool] = (lambda x: x < threshold) if claim["a_is"] == "below" else (
        lambda x: x > threshold)
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        verdict = UNDECIDED
    elif beyond(low) and beyond(high):
        verdict = HOLDS
    elif not beyond(low) and not beyond(high):
        verdict = FAILS
    else:
        verdict = UNDECIDED
    note = "; ".join(notes)
    return Verdict(name, says, verdict, effect, low, high, len(a), len(b), note, unit, factor)


def _unit(claim: Mapping[str, Any]) -> tuple[str, float]:
    if claim.get("scale") == "log10":
        return "orders of magnitude", 1.0
    if str(claim["metric"]).endswith(("_acc", "_drop")):
        return "points", 100.0
    return "", 1.0


def _threshold(claim: Mapping[str, Any]) -> float:
    """What a - b must be past: -by for `a_is: below`, +by for `above` (0.0, never -0.0)."""
    return float(claim.get("by", 0.0)) * (-1 if claim["a_is"] == "below" else 1) or 0.0


def check_all(claims: Mapping[str, Mapping[str, Any]], params: list[Mapping[str, str]],
              metrics: list[Mapping[str, float]]) -> list[Verdict]:
    return [check(name, claim, params, metrics) for name, claim in claims.items()]


def table(verdicts: list[Verdict], claims: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """Rows for report.to_markdown: the claim, its effect with the interval, the runs, the verdict."""
    rows = []
    for v in verdicts:
        c = claims[v.name]
        rows.append({"claim": v.title, "metric": f"{c['metric']}" + (
                         " (log10)" if c.get("scale") == "log10" else ""),
                     "effect a - b (95 % CI)": v.interval(),
                     "needs": f"a - b {'<' if c['a_is'] == 'below' else '>'} {v.factor * _threshold(c):g} {v.unit}",
                     "runs a / b": f"{v.n_a} / {v.n_b}" + (f" ({v.note})" if v.note else ""),
                     "verdict": f"**{v.verdict}**"})
    return rows
