"""Entry point: `python -m resnet_sweep [overrides]` trains one net; add `-m` to sweep with Optuna.

compose (Hydra) -> the job (resnet_sweep/job.py: validate, build, fit, record) -> the objective. The job's
modules (torch among them) are imported when a job starts, not here: a sweeping process stays small.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from resnet_sweep.config import validate
from resnet_sweep.errors import UserError, exit_with
from resnet_sweep.presets import register
from resnet_sweep.stores import check_store
from resnet_sweep.workers import Terminated

register()  # the typed schema that conf/config.yaml names as `base_config`

# Hydra's flags that choose what a command does, one per command (Hydra stops a second with a traceback)
MODES = {"-r": "--run", "--run": "--run", "-m": "-m", "--multirun": "-m", "-c": "--cfg", "--cfg": "--cfg",
         "-i": "--info", "--info": "--info", "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}


def one_mode(argv: list[str]) -> None:
    """Refuse two of Hydra's modes in one command (`-m --cfg hydra`) in one line, saying what each does."""
    modes = list(dict.fromkeys(MODES[a.partition("=")[0]] for a in argv if a.partition("=")[0] in MODES))
    if len(modes) > 1:
        exit_with(UserError(f"{' and '.join(modes)} cannot go together: each chooses what the command does (-m "
                            f"sweeps; --cfg and --info print what it would use and run nothing); keep one. A "
                            f"sweep's search space and sampler are under hydra.sweeper in `--cfg hydra`"))


@hydra.main(config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    single = HydraConfig.get().mode != RunMode.MULTIRUN
    try:
        if single:  # bad input, found before the job imports torch and MLflow (~8 s of CPU): the job checks it again
            conf = validate(cfg)
            if conf.tracking.enabled:
                check_store(conf.tracking.uri, "tracking.uri")
        from resnet_sweep.job import run

        return run(cfg)
    except UserError as exc:
        if not single:
            raise  # a sweep's job: its trial fails with the reason, and the sweep goes on
        exit_with(exc)  # one paragraph, exit code 2, no traceback
    except (KeyboardInterrupt, Terminated) as exc:
        if not single:
            raise  # a sweep's job: its trial is interrupted, and the sweeper decides
        # the run is KILLED with the reason (tracking.job_run); 128 + SIGINT or SIGTERM, as a shell reports it
        why = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(f"Stopped ({why}); its MLflow run, where one had begun, is recorded KILLED.", file=sys.stderr)
        raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 143) from None


if __name__ == "__main__":
    one_mode(sys.argv[1:])
    main()
