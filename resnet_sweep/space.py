"""A sweep's search space: parsed from Hydra's sweep syntax (`choice`, `range`, `interval`, `tag(log, ...)`,
`a,b`) into Optuna distributions, suggested through a trial's public suggest_* methods, and checked
before the study is touched: every value it can give (each choice and range point, both bounds of each
interval) must make a config that a trial can train, in some combination with the other dimensions'
values. A value that never can is refused in one line naming the key, the value and why; a combination
that still fails at run time fails its own trial only.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Transformer
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from resnet_sweep.config import ConfigError, validate

MAX_POINTS = 20  # a stepped range with more points is checked at its two ends
MAX_COMBINATIONS = 256  # combinations checked at most (a seeded sample of larger products)


def parse(overrides: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """(the swept keys' distributions, the other overrides as every trial gets them), as the official
    Optuna sweeper makes them: a sweep given twice takes its last value in its first place (the command
    line overrides hydra.sweeper.params; the order is the order of suggestion), and a fixed value of a
    key wins over a sweep of it. ConfigError for a sweep Optuna cannot take (a log interval from 0)."""
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
            raise ConfigError(f"{override.input_line} cannot be swept: {exc} (e.g. a log interval starts above 0: "
                              f"'optimizer.lr=tag(log,interval(1e-4,1))')") from None
    return {k: d for k, d in space.items() if k not in fixed}, list(fixed.values())


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


def candidates(distribution: BaseDistribution) -> list[Any]:
    """The values of `distribution` that are checked: every choice or range point, or an interval's bounds."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    assert isinstance(distribution, (IntDistribution, FloatDistribution))
    low, high, step = distribution.low, distribution.high, distribution.step
    if step is not None and round((high - low) / step) + 1 <= MAX_POINTS:
        points = [low + i * step for i in range(int(round((high - low) / step)) + 1)]
        return [int(p) if isinstance(distribution, IntDistribution) else p for p in points]
    return [low, high] if low != high else [low]


def _reason(exc: BaseException) -> str:
    """An error and its causes on one line, without OmegaConf's 'full_key' details or Hydra's search path."""
    parts: list[str] = []
    while exc is not None and len(parts) < 3:
        lines = []
        for line in str(exc).splitlines():
            if line.strip().startswith(("full_key:", "object_type", "reference_type", "Config search path")):
                break
            lines.append(line.strip())
        text = " ".join(x for x in lines if x).rstrip(".:")
        if text and text not in parts:
            parts.append(text)
        exc = exc.__cause__  # type: ignore[assignment]
    return ": ".join(parts) or "invalid"


def check(space: dict[str, BaseDistribution], written: dict[str, str], fixed: list[str],
          compose: Callable[[list[str]], DictConfig]) -> None:
    """Raise ConfigError for the first value of `space` that no combination makes trainable.

    `written` holds each key's sweep as the user wrote it; `fixed` the other overrides every trial gets;
    `compose(overrides)` composes a trial's config, as the launcher will (Hydra's load_sweep_config).
    Values of config groups (model=resnet20) and added keys (+x=...) are composed; other values are set
    on a composed config, which is much faster, and composed where setting one fails (a list, say).
    """
    if not space:
        return
    names = list(space)
    values = {name: candidates(d) for name, d in space.items()}
    bases: dict[tuple, DictConfig | BaseException] = {}  # the composed config per choice of groups
    outcomes = {c: _try(dict(zip(names, c)), fixed, compose, bases) for c in _combinations(names, values)}
    refused = []
    for i, name in enumerate(names):
        for value in values[name]:
            tried = [error for combination, error in outcomes.items() if combination[i] == value]
            if tried and all(error is not None for error in tried):
                refused.append((name, value, tried[0]))
    if refused:  # where every combination fails, the value whose key the error names is at fault
        name, value, error = next((r for r in refused if r[0].lstrip("+~") in _reason(r[2])), refused[0])
        raise ConfigError(_refusal(name, value, written.get(name, repr(space[name])), space[name], error))


def _combinations(names: list[str], values: dict[str, list[Any]]) -> list[tuple]:
    """Every combination of the values, or a seeded sample of MAX_COMBINATIONS with every value in some."""
    product = list(itertools.islice(itertools.product(*(values[n] for n in names)), 100_000))
    if len(product) > MAX_COMBINATIONS:
        product = random.Random(0).sample(product, MAX_COMBINATIONS)
        for i, name in enumerate(names):
            product += [tuple(v if j == i else values[n][0] for j, n in enumerate(names)) for v in values[name]]
    return list(dict.fromkeys(product))


def _try(chosen: dict[str, Any], fixed: list[str], compose: Callable[[list[str]], DictConfig],
         bases: dict[tuple, DictConfig | BaseException]) -> BaseException | None:
    """Why the config of this combination cannot train, or None if it can."""
    key = tuple((n, chosen[n]) for n in chosen if _composed(n))
    if key not in bases:
        try:
            bases[key] = compose([f"{n}={v}" for n, v in key] + fixed)
        except Exception as exc:  # noqa: BLE001 (Hydra's composition errors: the value at fault)
            bases[key] = exc
    if isinstance(base := bases[key], BaseException):
        return base
    cfg = base.copy()
    try:
        for name, value in chosen.items():
            if not _composed(name):
                try:
                    OmegaConf.update(cfg, name, value, merge=False)
                except OmegaConfBaseException:  # what setting cannot take, composing can (a list, say)
                    cfg = compose([f"{n}={v}" for n, v in chosen.items()] + fixed)
                    break
        with open_dict(cfg):
            del cfg["hydra"]
        validate(cfg)
    except Exception as exc:  # noqa: BLE001 (ConfigError, or OmegaConf's and Hydra's own)
        return exc
    return None


def _composed(name: str) -> bool:
    """A dimension that composition must handle: an added or deleted key, or a config group (no dot)."""
    return name.startswith(("+", "~")) or "." not in name


def _refusal(name: str, value: Any, written: str, distribution: BaseDistribution, error: BaseException) -> str:
    if isinstance(distribution, CategoricalDistribution) or (distribution.step is not None and
                                                             written.lstrip().startswith(("range", "choice"))):
        what = f"{name}={written} gives {name}={value}"
    else:
        bound = "lower" if value == distribution.low else "upper"
        what = f"{name}={written}: its {bound} bound {value}"
    return (f"{what}, which no trial can train: {_reason(error)}. Change the search space so that every value it "
            f"gives can train; nothing was created")


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
