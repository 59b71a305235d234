"""The house rules that keep the code simple: which module may import what, and the private API we lean on."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["resnet_sweep.models", "resnet_sweep.data", "resnet_sweep.train",
                                    "resnet_sweep.config", "resnet_sweep.lesion"])
def test_the_training_modules_import_none_of_hydra_mlflow_or_optuna(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'mlflow', 'optuna'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"importing {module} pulled in {out.strip()}"


def test_the_check_of_a_search_spaces_values_imports_no_optuna_hydra_or_mlflow() -> None:
    """preflight.py checks values through the compose function it is handed, whatever made them."""
    code = ("import sys, resnet_sweep.preflight; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'mlflow', 'optuna'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_the_sweeping_process_never_imports_torch() -> None:
    """What a sweep's own process loads (entry point, sweeper, launchers): on a cluster's login node it runs
    for days, so it stays small; the jobs import torch when they start (resnet_sweep/job.py)."""
    code = ("import sys, resnet_sweep.__main__, resnet_sweep.sweeper, resnet_sweep.config, "
            "hydra_plugins.hydra_submitit_launcher.submitit_launcher, hydra_plugins.hydra_joblib_launcher; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_listing_hydras_plugins_imports_no_mlflow() -> None:
    """Hydra imports every plugin in every command (--help and refused ones too): the sweeper imports
    MLflow (~3.5 s) only once a sweep starts."""
    code = ("import sys; from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
            "names = [p.__name__ for p in Plugins.instance().discover(Sweeper)]; "
            "print('ResnetOptunaSweeper' in names, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


def test_models_do_not_import_config() -> None:
    """The dependency runs config -> models only (models.ModelConfig is a Protocol)."""
    import resnet_sweep.models as models

    assert "resnet_sweep.config" not in inspect.getsource(models)


def test_the_private_names_the_sweep_still_needs_exist() -> None:
    """resnet_sweep/launchers.py lists in PRIVATE the private names of hydra-joblib-launcher and loky it uses
    (everything else is public API); if an upgrade moves one, this names the break."""
    import importlib

    from resnet_sweep.launchers import PRIVATE

    assert len(PRIVATE) == 3
    for dotted in PRIVATE:
        module, _, name = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{dotted} is gone (resnet_sweep/launchers.py uses it)"


def test_the_loggers_conf_quiets_are_the_launchers_own() -> None:
    """conf/config.yaml sets the launchers' loggers to WARNING by name (each module's own logger, named after
    it), so that a sweep prints one line per trial of its own; if an upgrade moves a module, its three lines
    per trial come back, and this names the break."""
    import importlib

    from omegaconf import OmegaConf

    from resnet_sweep.presets import CONF_DIR

    loggers = OmegaConf.load(CONF_DIR / "config.yaml").hydra.hydra_logging.loggers
    assert len(loggers) == 3
    for name in loggers:
        assert importlib.import_module(name).log.name == name, f"{name} no longer logs as {name}"


def test_the_package_has_no_import_cycle_lazy_imports_included() -> None:
    """Every `resnet_sweep` import in a module, at its top or inside a function, points one way."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "resnet_sweep"
    edges: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        found = edges.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resnet_sweep"):
                names = [node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("resnet_sweep.")]
            else:
                continue
            found.update(n for n in names if (package / f"{n}.py").exists() and n != path.stem)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    assert [m for m in sorted(edges) if reaches(m, m, {m})] == []


def test_no_function_of_the_package_is_over_60_lines() -> None:
    import ast
    from pathlib import Path

    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((Path(__file__).resolve().parent.parent / "resnet_sweep").glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


def test_the_modules_that_write_runs_never_import_those_that_read_them() -> None:
    source = inspect.getsource(__import__("resnet_sweep.tracking", fromlist=["x"]))
    assert "report" not in {n.split()[-1] for n in source.splitlines() if n.strip().startswith(("import", "from"))}


@pytest.mark.slow  # starts each command
@pytest.mark.parametrize(("module", "says"), [
    ("resnet_sweep", ["-m", "experiment=degradation", "resnet_sweep.report", "resnet_sweep.summary", "resnet_sweep.ui",
                      "Config groups", "model: article", "mlflow.db", "presets"]),
    ("resnet_sweep.report", ["--uri", "--run", "--out"]),
    ("resnet_sweep.summary", ["overrides", "model=resnet56"]),
    ("resnet_sweep.bench", ["--steps", "--threads"]),
    ("resnet_sweep.ui", ["--uri", "--experiment", "--port"]),
])
def test_every_cli_answers_help_with_what_it_does(module: str, says: list[str], tmp_path) -> None:  # noqa: ANN001
    res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    for text in says:
        assert text in res.stdout, f"{module} --help does not mention {text!r}"
    assert not list(tmp_path.iterdir()), "--help wrote files"
