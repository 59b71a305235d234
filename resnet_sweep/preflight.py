"""What a sweep's command gets wrong, found before the study is touched: the sweeper's settings, the stores,
and which values of the search space can train: every value a sweep can give (space.candidates) must make a config that a trial can train, in some combination with the other
dimensions' values. A value that never can is refused in one line naming the key, the value and why; a
combination that still fails at run time fails its own trial only. Knows nothing of Optuna: it composes
configs through the function it is handed (Hydra's, in the sweeper) and validates them (config.py).
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from resnet_sweep import stores
from resnet_sweep.config import ConfigError, listed, quoted, validate

MAX_COMBINATIONS = 256  # combinations checked at most (a seeded sample of larger products)
MAX_STUDY_NAME = 512  # Optuna's column for study names (MAX_INDEXED_STRING_LENGTH)


def settings(s: Any, unknown: list[str], takes: list[str], config: DictConfig, pruning: str | None,
             launcher_problem: str | None) -> tuple[DictConfig, Any]:
    """Raise ConfigError for what a sweep's command gets wrong before anything is created: the sweeper's
    settings `s` (`unknown`: those it does not take; `takes`: those it does), the config as the jobs will
    see it, a pruner (its name, None for none) with several objectives, the stores, the launcher's
    settings (`launcher_problem`: launchers.check). Returns (the jobs' config, validated)."""
    if unknown:
        raise ConfigError(f"hydra.sweeper.{unknown[0]} is not a setting of the sweeper; it takes {', '.join(takes)}")
    if s.n_trials < 1:  # an int: the schema says so
        raise ConfigError(f"hydra.sweeper.n_trials={s.n_trials}: give the number of trials the study "
                          f"should hold when the sweep ends, >= 1")
    if s.n_jobs is not None and s.n_jobs < 1:
        raise ConfigError(f"hydra.sweeper.n_jobs={s.n_jobs}: trials at once, >= 1 (or null: as many as the "
                          f"launcher runs)")
    for key in ("timeout", "trial_timeout", "stall_timeout"):
        if (value := getattr(s, key)) is not None and not value > 0:
            raise ConfigError(f"hydra.sweeper.{key}={value}: give a number of seconds > 0, or null for none")
    if not stores.is_database(str(s.storage)):
        raise ConfigError(f"hydra.sweeper.storage={s.storage}: give a database URL (sqlite:///FILE, "
                          f"postgresql://...): trials beat for each other there, across processes")
    job_config = config.copy()
    with open_dict(job_config):
        del job_config["hydra"]
    conf = validate(job_config, sweep_direction=s.direction)
    if len(conf.objective) > 1 and pruning is not None:
        raise ConfigError(f"pruner={pruning}: Optuna prunes only single-objective studies, and "
                          f"objective={listed(conf.objective)} has {len(conf.objective)}; add pruner=none")
    if test := next((name for name in conf.objective if name.startswith("test_")), None):
        instead = quoted("objective", [n.replace("test_", "val_") for n in conf.objective])
        raise ConfigError(f"objective={test}: a sweep must not choose hyperparameters on the test "
                          f"set, or the test accuracy of its best trial is no longer an unbiased estimate. Sweep "
                          f"on {instead}" + (" (or val_loss with hydra.sweeper.direction=minimize)" if len(
                              conf.objective) == 1 else "") + "; every run still records test_acc and test_loss")
    if len(str(s.study_name)) > MAX_STUDY_NAME:
        raise ConfigError(f"hydra.sweeper.study_name is {len(str(s.study_name))} characters long; Optuna "
                          f"keeps at most {MAX_STUDY_NAME}: choose a shorter one (or a shorter "
                          f"tracking.experiment, which the default study name starts with)")
    stores.check_store(str(s.storage), "hydra.sweeper.storage")
    if conf.tracking.enabled:
        stores.check_store(conf.tracking.uri, "tracking.uri")
    if launcher_problem is not None:
        raise ConfigError(launcher_problem)
    return job_config, conf


def check(candidates: dict[str, list[tuple[Any, str]]], fixed: list[str],
          compose: Callable[[list[str]], DictConfig]) -> None:
    """Raise ConfigError for the first value that no combination makes trainable.

    `candidates` holds each swept key's values, each with how a refusal names it (space.candidates);
    `fixed` the other overrides every trial gets; `compose(overrides)` composes a trial's config, as the
    launcher will (Hydra's load_sweep_config). Values of config groups (model=resnet20) and added keys
    (+x=...) are composed; other values are set on a composed config, which is much faster, and composed
    where setting one fails (a list, say).
    """
    if not candidates:
        return
    names = list(candidates)
    values = {name: [value for value, _ in pairs] for name, pairs in candidates.items()}
    bases: dict[tuple, DictConfig | BaseException] = {}  # the composed config per choice of groups
    outcomes = {c: _try(dict(zip(names, c)), fixed, compose, bases) for c in _combinations(names, values)}
    refused = []
    for i, name in enumerate(names):
        for value, what in candidates[name]:
            tried = [error for combination, error in outcomes.items() if combination[i] == value]
            if tried and all(error is not None for error in tried):
                refused.append((name, what, tried[0]))
    if refused:  # where every combination fails, the value whose key the error names first is at fault
        named = [(at, r) for r in refused if (at := _named_at(_reason(r[2]), r[0].lstrip("+~"))) is not None]
        name, what, error = min(named, key=lambda pair: pair[0])[1] if named else refused[0]
        raise ConfigError(f"{what}, which no trial can train: {_reason(error)}. Change the search space so that "
                          f"every value it gives can train; nothing was created")


def whole_numbers(name: str, written: str, low: float, cfg: DictConfig) -> None:
    """Raise ConfigError where an interval sweeps a key that takes whole numbers: Hydra reads an interval's
    bounds as floats (interval(8,33) gives 8.0 to 33.0), which such a key refuses, and int(interval(8,33))
    gives whole numbers. Told apart by the key's type: it refuses the float bound and takes it as an int."""
    key = name.lstrip("+~")
    if float(low).is_integer() and not _takes(cfg, key, low) and _takes(cfg, key, int(low)):
        fix = re.sub(r"interval\(([^()]*)\)", r"int(interval(\1))", written)
        raise ConfigError(f"{name}={written} gives floats (Hydra reads an interval's bounds as floats), and {name} "
                          f"takes whole numbers: write '{name}={fix}', or list its values with choice(...) or range(...)")


def _takes(cfg: DictConfig, key: str, value: Any) -> bool:
    try:
        OmegaConf.update(cfg.copy(), key, value, merge=False)
        return True
    except OmegaConfBaseException:
        return False


def _named_at(text: str, key: str) -> int | None:
    """Where `text` first names `key` itself (optimizer.lrr does not name optimizer.lr), or None."""
    found = re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", text)
    return found.start() if found else None


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
