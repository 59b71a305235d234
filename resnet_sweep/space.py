"""A sweep's search space: parsed from Hydra's sweep syntax (`choice`, `range`, `interval`, `tag(log, ...)`,
`a,b`) into Optuna distributions, suggested through a trial's public suggest_* methods, and the values to
check before the study is touched: every value it can give (each choice and range point, both bounds of each
interval) must make a config that a trial can train (preflight.py).
"""

from __future__ import annotations

from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from resnet_sweep.config import ConfigError

MAX_POINTS = 20  # a stepped range with more points is checked at its two ends


def parse(overrides: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """(the swept keys' distributions, the other overrides as every trial gets them), as the official
    Optuna sweeper makes them: a sweep given twice takes its last value in its first place (the command
    line overrides hydra.sweeper.params; the order is the order of suggestion), and a fixed value of a
    key wins over a sweep of it, added (+key) or not (a swept key=... before +key=... does not compose).
    ConfigError for a sweep Optuna cannot take (a log interval from 0)."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed[key] = override.input_line or f"{key}={override.get_value_element_as_str()}"
            continue
        try:
            space[key] = _distribution(override)
        except ValueError as exc:
            value = override.value()
            advice = ("an interval gives its lower bound first: interval(LOW,HIGH)" if override.is_interval_sweep()
                      and value.start > value.end else "e.g. a log interval starts above 0: "
                      "'optimizer.lr=tag(log,interval(1e-4,1))'")
            raise ConfigError(f"{override.input_line} cannot be swept: {str(exc).rstrip('.')} ({advice})") from None
    bare = {k.lstrip("+~") for k in fixed}
    return {k: d for k, d in space.items() if k.lstrip("+~") not in bare}, list(fixed.values())


def _distribution(override: Any) -> BaseDistribution:
    value = override.value()
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(value.start, value.end, log=log)
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if not values:
        raise ValueError("it gives no value")
    if (override.is_range_sweep() and not value.shuffle and all(type(v) is int for v in values)
            and len(values) > 1 and len({b - a for a, b in zip(values, values[1:])}) == 1):
        return IntDistribution(min(values), max(values), step=abs(values[1] - values[0]))
    return CategoricalDistribution(values)


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """The trial's value for `name`, through the public suggest_* method that `distribution`'s kind has."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    suggest_kind = trial.suggest_int if isinstance(distribution, IntDistribution) else trial.suggest_float
    return suggest_kind(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def grid(distribution: BaseDistribution) -> list[Any]:
    """Every value of a discrete distribution, for the grid sampler."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    raise ConfigError(f"a grid sweeps choices and ranges, not {short(distribution)}: use choice(...) or range(...)")


def candidates(name: str, distribution: BaseDistribution, written: str) -> list[tuple[Any, str]]:
    """The values of `distribution` that are checked (every choice or range point, or an interval's two
    bounds), each with how a refusal names it, e.g. `optimizer.lr=interval(0, 1): its lower bound 0`."""
    if isinstance(distribution, CategoricalDistribution):
        points = list(distribution.choices)
    else:
        low, high, step = distribution.low, distribution.high, distribution.step
        points = list(dict.fromkeys([low, high]))
        if step is not None and round((high - low) / step) + 1 <= MAX_POINTS:
            points = [low + i * step for i in range(int(round((high - low) / step)) + 1)]
            points = [int(p) for p in points] if isinstance(distribution, IntDistribution) else points
    bound: dict[Any, str] = {}  # an interval's ends are named as bounds; other values as what it gives
    if not isinstance(distribution, CategoricalDistribution) and not (
            distribution.step is not None and written.lstrip().startswith(("range", "choice"))):
        bound = {distribution.high: "its upper bound", distribution.low: "its lower bound"}  # one value: lower
    return [(v, f"{name}={written}: {bound[v]} {v}" if v in bound else f"{name}={written} gives {name}={v}")
            for v in points]


def short(distribution: BaseDistribution | str) -> str:
    """A distribution (or its JSON) as the search-space syntax writes it, e.g. tag(log, interval(0.01, 0.1))."""
    d = optuna.distributions.json_to_distribution(distribution) if isinstance(distribution, str) else distribution
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return f"choice({', '.join(map(str, d.choices))})"
    text = f"interval({d.low}, {d.high})" if d.step is None else f"{d.low} to {d.high} by {d.step}"
    return f"tag(log, {text})" if d.log else text


def changes(old: dict[str, str], new: dict[str, str]) -> str:
    """What differs between two search spaces, e.g. `optimizer.lr interval(0.01, 0.1) -> interval(0.5, 1.0)`."""
    found = [f"{n} {short(old[n])} -> {short(new[n])}" for n in old if n in new and old[n] != new[n]]
    found += [f"{n} added" for n in new if n not in old] + [f"{n} no longer swept" for n in old if n not in new]
    return "; ".join(found)


def compatible(old: str, new: str) -> bool:
    try:
        optuna.distributions.check_distribution_compatibility(optuna.distributions.json_to_distribution(old),
                                                              optuna.distributions.json_to_distribution(new))
        return True
    except ValueError:
        return False


def describe(space: dict[str, str]) -> str:
    """A recorded search space ({name: distribution JSON}) as the syntax writes it, one key after another."""
    return " ".join(f"{name}={short(d)}" for name, d in space.items()) or "(none)"
