"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Plain dataclasses, free of Hydra (presets.py registers them there). The YAML presets in conf/ extend them, so an unknown key, a wrong type or an unknown enum
value fails when Hydra composes the config; values that a type cannot express (a depth that is not
6n+2, a negative learning rate) are checked in `__post_init__`, which runs when the task turns the
composed config into these objects, before any data is loaded or any run is recorded.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import functools
import hashlib
import importlib
import inspect
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Optional

from omegaconf import ListConfig, MISSING, DictConfig, OmegaConf, ValidationError

from resnet_sweep import cache
from resnet_sweep.claims import flat
from resnet_sweep.errors import UserError
from resnet_sweep.architectures import ACTIVATION_NAMES, ARTICLE_DEPTH, IMAGENET_DEPTHS, cifar_depths

Family = enum.Enum("Family", "plain resnet")
Layout = enum.Enum("Layout", "cifar imagenet article")
Activation = enum.Enum("Activation", " ".join(ACTIVATION_NAMES))
Norm = enum.Enum("Norm", "batch none")
Shortcut = enum.Enum("Shortcut", "A B")
Init = enum.Enum("Init", "kaiming xavier normal torch")
Stem = enum.Enum("Stem", "auto small large")
DatasetName = enum.Enum("DatasetName", "digits mnist fashion_mnist cifar10")
SchedulerName = enum.Enum("SchedulerName", "none multistep cosine plateau")
# Metrics a job can hand to the sweeper as its objective (their values after the last epoch).
Metric = enum.Enum("Metric", "val_acc val_loss train_acc train_loss test_acc test_loss")
# What a net costs (fewer is better), recorded on every run: also objectives, beside a metric (a Pareto front)
COSTS = ("num_parameters", "flops_per_sample", "train_seconds")
OBJECTIVES = (*Metric.__members__, *COSTS)
Precision = enum.Enum("Precision", "fp32 bf16 fp16")


MAX_EXPERIMENT_NAME = 500  # MLflow's limit (mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH)


class ConfigError(UserError, ValueError):
    """A value that composes but cannot be trained; the message names the key and the valid values."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    family: Family = Family.resnet  # plain = the same net with the shortcuts removed
    layout: Layout = Layout.cifar  # cifar: 6n+2, 16/32/64 channels; imagenet: 18..152; article: the seed's net
    depth: int = 20  # weighted layers (convs + the final linear), as the paper counts them
    activation: Activation = Activation.relu
    norm: Norm = Norm.batch
    shortcut: Shortcut = Shortcut.A  # A: zero-padded identity (parameter-free); B: 1x1 projection
    preactivation: bool = False  # He et al. 2016: norm and activation before each conv, nothing after the sum
    init: Init = Init.kaiming
    init_std: float = 0.01  # used by init=normal
    stem: Stem = Stem.auto  # auto: 7x7/2 + max-pool when the input side is >= 64 px, else 3x3/1

    def __post_init__(self) -> None:
        if self.layout == Layout.cifar:
            _check((self.depth - 2) % 6 == 0 and self.depth >= 8,
                   f"model.depth={self.depth} is not a CIFAR-style depth 6n+2; valid: "
                   f"{', '.join(map(str, cifar_depths(116)))}, ... "
                   f"(or model.layout=imagenet with depth {sorted(IMAGENET_DEPTHS)})")
        elif self.layout == Layout.imagenet:
            _check(self.depth in IMAGENET_DEPTHS,
                   f"model.depth={self.depth} is not an ImageNet-style depth; valid: {sorted(IMAGENET_DEPTHS)} "
                   "(or model.layout=cifar with a depth 6n+2: 8, 14, 20, 32, 44, 56, 110, ...)")
        else:
            _check(self.depth == ARTICLE_DEPTH,
                   f"model.depth={self.depth}: the article's net has {ARTICLE_DEPTH} weighted layers; "
                   f"set model.depth={ARTICLE_DEPTH} or choose model.layout=cifar|imagenet")
        _check(self.init_std > 0, f"model.init_std={self.init_std} must be > 0")


@dataclass
class DataConfig:
    name: DatasetName = DatasetName.digits
    root: str = "data"  # where torchvision datasets live or are downloaded to
    download: bool = True  # try to download a missing torchvision dataset (needs the network)
    input_shape: list[int] = field(default_factory=lambda: [1, 8, 8])  # (C, H, W), checked on load
    num_classes: int = 10
    mean: list[float] = field(default_factory=lambda: [0.3053])  # per channel, of pixels in [0, 1] (digits)
    std: list[float] = field(default_factory=lambda: [0.3760])
    val_fraction: float = 0.1  # held out of the training set, seeded by split_seed
    split_seed: int = 0  # fixed apart from `seed`, so every trial validates on the same images
    train_subset: Optional[int] = None  # cap on training examples after the split, for quick studies
    # cap on validation examples (the first of the fixed split), so that a quick study on a subset does not
    # spend as long validating as training; the test set is always whole
    val_subset: Optional[int] = None
    augment: bool = False  # pad-4 random crop + horizontal flip (CIFAR-10), on the device

    def __post_init__(self) -> None:
        _check(len(self.input_shape) == 3, f"data.input_shape={self.input_shape} must be [C, H, W]")
        _check(len(self.mean) == len(self.std) == self.input_shape[0],
               f"data.mean and data.std need one value per channel ({self.input_shape[0]})")
        _check(all(s > 0 for s in self.std), f"data.std={self.std} must be > 0")
        _check(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        _check(self.train_subset is None or self.train_subset > 0,
               f"data.train_subset={self.train_subset} must be a positive count or null (all)")
        _check(self.val_subset is None or self.val_subset > 0,
               f"data.val_subset={self.val_subset} must be a positive count or null (all)")


# The settings each scheduler takes, with the value used when a preset leaves one out. Any other setting
# given is an error, never silently dropped. (Optimizers name their class instead: OptimizerConfig.)
SCHEDULER_SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "multistep": {"milestones": [0.5, 0.75], "gamma": 0.1},
    "cosine": {"min_lr": 0.0},
    "plateau": {"factor": 0.1, "patience": 5, "min_lr": 0.0, "monitor": Metric.val_loss},
}


def settings(node: Any, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The settings `node`'s choice takes, as given, else its default from `table`."""
    own = table[node.name.name]
    return {k: default if getattr(node, k) is None else getattr(node, k) for k, default in own.items()}


def _own_settings_only(group: str, node: Any, table: dict[str, dict[str, Any]]) -> None:
    """Reject settings that `node`'s choice does not take."""
    name = node.name.name
    own = table[name]
    takes = list(own)
    for key in sorted({k for settings in table.values() for k in settings} - set(own)):
        value = getattr(node, key)
        users = [f"{group}={n}" for n, settings in table.items() if key in settings]
        _check(value is None, f"{group}.{key}={getattr(value, 'name', value)} does nothing for {group}.name={name}, "
                              f"which takes {', '.join(takes) or 'no settings'}: drop it, or choose "
                              f"{' or '.join(users)}, which take{'s' if len(users) == 1 else ''} it")


@dataclass
class OptimizerConfig:
    """An optimizer as its preset names it (conf/optimizer/*.yaml): `_target_`, a class such as
    torch.optim.Adam, and its keyword arguments, every other key; adding an optimizer is one YAML file.
    `of` checks each key against the class's signature (`arguments`), before any training."""
    target: str = "torch.optim.SGD"
    lr: float = 0.1
    settings: dict[str, Any] = field(default_factory=dict)  # the other keyword arguments, e.g. momentum

    @property
    def name(self) -> str:
        """sgd, adam, adamw: the class's name, as the runs' params show it."""
        return self.target.rpartition(".")[2].lower()

    @classmethod
    def of(cls, node: dict[str, Any]) -> OptimizerConfig:
        given = dict(node)
        target = given.pop("_target_", None)
        _check("name" not in given, f"optimizer.name={given.get('name')}: an optimizer is named by its preset and "
                                    f"class now (optimizer._target_); choose optimizer={given.get('name')} instead")
        _check(isinstance(target, str) and re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", target) is not None,
               f"optimizer._target_={target} must name an optimizer's class, e.g. torch.optim.SGD; or choose a "
               f"preset: optimizer=sgd, adam or adamw")
        takes = arguments(target, "optimizer._target_")
        untaken = [key for key in given if key not in takes]
        if untaken:
            raise ConfigError(_not_taken(untaken, given, target, list(takes)))
        for key, value in given.items():
            _check(_is(takes[key], value), f"optimizer.{key}={value} must be {_KINDS[takes[key]][1]}")
        lr, wd, momentum = given.pop("lr", None), given.get("weight_decay", 0), given.get("momentum", 0)
        _check(_is("number", lr) and lr > 0, f"optimizer.lr={lr} must be > 0 (e.g. 0.1 for sgd, 1e-3 for adam)")
        _check(_is("number", wd) and wd >= 0, f"optimizer.weight_decay={wd} must be >= 0")
        _check(_is("number", momentum) and 0 <= momentum < 1, f"optimizer.momentum={momentum} must be in [0, 1)")
        return cls(target, float(lr), given)


# What an argument takes, told by its default: (is it, how a refusal says it)
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "list": (lambda v: isinstance(v, (list, tuple)), "a list, e.g. [0.9,0.999]"),
    "any": (lambda v: True, "anything"),
}


def _is(kind: str, value: Any) -> bool:
    return _KINDS[kind][0](value)


def _kind(default: Any) -> str:
    return next((k for k in ("bool", "number", "list") if default is not None and _is(k, default)), "any")


def _not_taken(keys: list[str], given: dict[str, Any], target: str, takes: list[str]) -> str:
    """Why optimizer.`keys` are refused, with what works: a close name (added with + where the config has
    none), dropping them, or the presets that set the first."""
    key, value, more = keys[0], given[keys[0]], "".join(f" nor {k}" for k in keys[1:])
    close = [("" if k in given else "+") + f"optimizer.{k}" for k in difflib.get_close_matches(key, takes, n=1)]
    others = [f"optimizer={p.stem}" for p in sorted((Path(__file__).parent / "conf" / "optimizer").glob("*.yaml"))
              if key in OmegaConf.load(p)]
    return (f"optimizer.{key} is not a config key: optimizer._target_={target} takes no argument {key} (given "
            f"{value}){more}; " + (f"did you mean {close[0]}? It" if close else "it")
            + f" takes {', '.join(takes)}. Drop {'them' if more else 'it'}: leave out the +optimizer.{key}=... that "
            f"added {'them' if more else 'it'}, or where a preset sets {'them' if more else 'it'}, add ("
            + " ".join(f"~optimizer.{k}" for k in keys) + ")"
            + (f", or choose {' or '.join(others)}, which sets {key} (then set it without the +: "
               f"optimizer.{key}=...)" if others else ""))


@functools.cache
def arguments(target: str, key: str) -> dict[str, str]:
    """The keyword arguments of the class `target` names, but its first (an optimizer's params), each with
    the kind of value it takes (_KINDS, told by its default); ConfigError naming `key` where no class can be
    imported. A sweep's own process never imports torch (it runs for days on a login node, and small):
    there a child process reads them, once per version of the package the class is in (kept in the cache
    folder)."""
    if target.partition(".")[0] in sys.modules:
        return _arguments(target, key)
    try:
        kept: Path | None = cache.folder() / f"signature-{target}-{version(target.partition('.')[0])}.json"
    except Exception:  # noqa: BLE001 (not of an installed package, or no home folder: read it each time)
        kept = None
    if (known := cache.read_json(kept)) is not None:
        return known
    child = subprocess.run([sys.executable, "-m", "resnet_sweep.config", target, key], capture_output=True, text=True)
    said = child.stderr.strip().splitlines() or [f"exit code {child.returncode}"]
    if child.returncode == NO_CLASS:
        raise ConfigError(said[-1])
    if child.returncode != 0:  # not the config's fault: this Python, its packages
        raise RuntimeError(f"reading the arguments of {target} in `{sys.executable} -m resnet_sweep.config` "
                           f"failed: {said[-1]}")
    found = child.stdout.strip().splitlines()[-1]  # the last line: whatever an import printed comes before
    cache.keep(kept, lambda out: out.write(found.encode()))
    return json.loads(found)


def named_class(target: str) -> Any:
    """The class (or function) a dotted name such as torch.optim.SGD names, imported."""
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _arguments(target: str, key: str) -> dict[str, str]:
    try:
        parameters = list(inspect.signature(named_class(target)).parameters.values())[1:]
    except Exception as exc:  # noqa: BLE001 (no such module or class, or not a callable: named in the error)
        module, _, name = target.rpartition(".")
        advice = "name one such as torch.optim.SGD"
        with contextlib.suppress(Exception):  # a module that imports: the name in it closest to the one given
            close = difflib.get_close_matches(name, dir(importlib.import_module(module)))
            advice = f"did you mean {module}.{close[0]}?"
        raise ConfigError(f"{key}={target} names no class that can be imported ({type(exc).__name__}: {exc}); "
                          f"{advice}") from None
    return {p.name: _kind(p.default) for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.none
    milestones: Optional[list[float]] = None  # multistep: fractions of the epochs
    gamma: Optional[float] = None  # multistep: lr factor at each milestone
    factor: Optional[float] = None  # plateau: lr factor when the monitored metric stalls
    patience: Optional[int] = None  # plateau: epochs without improvement before lowering the lr
    min_lr: Optional[float] = None  # cosine floor and plateau floor
    monitor: Optional[Metric] = None  # plateau: the metric it watches (loss: lower is better)
    # every scheduler: the lr rises linearly from lr/W to the scheduled lr over the first W optimizer steps,
    # W = warmup_epochs x steps per epoch (fractions allowed); 0: no warm-up
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        _own_settings_only("scheduler", self, SCHEDULER_SETTINGS)
        _check(self.warmup_epochs >= 0, f"scheduler.warmup_epochs={self.warmup_epochs} must be >= 0 (0: no warm-up)")
        _check(self.milestones is None or all(0 < m < 1 for m in self.milestones),
               f"scheduler.milestones={self.milestones} must be fractions of the training in (0, 1)")
        _check(self.monitor is None or self.monitor.name not in ("test_acc", "test_loss"),
               "scheduler.monitor may not watch the test set; use val_loss, val_acc, train_loss or train_acc")


@dataclass
class TrainerConfig:
    epochs: int = 15
    batch_size: int = 128
    eval_batch_size: int = 1024
    device: str = "auto"  # auto: cuda, then mps, then cpu; or any torch device string
    threads: Optional[int] = None  # torch intra-op threads on the CPU; null: torch's default
    finite_check_every: int = 1  # steps between non-finite-loss checks (each check syncs a GPU)
    save_best: bool = False  # keep the checkpoint of the best val_acc epoch and test that one
    grad_norms: bool = True  # per-layer weight-gradient norms at init and each epoch (diagnostics.py)
    precision: Precision = Precision.fp32  # bf16/fp16: autocast for forward and loss (fp16 adds loss scaling)
    # NHWC memory format for the model and each batch; null: the faster here, measured once (memory_format.py)
    channels_last: Optional[bool] = None
    compile: bool = False  # torch.compile the model (pays only when the trial outlasts the compile time)
    grad_probe_size: int = 128  # examples in the fixed, seeded batch for the init record
    # also test after every epoch (epoch_test_loss/epoch_test_acc: learning curves, time to an accuracy); never
    # used to choose anything, and each epoch pays for one more pass over the test split
    eval_test: bool = False

    def __post_init__(self) -> None:
        _check(self.epochs > 0, f"trainer.epochs={self.epochs} must be > 0")
        _check(self.batch_size > 0, f"trainer.batch_size={self.batch_size} must be > 0")
        _check(self.finite_check_every > 0, "trainer.finite_check_every must be > 0")
        _check(self.threads is None or self.threads > 0, f"trainer.threads={self.threads} must be > 0 or null")
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
               f"trainer.device={self.device!r}: use auto, cpu, cuda, cuda:N or mps")


@dataclass
class TrackingConfig:
    enabled: bool = True
    # Absolute, so every job of a sweep, wherever it runs, writes to the one database.
    uri: str = MISSING
    experiment: str = "resnet_sweep"
    artifact_location: str = MISSING  # a folder; the experiment's artifacts go under it

    def __post_init__(self) -> None:
        _check(0 < len(self.experiment) <= MAX_EXPERIMENT_NAME,
               f"tracking.experiment is {len(self.experiment)} characters long; MLflow takes 1 to "
               f"{MAX_EXPERIMENT_NAME}: choose a shorter name")


@dataclass
class SweepConfig:
    """What a job of a sweep knows of its Optuna trial; the sweeper sets study, trial and parent_run."""

    study: Optional[str] = None
    trial: Optional[int] = None  # the trial's number in the study (= the job's number)
    parent_run: Optional[str] = None  # the study's MLflow run: the job's run becomes its child
    seeds: int = 1  # repeats of each trial over seeds seed, seed+1, ...: objective = their mean

    def __post_init__(self) -> None:
        _check(self.seeds >= 1, f"sweep.seeds={self.seeds} must be >= 1")


@dataclass
class LesionConfig:
    """After training, delete blocks at test time and record the test accuracy left (resnet_sweep/lesion.py)."""

    enabled: bool = False
    draws: int = 5  # random sets of blocks per number of deleted blocks
    max_removed: int = 10  # delete up to this many blocks at once

    def __post_init__(self) -> None:
        _check(self.draws >= 1, f"lesion.draws={self.draws} must be >= 1")
        _check(self.max_removed >= 1, f"lesion.max_removed={self.max_removed} must be >= 1")


# What a claim may compare: the objective metrics after the last epoch, the first/last weight-gradient norm
# ratio after the last epoch and at initialisation, a lesioned net's intact accuracy and the mean accuracy
# one deleted block costs it (report.py derives the last two from what the run recorded).
CLAIM_METRICS = (*Metric.__members__, *COSTS, "grad_ratio_first_last", "grad_ratio_at_init", "lesion.intact_acc",
                 "lesion.single_drop")


@dataclass
class ClaimConfig:
    """A finding an experiment states as data, checked by the report on every run of it (claims.py):
    mean(metric over runs `a`) - mean(over runs `b`) is below -by or above +by, with 95 % confidence."""

    says: str = ""  # the claim in words
    metric: str = "train_acc"
    a: dict[str, Any] = field(default_factory=dict)  # config values picking runs, e.g. {model: {depth: max}}
    b: dict[str, Any] = field(default_factory=dict)
    a_is: str = "below"  # below | above
    by: float = 0.0  # margin, >= 0 (with scale log10: orders of magnitude)
    scale: str = "linear"  # linear | log10 (for ratios)

    def check(self, name: str, cfg: DictConfig) -> None:
        """Refuse what can never be evaluated, naming claims.<name> (the keys of a and b must exist in cfg)."""
        at = f"claims.{name}"
        _check(self.metric in CLAIM_METRICS, f"{at}.metric={self.metric!r}: choose one of {', '.join(CLAIM_METRICS)}")
        _check(self.a_is in ("below", "above"), f"{at}.a_is={self.a_is!r}: choose below or above")
        _check(self.scale in ("linear", "log10"), f"{at}.scale={self.scale!r}: choose linear or log10")
        _check(isinstance(self.by, (int, float)) and self.by >= 0, f"{at}.by={self.by}: a margin >= 0 (a_is says on which side)")
        for side in ("a", "b"):
            _check(bool(getattr(self, side)), f"{at}.{side} is empty: give the config values that pick its runs, "
                                              f"e.g. {side}: {{model: {{family: plain, depth: max}}}}")
            for key in flat(getattr(self, side)):
                _check(OmegaConf.select(cfg, key, default=MISSING) is not MISSING,
                       f"{at}.{side} picks runs by {key}, which is not a config key: use keys that "
                       f"`python -m resnet_sweep --cfg job` shows, e.g. model.depth")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # an open node, each preset naming its class and arguments: an OptimizerConfig once validated
    optimizer: Any = field(default_factory=dict)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    lesion: LesionConfig = field(default_factory=LesionConfig)
    seed: int = 0
    # what the task returns to the sweeper (after the last epoch): one of OBJECTIVES, or a list of them (several
    # objectives: the sweep finds their Pareto front); validate makes it a list of names
    objective: Any = "val_acc"
    report: bool = False  # draw the report (resnet_sweep.report) when a sweep ends
    # findings checked at a sweep's end (claims.py); untyped here (OmegaConf refuses a dict assigned to a
    # dataclass value, as `+claims.x={...}` on the command line does): validate types each as ClaimConfig
    claims: dict[str, Any] = field(default_factory=dict)


def to_typed(node: DictConfig, at: str = "") -> Any:
    """A composed (sub)config as its dataclass, running every `__post_init__` check; ConfigError for a key
    its schema does not have, named under `at` (the node's place, e.g. `model.`)."""
    try:
        typed = OmegaConf.to_object(node)
    except ValidationError as exc:  # OmegaConf wraps what __post_init__ raised; show just that
        if isinstance(exc.__cause__, ConfigError):
            raise exc.__cause__ from None
        raise
    _no_unknown_keys(typed, at)
    return typed


def _no_unknown_keys(typed: Any, at: str) -> None:
    """A key added with + (`+optimizer.lrr=0.5`, as Hydra advises for a key it does not know) becomes an
    attribute no job reads: OmegaConf.to_object keeps it without a word. Refuse it, naming the key."""
    if not is_dataclass(typed):
        return
    names = [f.name for f in fields(typed)]
    for key in vars(typed):
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"{at}{key} is not a config key, so nothing would read it: "
                              + (f"did you mean {at}{close[0]}? " if close else "")
                              + f"{at.rstrip('.') or 'the config'} takes {', '.join(names)}")
    for name in names:
        _no_unknown_keys(getattr(typed, name), f"{at}{name}.")


def validate(cfg: DictConfig, sweep_direction: Any = None) -> Config:
    """The composed config as typed objects; raises ConfigError on a value no type can rule out.

    `sweep_direction` (the Optuna sweeper's, when sweeping) must agree with the objective metric.
    """
    conf = to_typed(cfg)
    assert isinstance(conf, Config)
    conf.optimizer = OptimizerConfig.of(conf.optimizer)
    for name, claim in conf.claims.items():
        known = {f.name for f in fields(ClaimConfig)}
        _check(isinstance(claim, dict) and set(claim) <= known,
               f"claims.{name}: a claim takes {', '.join(sorted(known))}; got {claim!r}")
        ClaimConfig(**claim).check(name, cfg)
    given = conf.objective
    # a sweep may not select on the test set (the sweeper refuses test_*): not offered there
    offered = ", ".join(o for o in OBJECTIVES if sweep_direction is None or not o.startswith("test_"))
    _check(isinstance(given, (str, enum.Enum, list, tuple)), f"objective={given!r}: choose one of {offered}, "
                                                            f"or a list of different ones")
    names = [given] if isinstance(given, (str, enum.Enum)) else list(given)
    conf.objective = [getattr(n, "name", str(n)) for n in names]
    _check(bool(conf.objective) and all(n in OBJECTIVES for n in conf.objective)
           and len(set(conf.objective)) == len(conf.objective),
           f"objective={listed(conf.objective)}: choose one of {offered}, or a list of different "
           f"ones (e.g. 'objective=[val_acc,num_parameters]')")
    if sweep_direction is not None:
        wanted = [direction(n) for n in conf.objective]
        given = sweep_direction if isinstance(sweep_direction, (list, tuple, ListConfig)) else [sweep_direction]
        given = [getattr(d, "name", str(d)) for d in given]
        _check(given == wanted, f"objective={listed(conf.objective)} should be {listed(wanted, 'd')} but "
                                f"hydra.sweeper.direction={listed(given)}; set {quoted('hydra.sweeper.direction', wanted)}")
    return conf


def direction(objective: str) -> str:
    """How the sweeper optimises an objective: accuracies up, losses and costs down."""
    return "minimize" if objective.endswith("loss") or objective in COSTS else "maximize"


def listed(names: list[str], suffix: str = "") -> str:
    """`val_acc` for one name, `[val_acc,num_parameters]` for several, as the command line writes them."""
    return f"{names[0]}{suffix}" if len(names) == 1 else "[" + ",".join(names) + "]"


def quoted(key: str, names: list[str]) -> str:
    """key=value to type in a shell: a list quoted (zsh would expand its brackets)."""
    return f"{key}={names[0]}" if len(names) == 1 else f"'{key}={listed(names)}'"


def short_hash(value: Any) -> str:
    """8 hex digits naming a value, e.g. a sweep's command-line overrides (${short_hash:...} in YAML).
    A list is hashed as a set: the same overrides in another order name the same study."""
    if isinstance(value, (list, tuple, ListConfig)):
        value = sorted(str(v) for v in value)
    return hashlib.sha1(str(value).encode()).hexdigest()[:8]


def _swept(value: str) -> bool:
    """Whether an override's value is a sweep (a,b / choice(...) / range(...) / interval(...) / tag(...))."""
    return "," in value or re.match(r"\s*(choice|range|interval|tag|glob)\(", value) is not None


def study_model(choice: str, overrides: Any, params: Any) -> str:
    """The model part of a study's name (${study_model:...} in YAML): the model preset, or, where the sweep
    varies the model, what it varies, e.g. `family+depth` for the degradation grid, so that a study is
    never named after a preset its trials do not train."""
    keys = set()
    for override in overrides or []:
        key, _, value = str(override).lstrip("+~").partition("=")
        if (key == "model" or key.startswith("model.")) and _swept(value):
            keys.add(key)
    keys |= {str(k) for k in (params or {}) if str(k) == "model" or str(k).startswith("model.")}
    if not keys:
        return choice
    if "model" in keys:
        return "models"
    return "+".join(sorted(k.removeprefix("model.") for k in keys))


NO_CLASS = 3  # the child's exit code where the target names no class (a config error, not the environment's)

if __name__ == "__main__":  # arguments() in a child process: python -m resnet_sweep.config TARGET KEY
    try:
        print(json.dumps(_arguments(sys.argv[1], sys.argv[2])))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(NO_CLASS)
