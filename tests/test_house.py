"""The house rules that keep the code simple: which module may import what, and the private API we lean on."""

from __future__ import annotations

import inspect
import subprocess
import sys
from importlib import metadata

import pytest


@pytest.mark.parametrize("module", ["resnet_sweep.models", "resnet_sweep.data", "resnet_sweep.train",
                                    "resnet_sweep.config", "resnet_sweep.lesion"])
def test_the_training_modules_import_none_of_hydra_mlflow_or_optuna(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'mlflow', 'optuna'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"importing {module} pulled in {out.strip()}"


def test_the_sweeping_process_never_imports_torch() -> None:
    """What a sweep's own process loads (entry point, sweeper, launchers): on a cluster's login node it runs
    for days, so it stays small; the jobs import torch when they start (resnet_sweep/job.py)."""
    code = ("import sys, resnet_sweep.__main__, resnet_sweep.sweeper, resnet_sweep.config, "
            "hydra_plugins.hydra_submitit_launcher.submitit_launcher, hydra_plugins.hydra_joblib_launcher; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_models_do_not_import_config() -> None:
    """The dependency runs config -> models only (models.ModelConfig is a Protocol)."""
    import resnet_sweep.models as models

    assert "resnet_sweep.config" not in inspect.getsource(models)


def test_the_optuna_plugin_still_offers_the_private_api_our_sweeper_uses() -> None:
    """resnet_sweep/sweeper.py subclasses hydra_plugins.hydra_optuna_sweeper._impl.OptunaSweeperImpl; if a
    release moves what it uses, this names the break (pyproject caps the plugin below 1.5 for this reason)."""
    from hydra_plugins.hydra_optuna_sweeper import _impl

    version = metadata.version("hydra-optuna-sweeper")
    impl = _impl.OptunaSweeperImpl
    for name in ("setup", "_get_directions", "_configure_trials", "_parse_sweeper_params_config",
                 "_process_searchspace_config", "_to_grid_sampler_choices"):
        assert callable(getattr(impl, name, None)), f"hydra-optuna-sweeper {version}: OptunaSweeperImpl.{name} is gone"
    assert callable(getattr(_impl, "create_params_from_overrides", None)), \
        f"hydra-optuna-sweeper {version}: _impl.create_params_from_overrides is gone"
    params = list(inspect.signature(impl.__init__).parameters)
    assert params == ["self", "sampler", "direction", "storage", "study_name", "n_trials", "n_jobs",
                      "max_failure_rate", "custom_search_space", "params"], \
        f"hydra-optuna-sweeper {version}: OptunaSweeperImpl.__init__ now takes {params}"
    source = inspect.getsource(impl.__init__) + inspect.getsource(impl.setup)
    for attribute in ("sampler", "direction", "storage", "study_name", "n_trials", "n_jobs", "max_failure_rate",
                      "config", "launcher"):
        assert f"self.{attribute} =" in source or f"self.{attribute}:" in source, \
            f"hydra-optuna-sweeper {version}: OptunaSweeperImpl no longer sets self.{attribute}"


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
