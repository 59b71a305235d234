"""Claims checked with confidence intervals (claims.py), and sweeps compared side by side (report --compare)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient
from scipy import stats

from conftest import compose_config, run_cli
from resnet_sweep import claims
from resnet_sweep.config import ConfigError, validate

DEEP = {"a": {"model": {"family": "plain", "depth": "max"}}, "b": {"model": {"family": "plain", "depth": "min"}},
        "metric": "train_acc"}


def runs(**by_depth: list[float]) -> tuple[list[dict[str, str]], list[dict[str, float]]]:
    """Plain runs at the depths named d<N>, one per value: (params, final metrics)."""
    params, metrics = [], []
    for name, values in by_depth.items():
        for seed, value in enumerate(values):
            params.append({"model.family": "plain", "model.depth": name[1:], "seed": str(seed)})
            metrics.append({"train_acc": value})
    return params, metrics


def test_a_clear_effect_holds_and_its_welch_interval_is_the_textbook_one() -> None:
    params, metrics = runs(d8=[0.95, 0.96, 0.97], d56=[0.40, 0.50, 0.45], d20=[0.9, 0.9, 0.9])
    v = claims.check("deep", {**DEEP, "a_is": "below"}, params, metrics)
    assert (v.verdict, v.n_a, v.n_b) == (claims.HOLDS, 3, 3)  # max/min picked 56 and 8, not 20
    assert v.effect == pytest.approx(0.45 - 0.96)
    # Welch: the variances of the means (0.05^2/3 and 0.01^2/3), Welch-Satterthwaite df = 2.16
    va, vb = 0.0025 / 3, 0.0001 / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    assert df == pytest.approx(2.160, abs=1e-3)
    assert v.high - v.effect == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(va + vb))
    assert v.high - v.effect == pytest.approx(0.1183, abs=1e-3)  # t(0.975, df 2.16) = 4.01, x 0.0294
    assert v.interval().startswith("-51 points [")


def test_the_opposite_claim_does_not_hold_and_a_wide_interval_is_undecided() -> None:
    params, metrics = runs(d8=[0.95, 0.96, 0.97], d56=[0.40, 0.50, 0.45])
    assert claims.check("x", {**DEEP, "a_is": "above"}, params, metrics).verdict == claims.FAILS
    params, metrics = runs(d8=[0.5, 0.9, 0.7], d56=[0.3, 0.95, 0.6])
    assert claims.check("x", {**DEEP, "a_is": "below"}, params, metrics).verdict == claims.UNDECIDED
    # a margin the effect does not reach: -51 points [-63, -39] is not below -70
    params, metrics = runs(d8=[0.95, 0.96, 0.97], d56=[0.40, 0.50, 0.45])
    assert claims.check("x", {**DEEP, "a_is": "below", "by": 0.7}, params, metrics).verdict == claims.FAILS


def test_one_run_a_side_is_undecided_with_no_interval() -> None:
    params, metrics = runs(d8=[0.99], d56=[0.10])
    v = claims.check("x", {**DEEP, "a_is": "below"}, params, metrics)
    assert (v.verdict, v.low, v.high) == (claims.UNDECIDED, None, None)
    assert "no interval" in v.interval()


def test_a_claim_on_a_nets_size_needs_no_spread() -> None:
    params = [{"model.depth": d} for d in ("56", "56", "20", "20")]
    metrics = [{"num_parameters": n} for n in (853018.0, 853018.0, 269722.0, 269722.0)]
    spec = {"metric": "num_parameters", "a": {"model": {"depth": "max"}}, "b": {"model": {"depth": "min"}},
            "a_is": "above"}
    v = claims.check("bigger", spec, params, metrics)
    assert (v.verdict, v.low, v.high) == (claims.HOLDS, 583296.0, 583296.0)


def test_a_log10_claim_counts_orders_of_magnitude_and_a_ratio_that_underflowed_to_zero() -> None:
    params = [{"model.activation": a} for a in ("sigmoid", "sigmoid", "relu", "relu")]
    metrics = [{"r": 1e-12}, {"r": 0.0}, {"r": 0.5}, {"r": 2.0}]
    spec = {"metric": "r", "a": {"model": {"activation": "sigmoid"}}, "b": {"model": {"activation": "relu"}},
            "a_is": "below", "by": 2, "scale": "log10"}
    v = claims.check("vanish", spec, params, metrics)
    assert v.effect == pytest.approx((-12 + math.log10(claims.FLOAT32_TINY)) / 2 - 0.0)
    assert v.unit == "orders of magnitude" and "a: 1 of 0 (underflow) counted as 1.4e-45" in v.note
    # a run without a finite value (failed; 0/0; x/0) is left out and said so
    v = claims.check("vanish", spec, params, [{"r": float("nan")}, {"r": 1e-12}, {}, {"r": float("inf")}])
    assert (v.n_a, v.n_b, v.verdict) == (1, 0, claims.UNDECIDED)
    assert v.note == "a: 1 without a finite r left out; b: 2 without a finite r left out"


def test_max_is_the_deepest_of_the_runs_the_other_keys_pick_and_no_spread_gives_no_interval() -> None:
    params = [{"model.family": f, "model.depth": d} for f, d in
              (("plain", "56"), ("plain", "56"), ("resnet", "20"), ("resnet", "20"))]
    metrics = [{"train_acc": 0.40}, {"train_acc": 0.41}, {"train_acc": 0.99}, {"train_acc": 0.98}]
    spec = {"metric": "train_acc", "a": {"model": {"family": "resnet", "depth": "max"}},
            "b": {"model": {"family": "plain", "depth": "max"}}, "a_is": "above"}
    v = claims.check("x", spec, params, metrics)
    assert (v.n_a, v.n_b, v.verdict) == (2, 2, claims.HOLDS)  # ResNet-20 is the deepest ResNet
    v = claims.check("x", spec, params, [{"train_acc": 0.1}] * 4)
    assert (v.verdict, v.low) == (claims.UNDECIDED, None) and "no spread" in v.interval()
    v = claims.check("x", {**spec, "a": {"model": {"family": "resnt"}}}, params, metrics)
    assert (v.verdict, v.note) == (claims.UNDECIDED, "a picks no run")


@pytest.mark.parametrize(("claim", "says"), [
    ("{metric: train_accuracy, a: {seed: 0}, b: {seed: 1}}", "claims.c.metric='train_accuracy': choose one of"),
    ("{a: {model: {famly: plain}}, b: {seed: 1}}", "claims.c.a picks runs by model.famly, which is not a config key"),
    ("{a: {seed: 0}}", "claims.c.b is empty"),
    ("{a: {seed: 0}, b: {seed: 1}, a_is: under}", "claims.c.a_is='under': choose below or above"),
    ("{a: {seed: 0}, b: {seed: 1}, by: -1}", "claims.c.by=-1: a margin >= 0"),
    ("{a: {seed: 0}, b: {seed: 1}, sayz: x}", "claims.c: a claim takes a, a_is, b, by, metric, says, scale"),
])
def test_a_claim_that_can_never_be_evaluated_is_refused_before_training(claim: str, says: str) -> None:
    cfg = compose_config(f"+claims.c={claim}", "tracking.uri=sqlite:////tmp/m.db", "tracking.artifact_location=/tmp")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert says in str(err.value)


@pytest.mark.parametrize("experiment", ["degradation", "vanishing_gradients", "lesion"])
def test_every_experiment_states_claims_that_validate(experiment: str) -> None:
    cfg = compose_config(f"experiment={experiment}", "tracking.uri=sqlite:////tmp/m.db",
                         "tracking.artifact_location=/tmp")
    assert validate(cfg).claims


VANISH = "{metric: grad_ratio_at_init, a: {model: {family: plain, depth: max}}, " \
         "b: {model: {family: resnet, depth: max}}, scale: log10, a_is: %s, by: %s}"


@pytest.mark.slow
def test_compare_two_sweeps_with_their_claims_checked(workdir: Path) -> None:
    """Two small degradation sweeps of sigmoid nets without BatchNorm that differ in the learning rate, the
    second with one seed. At init a plain-14's first/last gradient ratio is ~3 orders of magnitude below a
    ResNet-14's (measured: -2.7 [-2.95, -2.46]): that claim holds, its reverse does not, and one seed is
    undecided. Then --compare draws them together and labels them by what differs."""
    common = ("experiment=degradation", "-m", "workers=serial", "trainer.epochs=1", "data.train_subset=128",
              "model.activation=sigmoid", "model.norm=none", "model.depth=choice(8,14)", f"+claims.vanish={VANISH % ('below', 1)}",
              f"+claims.reversed={VANISH % ('above', 0)}")
    first = run_cli(workdir, *common, "seed=choice(0,1)")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "claim vanish: HOLDS" in first.stdout and "claim reversed: DOES NOT HOLD" in first.stdout
    second = run_cli(workdir, *common, "seed=choice(0)", "optimizer.lr=0.05", "tracking.experiment=degradation_b")
    assert second.returncode == 0, second.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    tops = {}
    for name in ("degradation", "degradation_b"):
        exp = client.get_experiment_by_name(name)
        (tops[name],) = client.search_runs([exp.experiment_id], "tags.role = 'sweep'")
    tags = {n: {k: v for k, v in r.data.tags.items() if k.startswith("claim.")} for n, r in tops.items()}
    assert tags["degradation"]["claim.vanish"] == "holds"
    assert tags["degradation"]["claim.reversed"] == "does not hold"
    assert set(tags["degradation"]) == {"claim.vanish", "claim.reversed", "claim.plain_degrades",
                                        "claim.resnet_beats_plain_deep"}  # the experiment's own, too
    assert set(tags["degradation_b"].values()) == {"undecided"}  # one seed: no interval
    assert set(json.loads(tops["degradation"].data.tags["claims"])) == {"vanish", "reversed", "plain_degrades",
                                                                        "resnet_beats_plain_deep"}
    (one_seed,) = workdir.glob(f"outputs/reports/degradation_b-{tops['degradation_b'].info.run_id[:8]}/summary.md")
    assert "(one run on a side: no interval)" in one_seed.read_text()

    study = tops["degradation"].data.tags["optuna.study"]
    res = run_cli(workdir, "--compare", study, "degradation_b", module="resnet_sweep.report")
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = workdir.glob("outputs/reports/compare-*")
    assert {p.name for p in out.iterdir()} == {"depth_vs_accuracy.png", "training_curves.png", "gradient_profiles.png",
                                               "summary.md"}
    summary = out.joinpath("summary.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| claim |"))
    assert header == "| claim | optimizer.lr=0.02 | optimizer.lr=0.05 |"
    rows = [line for line in summary.splitlines() if line.startswith("| `")]
    assert len(rows) == 4 and all(line.count("**") == 4 for line in rows), rows  # a verdict per claim and sweep
    (comparison,) = client.search_runs([client.get_experiment_by_name("comparisons").experiment_id])
    assert comparison.data.tags["compared"] == f"{tops['degradation'].info.run_id} {tops['degradation_b'].info.run_id}"
    assert {Path(a.path).name for a in client.list_artifacts(comparison.info.run_id, "report")} >= {"summary.md"}
    # its files beside every other run's (mlartifacts/), not in a folder of their own
    assert comparison.info.artifact_uri.startswith((workdir / "mlartifacts").as_uri() + "/"), comparison.info.artifact_uri


# Accuracy against cost: several objectives, a Pareto front

@pytest.mark.parametrize(("objective", "direction", "says"), [
    ("[val_acc,num_parameters]", "[maximize,minimize]", None),
    ("[val_acc,train_seconds,flops_per_sample]", "[maximize,minimize,minimize]", None),
    ("[val_acc,num_parameters]", "maximize", "set 'hydra.sweeper.direction=[maximize,minimize]'"),
    ("[val_acc,num_parameters]", "[maximize,maximize]", "set 'hydra.sweeper.direction=[maximize,minimize]'"),
    ("[val_acc,num_params]", "[maximize,minimize]", "objective=[val_acc,num_params]: choose one of"),
    ("[val_acc,val_acc]", "[maximize,maximize]", "a list of different ones"),
    ("null", "maximize", "objective=None: choose one of val_acc"),
])
def test_several_objectives_take_one_direction_each(objective: str, direction: str, says: str | None) -> None:
    cfg = compose_config(f"objective={objective}", "tracking.uri=sqlite:////tmp/m.db", "tracking.artifact_location=/tmp")
    direction = direction.strip("[]").split(",") if direction.startswith("[") else direction
    if says is None:
        assert validate(cfg, sweep_direction=direction).objective == objective.strip("[]").split(",")
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg, sweep_direction=direction)
    assert says in str(err.value)


@pytest.mark.slow
def test_a_two_objective_sweep_tags_its_pareto_trials_and_draws_the_front(workdir: Path) -> None:
    res = run_cli(workdir, "-m", "objective=[val_acc,num_parameters]", "hydra.sweeper.direction=[maximize,minimize]",
                  "search=none", "model.depth=choice(8,14)", "model.family=choice(plain,resnet)",
                  "hydra.sweeper.n_trials=4", "hydra/sweeper/sampler=grid", "trainer.epochs=1",
                  "data.train_subset=128", "report=true", "workers=serial")
    assert res.returncode == 0, res.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{workdir / 'optuna.db'}")
    front = {t.user_attrs["mlflow_run_id"] for t in study.best_trials}
    assert front and len(study.trials) == 4
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resnet_sweep").experiment_id])
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert {r.info.run_id for r in trials if r.data.tags.get("pareto") == "true"} == front
    for run in trials:  # every run records what it cost, whatever the objectives
        assert run.data.metrics["num_parameters"] == float(run.data.params["model.num_parameters"])
        assert run.data.metrics["flops_per_sample"] > run.data.metrics["num_parameters"]
        assert run.data.metrics["train_seconds"] > 0
    assert "Pareto-optimal trials (val_acc maximize, num_parameters minimize): trial" in res.stderr + res.stdout
    (report,) = workdir.glob("outputs/reports/resnet_sweep-*")
    assert (report / "pareto_front.png").stat().st_size > 10_000
    assert "## Pareto-optimal trials (tagged pareto=true)" in (report / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.fresh
def test_pruning_several_objectives_is_refused_before_anything_is_created(workdir: Path) -> None:
    res = run_cli(workdir, "-m", "objective=[val_acc,num_parameters]", "hydra.sweeper.direction=[maximize,minimize]",
                  "pruner=median", "trainer.epochs=1", "data.train_subset=128")
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in (res.stdout + res.stderr).splitlines() if "Optuna prunes only single-objective" in line]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "pruner=median:" in lines[0] and "objective=[val_acc,num_parameters] has 2; add pruner=none" in lines[0]
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()
