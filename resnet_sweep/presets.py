"""Hydra's side of the configs: the presets inside the package, the typed schema and resolver they need, composing.

config.py holds the schema as plain dataclasses (models, data and train import it without Hydra); this
module registers it in Hydra's ConfigStore, for the CLI and for the tools that compose a preset.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf

from resnet_sweep.config import Config, short_hash, study_model
from resnet_sweep.errors import UserError, exit_with
from resnet_sweep.stores import check_folder
from resnet_sweep.workers import cores

CONF_DIR = Path(__file__).resolve().parent / "conf"
USER_PRESETS = "presets"  # a folder of the user's own presets, looked up in the folder a command runs from


class UserPresets(SearchPathPlugin):
    """`presets/<group>/<name>.yaml` in the current folder composes as `<group>=<name>`, beside ours.

    Our own because `hydra.searchpath: [file://presets]` in config.yaml warns on every run in a folder that
    has none; this adds the folder only where it exists. Registered as a Hydra plugin in pyproject.toml.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        folder = Path(USER_PRESETS)
        if folder.is_dir():
            search_path.append(provider="resnet_sweep-user-presets", path=f"file://{folder.resolve()}")


class CheckOutputFolder(Callback):
    """A command whose output folder (hydra.run.dir; with -m, hydra.sweep.dir) cannot be written stops with
    one paragraph before anything runs. Hydra makes the folder inside the job, where it failed with a
    traceback. Named in conf/config.yaml under hydra.callbacks."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(folder: str, key: str) -> None:
        try:
            check_folder(folder, key)
        except UserError as exc:
            exit_with(exc)


def register() -> None:
    """The typed schema (`base_config` in conf/config.yaml's defaults) and our resolvers: `short_hash` and
    `study_model` (study names), `cores` (the CPU cores this process may use: the joblib workers' default)."""
    for name, resolver in (("short_hash", short_hash), ("study_model", study_model)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_resolver(name, resolver)
    if not OmegaConf.has_resolver("cores"):
        OmegaConf.register_resolver("cores", cores)
    # Hydra 1.4 instantiates hydra.callbacks without an execution whitelist (its config offers none) and
    # warns on every run that this is deprecated; the one callback we name is our own
    warnings.filterwarnings("ignore", message=r"(?s).*_target_='resnet_sweep\.presets\.CheckOutputFolder'")
    ConfigStore.instance().store(name="base_config", node=Config, replace=True)  # register() runs per compose


def compose(overrides: list[str], job_name: str) -> DictConfig:
    """The config `python -m resnet_sweep <overrides>` would train, for tools that do not train it."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), job_name=job_name):
        return hydra_compose("config", overrides=overrides)
