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
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Run  # noqa: E402

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
    return Trial(run.info.run_id, run.info.status, dict(run.data.params), dict(run.data.metrics), history)


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
            stats = [_mean_std([100 * (1 - t.final[metric]) if err else 100 * t.final[metric]
                                for t in by_depth[d]]) for d in depths]
            ax.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats] if seeds > 1 else None, marker="o",
                        capsize=4, color=FAMILY_COLOR.get(family[0]), label=f"{family[0]}")
    ax_train.set(xlabel="depth (weighted layers)", ylabel="training error at the last epoch (%)",
                 title="Training error: lower is better")
    ax_test.set(xlabel="depth (weighted layers)", ylabel="test accuracy (%)", title="Test accuracy: higher is better")
    for ax in (ax_train, ax_test):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(title=f"family (mean ± std over {seeds} seeds)" if seeds > 1 else "family (one run per depth)")
    return _save(fig, out / "depth_vs_accuracy.png", title)


def training_curves(trials: list[Trial], out: Path, title: str) -> Path:
    families = sorted({t.params.get("model.family", "") for t in trials})
    depths = sorted({int(t.params.get("model.depth", 0)) for t in trials})
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4.2), sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
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
        ax.set(title=f"{family}: solid = training*, dashed = validation", xlabel="epoch", ylabel="error (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(title="depth", fontsize=8)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_sweep.report", description=__doc__.split("\n")[0])
    parser.add_argument("--uri", default=f"sqlite:///{Path('mlflow.db').resolve()}",
                        help="MLflow tracking URI (default: mlflow.db in this folder)")
    parser.add_argument("--experiment", help="MLflow experiment name (default: the one with the latest run)")
    parser.add_argument("--run", help="a sweep's parent run id or a single run's id (default: the latest)")
    parser.add_argument("--out", default="outputs/reports", help="folder for the report folders")
    args = parser.parse_args(argv)
    if args.uri.startswith("sqlite:///") and not Path(args.uri[len("sqlite:///"):]).exists():
        raise SystemExit(f"no MLflow database at {args.uri[len('sqlite:///'):]}: run from the project root or pass --uri")
    write_report(args.uri, args.experiment, args.run, out_root=Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
