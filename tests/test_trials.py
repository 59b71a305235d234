"""What counts in a study (trials.py), and how the sweeper blames a job's end, on a real SQLite Optuna
storage: fast, one process."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from resnet_sweep import trials
from resnet_sweep.sweeper import ResnetOptunaSweeper


def test_a_trial_found_silent_whose_retry_was_never_queued_does_not_count_and_is_queued_again(tmp_path: Path) -> None:
    storage = trials.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=storage)
    failed, silent = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), study.ask()
    records = trials.Records(storage, "s")
    records.end(failed.number, TrialState.FAIL, reason="its own fault")  # a job's failure: counted
    # what Optuna's fail_stale_trials writes before its callbacks run (a sweep stopped there: no retry)
    storage.set_trial_state_values(records.trial_id(silent.number), state=TrialState.FAIL)
    assert [t.number for t in trials.counted(study.trials)] == [failed.number]
    records.queue_retries()
    (retry,) = [t for t in study.trials if t.state == TrialState.WAITING]
    assert retry.user_attrs["retry_of"] == silent.number and silent.number in trials.retried(study.trials)


def test_a_stalled_trial_whose_retry_was_never_queued_runs_again_unless_its_parameters_stalled_too_often(
        tmp_path: Path) -> None:
    storage = trials.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=storage)
    records = trials.Records(storage, "s")
    numbers = []
    for stalls in (0, trials.STALL_RETRIES):
        study.enqueue_trial({}, user_attrs={})
        trial = study.ask()
        storage.set_trial_system_attr(records.trial_id(trial.number), trials.STALLS, stalls)
        # what a job's watchdog writes before it stops beating, then Optuna's fail_stale_trials
        records.set(trial.number, fail_reason="interrupted: no training step for 10 s", **{trials.STALLED: True})
        storage.set_trial_state_values(records.trial_id(trial.number), state=TrialState.FAIL)
        numbers.append(trial.number)
    again, counts = numbers
    assert [t.number for t in trials.counted(study.trials)] == [counts]
    records.queue_retries()
    assert [t.user_attrs["retry_of"] for t in study.trials if t.state == TrialState.WAITING] == [again]


@pytest.mark.parametrize("error, blamed", [
    (OSError(errno.ENOSPC, "No space left on device"), "environment"),  # interrupted; the sweep stops
    (sqlite3.OperationalError("database is locked"), "lock"),  # interrupted; the sweep goes on (its _unlock)
    (ValueError("a bad value of the trial's own"), "trial"),  # failed, and counted
])
def test_a_jobs_error_is_blamed_by_one_rule_whether_the_job_told_its_trial_or_the_sweeper_did(
        tmp_path: Path, error: Exception, blamed: str) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = trials.open_storage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=storage)
    sweeper = ResnetOptunaSweeper()
    sweeper.records, sweeper.parent = trials.Records(storage, "s"), None
    told, inside, outside = study.ask(), study.ask(), study.ask()
    job = trials.JobTrial("s", url, told.number, {"heartbeat_interval": 1, "grace_period": 2})
    try:
        job.fail(error)  # the job met it and told its trial itself
    finally:
        job.close()
    ret = JobReturn(status=JobStatus.FAILED)  # the job raised inside its task before it could tell
    ret.return_value = error
    sweeper._settle(inside.number, ret)
    if blamed == "trial":
        with pytest.raises(ValueError):  # raised outside its task: not the trial's, the sweep stops
            sweeper._job_raised(outside.number, error)
    else:
        sweeper._job_raised(outside.number, error)
    ended = {t.number: t for t in study.trials}
    for trial in [ended[told.number], ended[inside.number]] + ([ended[outside.number]] if blamed != "trial" else []):
        assert trial.state == TrialState.FAIL
        assert bool(trial.user_attrs.get(trials.INTERRUPTED)) == (blamed != "trial"), trial.user_attrs
        assert (trials.ENVIRONMENT in trial.user_attrs) == (blamed == "environment"), trial.user_attrs
    assert [t.number for t in trials.counted(study.trials)] == ([told.number, inside.number] if blamed == "trial"
                                                                else [])
