"""Figures and a summary table from what MLflow recorded, and only that (it never imports the training code).

`python -m resnet_sweep.report [--experiment NAME] [--run ID]` picks the latest top-level run of the
experiment (a sweep's parent run, or a single run), reads its trials back through the MLflow client,
writes PNG figures and summary.md to outputs/reports/<experiment>-<run>/, and logs them as artifacts
of that run. Which figures it draws depends on what the runs vary:
- depth_vs_accuracy.png: training error and test accuracy vs depth, plain vs resnet, mean +- std
  over seeds (He et al. 2015, Fig. 1/6 in spirit), when runs span depths and families;
- training_curves.png: training and validation error per epoch, one line per depth, plain | resnet;
- gradient_profile_depth<N>.png: weight-gradient norm vs layer index (log scale), at init and after
  training, one line per activation/norm/family/init setting;
- accuracy_per_epoch.png: validation accuracy per epoch for one run (the seed article's plot);
- lesion_single.png, lesion_k.png: test accuracy with each block deleted, and with k random blocks
  deleted, plain vs resnet, one panel per depth (Veit et al. 2016), when runs carry lesion metrics.
A sweep's claims (its experiment's `claims:`, claims.py) get a verdict each, in summary.md and printed, and
tagged claim.<name> on its run. `--compare A B [...]` puts several sweeps on the same axes and side by side
in one table, labelled by the settings that differ between them, logged as a run of experiment `comparisons`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from resnet_sweep import claims as claim_checks  # noqa: E402
from resnet_sweep.config import COSTS, direction  # noqa: E402

GRAD = re.compile(r"weight_grad/(\d+)$")
RATIO = "grad_ratio_first_last"
# The settings a report tells apart; seeds are what it averages over.
SETTING_KEYS = ("model.family", "model.depth", "model.activation", "model.norm", "model.init",
                "model.preactivation", "model.layout", "data.name")
FAMILY_COLOR = {"plain": "tab:red", "resnet": "tab:blue"}
PREACT_COLOR = "tab:green"  # pre-activation ResNets (He et al. 2016) in the gradient profiles


@dataclass
class Trial:
    """One recorded run, as the report needs it."""

    run_id: str
    status: str
    params: dict[str, str]
    final: dict[str, float]
    history: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {step: value}

    def setting(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(self.params.get(k, "") for k in keys)

    def grad_profile(self, step: int) -> list[float]:
        layers = sorted(int(GRAD.match(k).group(1)) for k in self.history if GRAD.match(k))
        return [self.history[f"weight_grad/{i:03d}"].get(step, float("nan")) for i in layers]

    @property
    def last_epoch(self) -> int:
        return max(self.history.get("train_acc", {0: 0}))


def _load(client: MlflowClient, run: Run, with_grads: bool = True) -> Trial:
    keys = [k for k in run.data.metrics if with_grads or not GRAD.match(k)]
    history = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in keys}
    final = dict(run.data.metrics)
    if 0 in history.get(RATIO, {}):  # what claims may compare beyond the final metrics (config.CLAIM_METRICS)
        final["grad_ratio_at_init"] = history[RATIO][0]
    if (single := history.get("lesion.single_acc")) and "lesion.intact_acc" in final:
        final["lesion.single_drop"] = final["lesion.intact_acc"] - statistics.fmean(single.values())
    return Trial(run.info.run_id, run.info.status, dict(run.data.params), final, history)


def find_runs(client: MlflowClient, experiment: str | None, run_id: str | None) -> tuple[Run, list[Run]]:
    """(the top run, its trials): a sweep's parent and children, or a single run and itself."""
    if run_id:
        top = client.get_run(run_id)
    else:
        exps = client.search_experiments()
        if experiment:
            exps = [e for e in exps if e.name == experiment]
            if not exps:
                raise SystemExit(f"no MLflow experiment named '{experiment}'; have: "
                                 f"{', '.join(e.name for e in client.search_experiments())}")
        found = client.search_runs([e.experiment_id for e in exps], "attributes.status != 'RUNNING'",
                                   order_by=["attributes.start_time DESC"], max_results=200)
        top_level = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        if not top_level:
            raise SystemExit("no finished runs to report on; run an experiment first "
                             "(e.g. python -m resnet_sweep experiment=degradation -m)")
        top = top_level[0]
    if top.data.tags.get("role") != "sweep":
        return top, [top]
    children = client.search_runs([top.info.experiment_id], f"tags.mlflow.parentRunId = '{top.info.run_id}'",
                                  max_results=5000)
    return top, children


# Why the training curve sits below validation in the first epochs: it is what the epoch's batches scored
# while the weights were still moving, with BatchNorm using each batch's statistics.
TRAINING_CURVE_NOTE = ("* training = running mean over the epoch's batches, in training mode (batch statistics, "
                       "weights still changing); validation = after the epoch, in evaluation mode")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _groups(trials: list[Trial], keys: tuple[str, ...]) -> dict[tuple[str, ...], list[Trial]]:
    out: dict[tuple[str, ...], list[Trial]] = defaultdict(list)
    for t in trials:
        out[t.setting(keys)].append(t)
    return dict(out)


def _varying(trials: list[Trial]) -> tuple[str, ...]:
    return tuple(k for k in SETTING_KEYS if len({t.params.get(k) for t in trials}) > 1)


def _save(fig: plt.Figure, path: Path, title: str | None = None, rect: tuple[float, ...] = (0, 0, 1, 1),
          dpi: int = 110) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _seeds(groups: dict[tuple[str, ...], list[Trial]]) -> int:
    """How many runs each setting has (the most): error bars and "± std" only where it is more than one."""
    return max((len(g) for g in groups.values()), default=1)


def depth_vs_accuracy(trials: list[Trial], out: Path, title: str) -> Path:
    fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(11, 4.2))
    seeds = _seeds(_groups(trials, ("model.family", "model.depth")))
    for family, group in sorted(_groups(trials, ("model.family",)).items()):
        by_depth = _groups(group, ("model.depth",))
        depths = sorted(by_depth, key=lambda d: int(d[0]))
        x = [int(d[0]) for d in depths]
        for ax, metric, err in ((ax_train, "train_acc", True), (ax_test, "test_acc", False)):
            stats = [_mean_std([_percent(t, metric, err) for t in by_depth[d]]) for d in depths]
            ax.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats] if seeds > 1 else None, marker="o",
                        capsize=4, color=FAMILY_COLOR.get(family[0]), label=f"{family[0]}")
    for ax in _depth_axes(ax_train, ax_test):
        ax.legend(title=f"family (mean ± std over {seeds} seeds)" if seeds > 1 else "family (one run per depth)")
    return _save(fig, out / "depth_vs_accuracy.png", title)


def _percent(trial: Trial, metric: str, error: bool) -> float:
    """An accuracy in %, or its error (100 - it) where the panel shows error."""
    return 100 * (1 - trial.final[metric]) if error else 100 * trial.final[metric]


def _depth_axes(ax_train: Any, ax_test: Any) -> tuple[Any, Any]:
    """Label the two panels of a depth-vs-accuracy figure (training error | test accuracy); returns them."""
    ax_train.set(xlabel="depth (weighted layers)", ylabel="training error at the last epoch (%)",
                 title="Training error: lower is better")
    ax_test.set(xlabel="depth (weighted layers)", ylabel="test accuracy (%)", title="Test accuracy: higher is better")
    for ax in (ax_train, ax_test):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return ax_train, ax_test


def _training_axes(axes: Any, trials: list[Trial], families: list[str], note: str = "") -> None:
    """Training and validation error per epoch on one row of axes, a panel per family, a line per depth."""
    depths = sorted({int(t.params.get("model.depth", 0)) for t in trials})
    cmap = plt.get_cmap("viridis")
    for ax, family in zip(axes, families):
        for i, depth in enumerate(depths):
            group = [t for t in trials if t.params.get("model.family") == family
                     and int(t.params.get("model.depth", 0)) == depth]
            if not group:
                continue
            color = cmap(i / max(1, len(depths) - 1))
            for metric, style in (("train_acc", "-"), ("val_acc", "--")):
                epochs = sorted(set.intersection(*(set(t.history.get(metric, {})) for t in group)))
                mean = [statistics.fmean(100 * (1 - t.history[metric][e]) for t in group) for e in epochs]
                ax.plot(epochs, mean, style, color=color, label=f"{depth} layers" if metric == "train_acc" else None)
        ax.set(title=f"{note}{family}: solid = training*, dashed = validation", xlabel="epoch", ylabel="error (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(title="depth", fontsize=8)


def training_curves(trials: list[Trial], out: Path, title: str) -> Path:
    families = sorted({t.params.get("model.family", "") for t in trials})
    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4.2), sharey=True, squeeze=False)
    _training_axes(axes[0], trials, families)
    fig.text(0.5, 0.01, TRAINING_CURVE_NOTE, ha="center", fontsize=8)
    return _save(fig, out / "training_curves.png", title, rect=(0, 0.04, 1, 1))


def _label(params: dict[str, str]) -> str:
    init = params.get("model.init", "")
    if init == "normal":
        init = f"N(0, {params.get('model.init_std')}²)"
    pre = " pre-act" if params.get("model.preactivation") == "True" else ""
    return f"{params.get('model.family')}{pre}, {init} init"


def gradient_profiles(trials: list[Trial], out: Path, title: str) -> list[Path]:
    """One figure per depth: a column per (activation, norm), rows at init and after training; in each
    panel one line per family x init (x pre-activation), one run (the first seed) each."""
    paths = []
    for (depth,), group in sorted(_groups(trials, ("model.depth",)).items(), key=lambda kv: int(kv[0][0])):
        columns = sorted(_groups(group, ("model.activation", "model.norm")).items(),
                         key=lambda kv: (kv[0][0] != "sigmoid", kv[0][1] != "none"))
        fig, axes = plt.subplots(2, len(columns), figsize=(4.2 * len(columns) + 0.5, 7.8), squeeze=False,
                                 sharey=True)
        handles = {}
        for col, ((activation, norm), runs) in enumerate(columns):
            for row, when in enumerate(("at initialisation", "after training")):
                ax = axes[row][col]
                for key, same in sorted(_groups(runs, ("model.family", "model.init", "model.preactivation")).items()):
                    t = same[0]
                    if row == 1 and t.status != "FINISHED":
                        continue  # a diverged run has no after-training profile
                    prof = t.grad_profile(0 if row == 0 else t.last_epoch)
                    (line,) = ax.plot(range(len(prof)), [v if v > 0 else float("nan") for v in prof],
                                      color=PREACT_COLOR if key[2] == "True" else FAMILY_COLOR.get(key[0]),
                                      linestyle="-" if key[1] != "normal" else "--",
                                      marker="o" if key[2] == "True" else None, markersize=3, linewidth=1.6)
                    handles.setdefault(_label(t.params), line)
                ax.set_yscale("log")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
                ax.grid(alpha=0.3, which="major")
                norm_name = "BatchNorm" if norm == "batch" else "no BatchNorm"
                ax.set_title(f"{activation}, {norm_name}\n{when}", fontsize=10)
                if row == 1:
                    ax.set_xlabel("layer index (0 = first conv)")
                if col == 0:
                    ax.set_ylabel("‖∂loss/∂W‖₂ of the layer")
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)),
                   frameon=False, fontsize=9)
        fig.suptitle(f"{title}, depth {depth}: the weight-gradient norm of every layer "
                     "(a line that stops: the gradient underflowed to 0 in float32)", fontsize=11)
        paths.append(_save(fig, out / f"gradient_profile_depth{depth}.png", rect=(0, 0.06, 1, 1), dpi=100))
    return paths


def accuracy_per_epoch(trial: Trial, out: Path, title: str) -> Path:
    val = trial.history.get("val_acc", {})
    epochs = sorted(val)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(epochs, [100 * val[e] for e in epochs], marker="o", label="validation accuracy")
    if "train_acc" in trial.history:
        tr = trial.history["train_acc"]
        ax.plot(sorted(tr), [100 * tr[e] for e in sorted(tr)], marker=".", alpha=0.6,
                label="training accuracy (running mean over the epoch, training mode)")
    if epochs:
        best = max(epochs, key=lambda e: val[e])
        ax.annotate(f"best {100 * val[best]:.2f} % (epoch {best})", (best, 100 * val[best]),
                    textcoords="offset points", xytext=(-60, -25), arrowprops={"arrowstyle": "->"})
    test = trial.final.get("test_acc")
    ax.set(xlabel="epoch", ylabel="accuracy (%)",
           title=f"{title}" + (f" — test accuracy {100 * test:.2f} %" if test is not None else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out / "accuracy_per_epoch.png")


def _lesioned(trials: list[Trial]) -> list[Trial]:
    return sorted((t for t in trials if "lesion.intact_acc" in t.final),
                  key=lambda t: (int(t.params.get("model.depth", 0)), t.params.get("model.family", "")))


def lesion_figures(trials: list[Trial], out: Path, title: str) -> list[Path]:
    """Veit et al. 2016's two views, one panel per depth, plain vs resnet: test accuracy with each block
    deleted (dashed: the intact net), and with k random blocks deleted (mean, band from worst to best draw)."""
    by_depth = _groups(_lesioned(trials), ("model.depth",))
    depths = sorted(by_depth, key=lambda d: int(d[0]))
    paths = []
    for name, metric, xlabel in (("lesion_single.png", "lesion.single_acc", "deleted block (input side first)"),
                                 ("lesion_k.png", "lesion.k_acc_mean", "number of blocks deleted at random")):
        fig, axes = plt.subplots(1, len(depths), figsize=(4.6 * len(depths), 4), squeeze=False, sharey=True)
        for ax, depth in zip(axes[0], depths):
            for t in by_depth[depth]:
                family = t.params.get("model.family", "?")
                color, intact = FAMILY_COLOR.get(family), 100 * t.final["lesion.intact_acc"]
                steps = sorted(t.history.get(metric, {}))
                x = steps if metric == "lesion.single_acc" else [0, *steps]
                y = [100 * t.history[metric][k] for k in steps]
                if metric == "lesion.single_acc":
                    ax.axhline(intact, color=color, linestyle="--", linewidth=1, label=f"{family}, intact")
                    ax.plot(x, y, marker="o", markersize=3, color=color, label=f"{family}, one block deleted")
                else:
                    ax.plot(x, [intact, *y], marker="o", markersize=3, color=color, label=f"{family}, mean of draws")
                    ax.fill_between(steps, [100 * t.history["lesion.k_acc_min"][k] for k in steps],
                                    [100 * t.history["lesion.k_acc_max"][k] for k in steps], color=color, alpha=0.15,
                                    label=f"{family}, worst to best draw")
            ax.set_title(f"depth {depth[0]}")
            ax.set_xlabel(xlabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("test accuracy (%)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
        paths.append(_save(fig, out / name, title, rect=(0, 0.07, 1, 0.93)))
    return paths


def objectives(trials: list[Trial]) -> list[str]:
    """The objectives the runs were swept on (the `objective` param: a name, or a list's repr)."""
    recorded = trials[0].params.get("objective", "val_acc") if trials else "val_acc"
    return re.findall(r"[\w.]+", recorded)


def _per_trial(runs: list[Trial], tags: dict[str, dict[str, str]], names: list[str]) -> list[tuple[Trial, dict, bool]]:
    """(a run, the objectives' means over its trial's seed runs, whether the trial is Pareto-optimal)."""
    trials: dict[str, list[Trial]] = defaultdict(list)
    for t in runs:
        trials[tags.get(t.run_id, {}).get("optuna.trial", t.run_id)].append(t)
    return [(same[0], {n: statistics.fmean(t.final[n] for t in same) for n in names},
             any(tags.get(t.run_id, {}).get("pareto") == "true" for t in same)) for same in trials.values()]


def pareto_front(trials: list[Trial], tags: dict[str, dict[str, str]], out: Path, title: str) -> Path:
    """Every finished trial (the mean over its seeds) by two of its objectives, a metric up the y axis and a
    cost along x (log scale) where there is one; the Pareto-optimal trials circled and labelled by net,
    and joined where there are just two objectives (with more, the front is not a line in this plane)."""
    names = objectives(trials)
    y_name = next((n for n in names if n not in COSTS), names[0])
    x_name = next(n for n in names if n != y_name)
    done = _per_trial([t for t in trials if t.status == "FINISHED" and all(n in t.final for n in names)], tags, names)
    front = sorted(((t, v) for t, v, best in done if best), key=lambda tv: tv[1][x_name])
    scale = 100 if y_name.endswith("acc") else 1
    fig, ax = plt.subplots(figsize=(8, 5))
    for family in sorted({t.params.get("model.family", "") for t, _, _ in done}):
        mine = [v for t, v, _ in done if t.params.get("model.family", "") == family]
        ax.scatter([v[x_name] for v in mine], [scale * v[y_name] for v in mine], alpha=0.45, s=28,
                   color=FAMILY_COLOR.get(family, "tab:gray"), label=f"{family or 'trial'} (every trial)")
    ax.plot([v[x_name] for _, v in front], [scale * v[y_name] for _, v in front], "k-o" if len(names) == 2 else "ko",
            markersize=7, markerfacecolor="none", label="Pareto-optimal")
    at: dict[tuple[float, float], list[str]] = defaultdict(list)  # nets at one point share one label
    for t, v in front:
        at[(v[x_name], scale * v[y_name])].append(f"{t.params.get('model.family', '')}-{t.params.get('model.depth', '')}")
    for point, nets in at.items():
        ax.annotate(", ".join(nets), point, textcoords="offset points", xytext=(6, -12), fontsize=8)
    better = {n: "fewer is better" if direction(n) == "minimize" else "more is better" for n in (x_name, y_name)}
    ax.set(xscale="log" if x_name in COSTS else "linear", xlabel=f"{x_name} ({better[x_name]}"
           f"{', log scale' if x_name in COSTS else ''})", ylabel=f"{y_name}{' (%)' if scale == 100 else ''} "
           f"({better[y_name]})", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out / "pareto_front.png")


def lesion_table(trials: list[Trial]) -> str:
    rows = []
    for t in _lesioned(trials):
        single = list(t.history.get("lesion.single_acc", {}).values())
        k = t.history.get("lesion.k_acc_mean", {})
        rows.append({"net": f"{t.params.get('model.family')}-{t.params.get('model.depth')}",
                     "intact": f"{100 * t.final['lesion.intact_acc']:.1f}",
                     "one deleted: mean": f"{100 * statistics.fmean(single):.1f}" if single else "-",
                     "one deleted: worst": f"{100 * min(single):.1f}" if single else "-",
                     "k deleted at random: mean (k: %)": ", ".join(f"{i}: {100 * k[i]:.0f}" for i in sorted(k))})
    return to_markdown(rows) if rows else ""


def summary_table(trials: list[Trial], keys: tuple[str, ...]) -> list[dict[str, str]]:
    rows = []
    for setting, group in sorted(_groups(trials, keys).items(), key=lambda kv: tuple(
            (int(v) if v.isdigit() else v) for v in kv[0])):
        done = [t for t in group if t.status == "FINISHED" and "train_acc" in t.final]
        row = {k.split(".")[-1]: v for k, v in zip(keys, setting)}
        row["runs"] = f"{len(done)}/{len(group)}"
        for metric in ("train_acc", "test_acc"):
            vals = [100 * t.final[metric] for t in done if metric in t.final]
            mean, std = _mean_std(vals) if vals else (0.0, 0.0)
            row[metric + " %"] = "failed" if not vals else f"{mean:.1f} ± {std:.1f}" if len(vals) > 1 else f"{mean:.1f}"
        init_ratios = [t.history.get(RATIO, {}).get(0) for t in group]
        end_ratios = [t.final.get(RATIO) for t in done]
        row["grad ratio init"] = _fmt_ratio(init_ratios)
        row["grad ratio end"] = _fmt_ratio(end_ratios)
        rows.append(row)
    return rows


def _fmt_ratio(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if all(math.isnan(v) for v in vals):
        return "0/0 (underflow)"  # both norms underflowed to 0
    return f"{statistics.median(v for v in vals if not math.isnan(v)):.2g}"


def to_markdown(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no runs)\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def verdicts(top: Run, trials: list[Trial]) -> tuple[dict[str, Any], list[claim_checks.Verdict]]:
    """The claims recorded on a sweep's run (its experiment's `claims:`) and their verdicts on its trials;
    a run that failed counts as one without the metric, one interrupted (KILLED: its trial ran again as
    another run) not at all."""
    specs = json.loads(top.data.tags.get(claim_checks.CLAIMS_TAG, "{}"))
    runs = [t for t in trials if t.status != "KILLED"]
    done = [t.final if t.status == "FINISHED" else {} for t in runs]
    return specs, claim_checks.check_all(specs, [t.params for t in runs], done)


def claims_section(client: MlflowClient, top: Run, trials: list[Trial]) -> list[str]:
    """summary.md's claims table; each verdict printed and tagged claim.<name> on the sweep's run."""
    specs, found = verdicts(top, trials)
    if not found:
        return []
    for v in found:
        client.set_tag(top.info.run_id, claim_checks.VERDICT_TAG.format(v.name), v.verdict)
        print(f"claim {v.name}: {v.verdict.upper()}{f' - {v.says}' if v.says else ''}; a - b = {v.interval()} "
              f"(runs {v.n_a} / {v.n_b}{f'; {v.note}' if v.note else ''})")
    return ["## Claims", "", CLAIMS_NOTE, "", to_markdown(claim_checks.table(found, specs))]


CLAIMS_NOTE = ("Effect = mean over runs `a` minus mean over runs `b`, with Welch's 95 % t interval over the runs "
               "on each side (their seeds, and the settings the claim leaves free): Welch's, because the two "
               "sides need not spread alike (a plain net's seeds spread far more than a ResNet's), and t, "
               "because with a few runs a side the normal quantile would make it too narrow. *holds*: the whole interval "
               "is past the threshold, *does not hold*: none of it is, *undecided*: it crosses it, or one side "
               "has a single run or neither side spreads (no interval exists). The claims are the experiment's `claims:` (conf/experiment/).")


def write_report(uri: str, experiment: str | None = None, run_id: str | None = None, sweep_run_id: str | None = None,
                 out_root: Path = Path("outputs/reports")) -> Path:
    """Draw the report of one run or sweep; return its folder."""
    client = MlflowClient(uri)
    top, runs = find_runs(client, experiment, run_id or sweep_run_id)
    exp_name = client.get_experiment(top.info.experiment_id).name
    trials = [_load(client, r) for r in runs]
    out = out_root / f"{exp_name}-{top.info.run_id[:8]}"
    out.mkdir(parents=True, exist_ok=True)
    dataset = trials[0].params.get("data.name", "?") if trials else "?"
    varying = _varying(trials)
    finished = [t for t in trials if t.status == "FINISHED" and "train_acc" in t.final]
    figures: list[Path] = []
    if set(varying) == {"model.family", "model.depth"} and finished:
        epochs = finished[0].params.get("trainer.epochs")
        title = f"Plain vs residual nets on {dataset}, {epochs} epochs, same recipe (only the shortcuts differ)"
        figures += [depth_vs_accuracy(finished, out, title), training_curves(finished, out, title)]
    if any(t.grad_profile(0) for t in trials) and {"model.activation", "model.norm", "model.init"} & set(varying):
        figures += gradient_profiles(trials, out, f"Vanishing gradients on {dataset}")
    front: list[str] = []
    if len(objectives(trials)) > 1 and finished:
        tags = {r.info.run_id: r.data.tags for r in runs}
        figures.append(pareto_front(trials, tags, out, f"{' vs '.join(objectives(trials)[:2])} on {dataset}: "
                                                       f"{len(finished)} trials, the Pareto front joined"))
        front = ["## Pareto-optimal trials (tagged pareto=true)", "", to_markdown([
            {"run": t.run_id, "net": f"{t.params.get('model.family')}-{t.params.get('model.depth')}",
             **{name: f"{t.final[name]:,.0f}" if name in claim_checks.EXACT else f"{t.final[name]:.4g}"
                for name in objectives(trials) if name in t.final}}
            for t in finished if tags.get(t.run_id, {}).get("pareto") == "true"])]
    lesions = lesion_table(trials)
    if lesions:
        figures += lesion_figures(trials, out, f"Deleting blocks of trained nets at test time (Veit et al. 2016), "
                                               f"{dataset}")
    if len(trials) == 1:
        t = trials[0]
        figures.append(accuracy_per_epoch(t, out, f"{t.params.get('model.layout', '')} "
                                                  f"{t.params.get('model.family', '')} on {dataset}"))
    keys = varying or ("model.family", "model.depth")
    table = to_markdown(summary_table(trials, keys))
    md = [f"# Report: {exp_name}, run {top.info.run_id}", "",
          f"{len(trials)} run(s) on {dataset}; settings vary in: {', '.join(varying) or 'nothing'}. "
          + ("Accuracies are means ± std over seeds" if _seeds(_groups(trials, keys)) > 1 else
             "Accuracies are of one run per setting") + ", at the last epoch; grad ratio = first-layer over "
          "last-layer weight-gradient norm (median over seeds), at init and at the last epoch.", "", table]
    md += front + claims_section(client, top, trials)
    if lesions:
        md += ["Test accuracy (%) of each trained net intact, with one deletable block deleted (mean and worst "
               "over the blocks), and with k random blocks deleted (mean over draws):", "", lesions]
    md += [f"![{p.stem}]({p.name})" for p in figures]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print(table)
    if lesions:
        print(lesions)
    for p in figures:
        print(f"wrote {p}")
    print(f"wrote {out / 'summary.md'}")
    client.log_artifacts(top.info.run_id, str(out), "report")
    return out


# --compare: several sweeps side by side. What a label may name: a setting constant within each sweep that
# differs between them (data.name=digits vs fashion_mnist); not what every sweep sets per trial.
NOT_A_SETTING = ("sweep.", "tracking.", "seed", "model.num_parameters", "device", "trainer.device")
SWEEP_STYLES = ("-", "--", ":", "-.")
SWEEP_MARKERS = ("o", "s", "^", "D")
LINE_NAMES = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}


@dataclass
class Sweep:
    """One sweep of a comparison: its run, its trials and the label that tells it apart."""

    top: Run
    trials: list[Trial]
    label: str = ""


def resolve(client: MlflowClient, ref: str) -> Run:
    """A sweep's run from a run id, an experiment name (its latest finished sweep, else its latest) or an
    Optuna study name (matched here, not in MLflow's filter: a study name may hold any character)."""
    exps = client.search_experiments()
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            pass
    by_exp = [e.experiment_id for e in exps if e.name == ref]
    found = [r for r in client.search_runs(by_exp or [e.experiment_id for e in exps], "tags.role = 'sweep'",
                                           order_by=["attributes.start_time DESC"], max_results=5000)
             if by_exp or r.data.tags.get("optuna.study") == ref]
    if not found:
        raise SystemExit(f"--compare {ref}: no sweep has that run id, experiment name or study name; experiments: "
                         f"{', '.join(e.name for e in exps)} (a sweep's run id is its parent run's, in the MLflow UI)")
    return next((r for r in found if r.info.status == "FINISHED"), found[0])


def _labels(sweeps: list[Sweep]) -> None:
    """Label each sweep by the settings that differ between them (each constant within its sweep), its run
    id where that leaves two alike, and its status where it has not finished."""
    values = [{k: {t.params.get(k) for t in s.trials} for k in {k for t in s.trials for k in t.params}} for s in sweeps]
    keys = sorted({k for v in values for k in v})
    differ = [k for k in keys if not k.startswith(NOT_A_SETTING) and all(len(v.get(k, {None})) == 1 for v in values)
              and len({next(iter(v.get(k, {None}))) for v in values}) > 1]
    # what the commands set, first: a key given on a command line; for a group chosen there (data=...),
    # its name (data.name), not every value the preset brings (data.mean, data.std, ...)
    given = {o.split("=", 1)[0].lstrip("+~") for s in sweeps for o in s.top.data.tags.get("hydra.overrides", "").split()}
    named = [k for k in differ if k in given or (k.split(".")[0] in given and (
        k.endswith(".name") or f"{k.split('.')[0]}.name" not in differ))]
    differ = named or differ
    for sweep, v in zip(sweeps, values):
        sweep.label = ", ".join(f"{k}={next(iter(v.get(k, {None})))}" for k in differ[:4])
    for sweep in sweeps:
        if not sweep.label or [s.label for s in sweeps].count(sweep.label) > 1:
            sweep.label = f"{sweep.label} (run {sweep.top.info.run_id[:8]})".lstrip()
        if sweep.top.info.status != "FINISHED":
            sweep.label += f" ({sweep.top.info.status})"
            print(f"warning: sweep {sweep.top.info.run_id} is {sweep.top.info.status}: compared as it stands")


def _band(ax: Any, x: list[int], values: list[list[float]], **style: Any) -> None:
    """The mean over seeds as a line, its 95 % t interval as a band where a depth has more than one seed."""
    x, stats = zip(*[(d, claim_checks.mean_interval(v)) for d, v in zip(x, values) if v]) if any(values) else ((), ())
    ax.plot(x, [m for m, _, _ in stats], **style)
    banded = [(d, lo, hi) for d, (_, lo, hi) in zip(x, stats) if lo is not None]
    if len(banded) > 1:
        ax.fill_between(*zip(*banded), color=style.get("color"), alpha=0.12)


def compare_depth(sweeps: list[Sweep], out: Path) -> Path:
    fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, sweep in enumerate(sweeps):
        done = [t for t in sweep.trials if t.status == "FINISHED" and "train_acc" in t.final]
        for (family,), group in sorted(_groups(done, ("model.family",)).items()):
            by_depth = _groups(group, ("model.depth",))
            depths = sorted(by_depth, key=lambda d: int(d[0]))
            style = {"color": FAMILY_COLOR.get(family), "linestyle": SWEEP_STYLES[i % 4],
                     "marker": SWEEP_MARKERS[i % 4], "label": f"{family}, {sweep.label}"}
            for ax, metric, err in ((ax_train, "train_acc", True), (ax_test, "test_acc", False)):
                _band(ax, [int(d[0]) for d in depths],
                      [[_percent(t, metric, err) for t in by_depth[d] if metric in t.final] for d in depths], **style)
    for ax in _depth_axes(ax_train, ax_test):
        ax.set_ylim(max(0.0, ax.get_ylim()[0]), min(100.0, ax.get_ylim()[1]))  # a band past 0 or 100 % says no more
    ax_test.legend(title="mean over seeds; band: its 95 % t interval (2+ seeds)", fontsize=8, title_fontsize=8)
    return _save(fig, out / "depth_vs_accuracy.png", "Depth vs accuracy: " + " | ".join(
        f"{LINE_NAMES[SWEEP_STYLES[i % 4]]}: {s.label}" for i, s in enumerate(sweeps)))


def compare_curves(sweeps: list[Sweep], out: Path) -> Path:
    families = sorted({t.params.get("model.family", "") for s in sweeps for t in s.trials})
    fig, axes = plt.subplots(len(sweeps), len(families), figsize=(5.5 * len(families), 3.8 * len(sweeps)),
                             sharey=True, squeeze=False)
    for row, sweep in zip(axes, sweeps):
        _training_axes(row, [t for t in sweep.trials if t.status == "FINISHED"], families, note=f"{sweep.label}\n")
    fig.text(0.5, 0.005, TRAINING_CURVE_NOTE, ha="center", fontsize=8)
    return _save(fig, out / "training_curves.png", "Training curves, one row per sweep", rect=(0, 0.03, 1, 1))


def compare_gradients(sweeps: list[Sweep], out: Path) -> Path | None:
    """Each sweep's weight-gradient profile after training at its deepest depth, one line per setting."""
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4.2), sharey=True, squeeze=False)
    drawn = False
    for ax, sweep in zip(axes[0], sweeps):
        done = [t for t in sweep.trials if t.status == "FINISHED" and t.grad_profile(0)]
        deepest = max((int(t.params.get("model.depth", 0)) for t in done), default=None)
        groups = sorted(_groups([t for t in done if int(t.params.get("model.depth", 0)) == deepest],
                                ("model.family", "model.activation", "model.norm", "model.init")).items())
        for i, (key, same) in enumerate(groups):  # one colour per setting; plain solid, resnet dashed
            prof = same[0].grad_profile(same[0].last_epoch)
            ax.plot(range(len(prof)), [v if v > 0 else float("nan") for v in prof], color=plt.get_cmap("tab10")(i),
                    linestyle="-" if key[0] == "plain" else "--", label=" ".join(key))
            drawn = True
        ax.set(yscale="log", xlabel="layer index", title=f"{sweep.label}\n" + (
            f"depth {deepest}, after training" if groups else "no gradient norms recorded"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("‖∂loss/∂W‖₂ of the layer")
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, out / "gradient_profiles.png", "Weight-gradient norm by layer, one panel per sweep")


def _cell(values: list[float]) -> str:
    """Mean [95 % t interval, clipped to 0-100 %] of accuracies in %, or the one run's value."""
    if not values:
        return "–"
    mean, lo, hi = claim_checks.mean_interval(values)
    return f"{mean:.1f} (1 run)" if lo is None else f"{mean:.1f} [{max(lo, 0.0):.1f}, {min(hi, 100.0):.1f}]"


def compare_tables(sweeps: list[Sweep]) -> list[str]:
    """The accuracies per setting and the claims' verdicts, a column per sweep."""
    keys = tuple(k for k in SETTING_KEYS if any(len({t.params.get(k) for t in s.trials}) > 1 for s in sweeps)) or (
        "model.family",)
    settings = sorted({t.setting(keys) for s in sweeps for t in s.trials},
                      key=lambda st: tuple((int(v) if v.isdigit() else v) for v in st))
    rows = []
    for setting in settings:
        for metric in ("train_acc", "test_acc"):
            row = {"setting": " ".join(setting), "metric": f"{metric} % (95 % CI)"}
            for s in sweeps:
                row[s.label] = _cell([100 * t.final[metric] for t in s.trials if t.setting(keys) == setting
                                      and t.status == "FINISHED" and metric in t.final])
            rows.append(row)
    claim_rows: dict[str, dict[str, str]] = {}
    for s in sweeps:
        for v in verdicts(s.top, s.trials)[1]:
            row = claim_rows.setdefault(v.name, {"claim": v.title})
            row[s.label] = f"**{v.verdict}**: {v.interval()}"
    for row in claim_rows.values():
        row.update({s.label: row.get(s.label, "(not claimed)") for s in sweeps})
    md = ["## Accuracy per setting", "", to_markdown(rows)]
    if claim_rows:
        md += ["## Claims", "", CLAIMS_NOTE, "", to_markdown(list(claim_rows.values()))]
    return md


def compare(uri: str, refs: list[str], out_root: Path = Path("outputs/reports")) -> Path:
    """Draw several sweeps on the same axes and tabulate them side by side; log it all as a run of the
    MLflow experiment `comparisons` (the compared runs stay as they ended)."""
    client = MlflowClient(uri)
    sweeps = [Sweep(top, [_load(client, r) for r in find_runs(client, None, top.info.run_id)[1]])
              for top in (resolve(client, ref) for ref in refs)]
    _labels(sweeps)
    out = out_root / ("compare-" + "-".join(s.top.info.run_id[:8] for s in sweeps))
    out.mkdir(parents=True, exist_ok=True)
    figures = [compare_depth(sweeps, out), compare_curves(sweeps, out)]
    figures += [p for p in [compare_gradients(sweeps, out)] if p is not None]
    md = [f"# Comparison: {' vs '.join(s.label for s in sweeps)}", "",
          "Sweeps (the columns): " + "; ".join(f"{s.label} = run {s.top.info.run_id} "
                                                f"({len(s.trials)} runs)" for s in sweeps), "",
          *compare_tables(sweeps), *[f"![{p.stem}]({p.name})" for p in figures]]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[2:-len(figures)]))
    experiment = client.get_experiment_by_name("comparisons")
    if experiment is None:  # its files where the first sweep's are (mlartifacts/; a server: where it keeps them)
        where = client.get_experiment(sweeps[0].top.info.experiment_id).artifact_location
        experiment = client.get_experiment(client.create_experiment(
            "comparisons", None if where.startswith("mlflow-artifacts:") else where))
    run = client.create_run(experiment.experiment_id,
                            run_name=" vs ".join(s.label for s in sweeps)[:250],
                            tags={"role": "comparison", "compared": " ".join(s.top.info.run_id for s in sweeps)})
    client.log_artifacts(run.info.run_id, str(out), "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    for p in [*figures, out / "summary.md"]:
        print(f"wrote {p}")
    print(f"logged as MLflow run {run.info.run_id} (experiment 'comparisons')")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_sweep.report", description=__doc__.split("\n")[0])
    parser.add_argument("--uri", default=f"sqlite:///{Path('mlflow.db').resolve()}",
                        help="MLflow tracking URI (default: mlflow.db in this folder)")
    parser.add_argument("--experiment", help="MLflow experiment name (default: the one with the latest run)")
    parser.add_argument("--run", help="a sweep's parent run id or a single run's id (default: the latest)")
    parser.add_argument("--out", default="outputs/reports", help="folder for the report folders")
    parser.add_argument("--compare", nargs="+", metavar="SWEEP",
                        help="two or more sweeps side by side, each a run id, an experiment name (its latest sweep) "
                             "or an Optuna study name")
    args = parser.parse_args(argv)
    if args.uri.startswith("sqlite:///") and not Path(args.uri[len("sqlite:///"):]).exists():
        raise SystemExit(f"no MLflow database at {args.uri[len('sqlite:///'):]}: run from the project root or pass --uri")
    if args.compare:
        if len(args.compare) < 2:
            parser.error("--compare takes two or more sweeps")
        compare(args.uri, args.compare, out_root=Path(args.out))
    else:
        write_report(args.uri, args.experiment, args.run, out_root=Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
