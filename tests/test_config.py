"""Every preset composes and builds; bad values fail at composition or validation, naming the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from conftest import compose_config

from resnet_sweep.config import ConfigError, OptimizerConfig, named_class, to_typed, validate
from resnet_sweep.models import build_model, weighted_layers
from resnet_sweep.presets import CONF_DIR as CONF, register

GROUPS = ["model", "data", "optimizer", "scheduler", "trainer", "tracking"]


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_the_issue_named_presets_compose_to_what_they_are_named() -> None:
    for family in ("resnet", "plain"):
        for depth in (20, 32, 44, 56, 110, 18, 34, 50, 101, 152):
            m = to_typed(compose_config(f"model={family}{depth}").model)
            assert (m.family.name, m.depth) == (family, depth)
    assert to_typed(compose_config("model=article").model).layout.name == "article"
    for group, names in (("data", ("digits", "mnist", "fashion_mnist", "cifar10")),
                         ("optimizer", ("sgd", "adam", "adamw")),
                         ("scheduler", ("none", "multistep", "cosine", "plateau"))):
        for name in names:
            node = compose_config(f"{group}={name}")[group]  # an optimizer: an open node naming its class
            typed = OptimizerConfig.of(OmegaConf.to_container(node)) if group == "optimizer" else to_typed(node)
            assert getattr(typed.name, "name", typed.name) == name


@pytest.mark.parametrize("model", presets("model"))
def test_every_model_preset_composes_and_builds_its_depth(model: str) -> None:
    cfg = compose_config(f"model={model}")
    m, d = to_typed(cfg.model), to_typed(cfg.data)
    net = build_model(m, d.input_shape, d.num_classes)
    main_path = [name for name, _ in weighted_layers(net) if ".shortcut" not in name]  # as the paper counts
    assert len(main_path) == m.depth


@pytest.mark.parametrize("group", ["data", "optimizer", "scheduler", "trainer", "tracking", "experiment", "pruner",
                                   "search", "workers"])
def test_every_other_preset_composes_and_validates(group: str) -> None:
    for name in presets(group):
        # the store paths interpolate Hydra's run-time folder, which only a real run has
        validate(compose_config(f"{group}={name}", "tracking.uri=sqlite:////tmp/m.db", "tracking.artifact_location=/tmp"))


def test_unknown_key_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("model.dpth=20")
    assert "dpth" in str(err.value) or "dpth" in str(err.value.__cause__)


def test_wrong_type_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("trainer.epochs=ten")
    assert isinstance(err.value.__cause__, ValidationError)


def test_unknown_enum_value_names_the_valid_ones() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("model.activation=swishy")
    assert "relu" in str(err.value.__cause__) and "sigmoid" in str(err.value.__cause__)


def test_unknown_choice_names_the_available_ones() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("model=resnet33")
    assert "resnet20" in str(err.value)


@pytest.mark.parametrize("override,words", [
    ("model.depth=33", ["6n+2", "20", "56", "110"]),
    ("model=resnet18 model.depth=19", ["18", "34", "50", "101", "152"]),
    ("optimizer.lr=-0.1", ["optimizer.lr", "> 0"]),
    ("data.val_fraction=1.5", ["val_fraction"]),
    ("trainer.device=tpu", ["cuda", "cpu"]),
    # each optimizer and scheduler takes only its own settings, and says which those are (an optimizer: its
    # class's arguments; Hydra refuses a key its preset lacks and advises adding it with +)
    ("optimizer=adam +optimizer.momentum=0.5", ["optimizer.momentum", "0.5", "torch.optim.Adam",
                                                 "lr, betas, eps, weight_decay"]),
    ("optimizer=sgd +optimizer.betas=[0.9,0.99]", ["optimizer.betas", "lr, momentum, dampening, weight_decay, nesterov"]),
    ("scheduler=cosine scheduler.patience=3", ["scheduler.patience=3", "cosine", "takes min_lr"]),
    ("scheduler=none scheduler.monitor=train_loss", ["scheduler.monitor=train_loss", "no settings"]),
    ("scheduler.warmup_epochs=-1", ["scheduler.warmup_epochs=-1", ">= 0"]),
])
def test_invalid_values_fail_validation_naming_the_fix(override: str, words: list[str]) -> None:
    cfg = compose_config(*override.split())
    with pytest.raises(ConfigError) as err:
        for g in ("model", "data", "scheduler", "trainer"):
            to_typed(cfg[g])
        OptimizerConfig.of(OmegaConf.to_container(cfg.optimizer))  # an open node: its preset names the class
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("name", presets("optimizer"))
def test_an_optimizer_preset_is_its_class_and_arguments_alone(name: str) -> None:
    import torch

    from resnet_sweep.train import build_optimizer

    node = OmegaConf.to_container(compose_config(f"optimizer={name}").optimizer)
    built = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimizerConfig.of(node))
    assert type(built) is named_class(node["_target_"])
    assert {k: built.defaults[k] for k in node if k != "_target_"} == {k: tuple(v) if isinstance(v, list) else v
                                                                       for k, v in node.items() if k != "_target_"}


def test_an_optimizer_the_config_names_is_checked_without_torch_in_the_sweeping_process(tmp_path) -> None:  # noqa: ANN001
    """A sweep's process reads an optimizer's arguments in a child process, once: they are kept in the cache
    folder, and read from there after."""
    code = ("import sys; from resnet_sweep.config import ConfigError, arguments\n"
            "try: print(arguments(sys.argv[1], 'optimizer._target_'))\n"
            "except ConfigError as exc: print('ConfigError:', exc)\n"
            "print('torch' in sys.modules)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}

    def read(target: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True, env=env,
                              check=True).stdout.splitlines()

    takes, imported = read("torch.optim.Adam")
    assert imported == "False" and "'lr': 'number', 'betas': 'list', 'eps': 'number'" in takes
    (kept,) = tmp_path.glob("resnet_sweep/signature-torch.optim.Adam-*.json")
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "kept_here": "bool"}))
    assert "'kept_here': 'bool'" in read("torch.optim.Adam")[0]  # read from the cache folder, not measured again
    refused, imported = read("torch.optim.Adamm")
    assert refused.startswith("ConfigError: optimizer._target_=torch.optim.Adamm names no class") and imported == "False"


@pytest.mark.parametrize("override,words", [
    ("optimizer.nesterov=no", ["optimizer.nesterov=no", "true or false"]),  # a bool is a bool, not a string
    ("optimizer.momentum=abc", ["optimizer.momentum=abc", "a number"]),
    ("optimizer=adam optimizer.betas=0.9", ["optimizer.betas=0.9", "a list"]),
    ("+optimizer.name=adam", ["optimizer.name=adam", "choose optimizer=adam"]),  # what presets said before _target_
    ("optimizer._target_=torch.optim.Adam", ["optimizer.momentum", "(~optimizer.momentum ~optimizer.nesterov)"]),
])
def test_an_optimizer_argument_of_the_wrong_kind_or_name_is_refused_with_what_works(override: str,
                                                                                   words: list[str]) -> None:
    cfg = compose_config(*override.split())
    with pytest.raises(ConfigError) as err:
        OptimizerConfig.of(OmegaConf.to_container(cfg.optimizer))
    for w in words:
        assert w in str(err.value), str(err.value)
    if "~" in words[-1]:  # the advice works: Adam, without SGD's momentum and nesterov
        cfg = compose_config(override, *words[-1].strip("()").split())
        assert OptimizerConfig.of(OmegaConf.to_container(cfg.optimizer)).name == "adam"


@pytest.mark.parametrize("objective,direction,ok", [("val_acc", "maximize", True), ("val_acc", "minimize", False),
                                                    ("val_loss", "minimize", True), ("train_loss", "maximize", False)])
def test_a_sweep_direction_must_match_its_objective(objective: str, direction: str, ok: bool) -> None:
    cfg = compose_config(f"objective={objective}", "tracking.uri=sqlite:////tmp/m.db", "tracking.artifact_location=/tmp")
    if ok:
        validate(cfg, sweep_direction=direction)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg, sweep_direction=direction)
    wanted = "minimize" if objective.endswith("loss") else "maximize"
    assert f"set hydra.sweeper.direction={wanted}" in str(err.value)


@pytest.mark.parametrize(("overrides", "params", "name"), [
    ([], None, "resnet20"),
    (["trainer.epochs=3", "optimizer.lr=0.1,0.2"], {"optimizer.lr": "interval(0.01, 1)"}, "resnet20"),
    (["model.depth=8,14"], None, "depth"),
    (["+model.depth=choice(8, 14)"], {"model.family": "choice(plain, resnet)"}, "depth+family"),
    (["model=resnet20,plain20"], None, "models"),
    (["model.depth=14"], None, "resnet20"),  # one value: the preset, refined (the hash tells the studies apart)
])
def test_a_study_is_named_after_the_model_it_trains(overrides, params, name) -> None:  # noqa: ANN001
    from resnet_sweep.config import study_model

    assert study_model("resnet20", overrides, params) == name


def _composed(*overrides: str):  # noqa: ANN202
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONF), job_name="test"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_imagenet_layout_nets_take_their_own_recipe_and_lr_range_and_the_command_line_wins() -> None:
    for model in ("resnet34", "plain18", "resnet152"):
        cfg = _composed(f"model={model}")
        assert cfg.hydra.sweeper.params["optimizer.lr"] == "tag(log, interval(0.005, 0.03))", model
        assert (cfg.trainer.epochs, cfg.scheduler.warmup_epochs) == (8, 1), model
        assert cfg.hydra.sweeper.params["optimizer.weight_decay"] == "tag(log, interval(1e-5, 1e-3))", model
    cifar = _composed("model=resnet20")
    assert cifar.hydra.sweeper.params["optimizer.lr"] == "tag(log, interval(0.01, 0.5))"
    assert (cifar.trainer.epochs, cifar.scheduler.warmup_epochs) == (15, 0)
    dropped = _composed("model=resnet34", "search=none")
    assert not dropped.hydra.sweeper.params and dropped.trainer.epochs == 15
    given = _composed("model=resnet34", "trainer.epochs=3", "scheduler.warmup_epochs=0.5")
    assert (given.trainer.epochs, given.scheduler.warmup_epochs) == (3, 0.5)


def sweep_config(overrides: list[str]):
    """A trial's config as the sweeper composes it (its hydra node included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    register()
    with initialize_config_dir(config_dir=str(CONF), job_name="test"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as in a sweep: the job's config reads ${hydra:...}
    return cfg


@pytest.mark.parametrize("written", ["interval(16,256)", "tag(log,interval(16,256))", "tag(log, interval(16, 256))"])
def test_an_interval_over_a_whole_number_key_is_refused_with_advice_that_sweeps_whole_numbers(written: str) -> None:
    from resnet_sweep import preflight, space

    cfg = compose_config()
    (floats,) = space.parse([f"trainer.batch_size={written}"])[0].values()
    with pytest.raises(ConfigError) as err:
        preflight.whole_numbers("trainer.batch_size", written, floats.low, cfg)
    (fix,) = re.findall(r"write '([^']+)'", str(err.value))
    assert str(err.value).startswith(f"trainer.batch_size={written} gives floats") and "whole numbers" in str(err.value)
    # the advice, followed: whole numbers between the same bounds, and the sweeper's check passes each one it tries
    (whole,) = space.parse([fix])[0].values()
    assert (type(whole).__name__, whole.low, whole.high, whole.log) == ("IntDistribution", 16, 256, "log" in written)
    preflight.check({"trainer.batch_size": space.candidates("trainer.batch_size", whole, fix.split("=", 1)[1])}, [],
                    sweep_config)
    preflight.whole_numbers("optimizer.lr", "interval(1,2)", 1.0, cfg)  # a float key takes it as it is


def test_a_key_added_with_plus_that_no_schema_has_is_refused_not_dropped() -> None:
    from resnet_sweep import preflight

    cfg = compose_config("+optimizer.lrr=0.5", "tracking.uri=sqlite:////tmp/m.db", "tracking.artifact_location=/tmp")
    with pytest.raises(ConfigError) as err:  # Hydra's advice for a key it does not know: add it with +
        validate(cfg)
    assert str(err.value).startswith("optimizer.lrr is not a config key") and "did you mean optimizer.lr?" in str(err.value)
    # in a sweep, the refusal blames the added key, not the one the advice names
    swept = {"optimizer.lr": [(0.1, "optimizer.lr=choice(0.1) gives optimizer.lr=0.1")],
             "+optimizer.lrr": [(0.5, "+optimizer.lrr=choice(0.5) gives +optimizer.lrr=0.5")]}
    with pytest.raises(ConfigError) as err:
        preflight.check(swept, [], sweep_config)
    assert str(err.value).startswith("+optimizer.lrr=choice(0.5) gives"), str(err.value)


def test_an_unknown_objective_is_told_the_objectives_a_sweep_may_select_on() -> None:
    cfg = compose_config("objective=accuracy", "tracking.uri=sqlite:////tmp/m.db", "tracking.artifact_location=/tmp")
    with pytest.raises(ConfigError) as single:
        validate(cfg)
    with pytest.raises(ConfigError) as sweep:
        validate(cfg, sweep_direction="maximize")
    assert "test_acc" in str(single.value) and "val_acc" in str(sweep.value)
    assert "test_" not in str(sweep.value)  # a sweep refuses to select on the test set: not offered


def test_two_of_hydras_modes_in_one_command_is_one_line_whose_advice_works(tmp_path) -> None:  # noqa: ANN001
    both = subprocess.run([sys.executable, "-m", "resnet_sweep", "-m", "--cfg", "hydra"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert both.returncode == 2 and "Traceback" not in both.stderr, both.stderr
    assert both.stderr.startswith("Error: -m and --cfg cannot go together") and "`--cfg hydra`" in both.stderr
    shown = subprocess.run([sys.executable, "-m", "resnet_sweep", "--cfg", "hydra"], cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    sweeper = OmegaConf.create(shown.stdout).hydra.sweeper  # the search space and sampler, as the advice says
    assert "optimizer.lr" in sweeper.params and "sampler" in sweeper


def test_a_key_fixed_with_plus_on_the_command_line_wins_over_the_search_spaces_sweep_of_it() -> None:
    """Hydra's advice where a preset lacks a key the default search sweeps (optimizer.weight_decay): add it
    with +. The fixed value replaces the sweep of it, as a fixed key=value does; both together did not compose
    (the swept key=... comes first), and every trial failed."""
    from resnet_sweep import space

    swept, fixed = space.parse(["optimizer.lr=tag(log,interval(0.01,0.5))",
                                "optimizer.weight_decay=tag(log,interval(1e-5,1e-3))", "+optimizer.weight_decay=1e-05"])
    assert list(swept) == ["optimizer.lr"] and fixed == ["+optimizer.weight_decay=1e-05"]
    overrides = [f"{k}=0.1" for k in swept] + fixed  # as the sweeper orders a trial's overrides
    assert compose_config("optimizer=adam", "~optimizer.weight_decay", *overrides).optimizer.weight_decay == 1e-05
