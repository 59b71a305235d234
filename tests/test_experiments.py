"""Fast versions of each experiment, end to end through the CLI, asserting on what MLflow recorded."""

from __future__ import annotations

import re

from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import run_cli

pytestmark = pytest.mark.slow
FAST = ("trainer.epochs=1", "data.train_subset=128", "workers=serial")  # the grids, not parallel workers, are tested


def client_for(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def sweep_and_trials(workdir: Path, experiment: str) -> tuple:
    client = client_for(workdir)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("role") == "sweep"]
    return client, parent, [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def report_files(client: MlflowClient, run_id: str) -> set[str]:
    return {Path(a.path).name for a in client.list_artifacts(run_id, "report")}


def test_degradation_grid_runs_and_draws_its_report(workdir: Path) -> None:
    res = run_cli(workdir, "experiment=degradation", "-m", *FAST, "model.depth=choice(8,14)", "seed=choice(0)")
    assert res.returncode == 0, res.stderr[-3000:]
    client, parent, trials = sweep_and_trials(workdir, "degradation")
    settings = sorted((r.data.params["model.family"], int(r.data.params["model.depth"])) for r in trials)
    assert settings == [("plain", 8), ("plain", 14), ("resnet", 8), ("resnet", 14)]
    assert {r.info.status for r in trials} == {"FINISHED"}
    # the study is named after what it varies, not after the default model preset it never trains
    assert parent.info.run_name.startswith("sweep of depth+family+seed: study degradation-depth+family-digits-")
    # a run's name says which net it is, its trial and how it did
    assert re.fullmatch(r"#\d+ \d+\.\d% (plain|resnet)(8|14) relu BN",
                        trials[0].info.run_name), trials[0].info.run_name
    # the same recipe for both families: only the shortcuts differ
    assert len({(r.data.params["optimizer.lr"], r.data.params["trainer.epochs"]) for r in trials}) == 1
    assert {"depth_vs_accuracy.png", "training_curves.png", "summary.md"} <= report_files(client, parent.info.run_id)
    (summary,) = workdir.glob("outputs/reports/degradation-*/summary.md")
    rows = [line for line in summary.read_text().splitlines() if line.startswith(("| plain", "| resnet"))]
    assert len(rows) == 4


def test_vanishing_gradients_grid_records_the_articles_three_causes(workdir: Path) -> None:
    res = run_cli(workdir, "experiment=vanishing_gradients", "-m", *FAST, "model.depth=choice(20)")
    assert res.returncode == 0, res.stderr[-3000:]
    client, parent, trials = sweep_and_trials(workdir, "vanishing_gradients")
    assert len(trials) == 16

    def ratio_at_init(activation: str, norm: str, family: str, init: str = "kaiming") -> float:
        (run,) = [r for r in trials if (r.data.params["model.activation"], r.data.params["model.norm"],
                                        r.data.params["model.family"], r.data.params["model.init"])
                  == (activation, norm, family, init)]
        (first,) = [m for m in client.get_metric_history(run.info.run_id, "grad_ratio_first_last") if m.step == 0]
        return first.value

    assert ratio_at_init("sigmoid", "none", "plain") < 1e-6
    assert ratio_at_init("relu", "batch", "resnet") > 1e-2 and ratio_at_init("relu", "none", "resnet") > 1e-2
    assert ratio_at_init("sigmoid", "none", "resnet") > 1e3 * max(ratio_at_init("sigmoid", "none", "plain"), 1e-30)
    assert {"gradient_profile_depth20.png", "summary.md"} <= report_files(client, parent.info.run_id)
    (summary,) = workdir.glob("outputs/reports/vanishing_gradients-*/summary.md")
    assert len([line for line in summary.read_text().splitlines() if line.startswith(("| plain", "| resnet"))]) == 16


def test_article_recipe_on_digits_and_its_accuracy_curve(workdir: Path) -> None:
    res = run_cli(workdir, "experiment=article", "data=digits", "trainer.epochs=2")
    assert res.returncode == 0, res.stderr[-3000:]
    client = client_for(workdir)
    (run,) = client.search_runs([client.get_experiment_by_name("article").experiment_id])
    p = run.data.params
    assert (p["model.layout"], p["optimizer.name"], p["optimizer.lr"], p["trainer.batch_size"]) == \
        ("article", "adam", "0.001", "32")
    assert (p["scheduler.name"], p["scheduler.factor"], p["scheduler.patience"]) == ("plateau", "0.1", "5")
    assert "best.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    res = run_cli(workdir, "--experiment", "article", module="resnet_sweep.report")
    assert res.returncode == 0, res.stderr[-3000:]
    assert {"accuracy_per_epoch.png", "summary.md"} <= report_files(client, run.info.run_id)


@pytest.mark.fresh
def test_report_without_a_database_says_what_to_do(workdir: Path) -> None:
    res = run_cli(workdir, module="resnet_sweep.report")
    assert res.returncode != 0 and "no MLflow database" in res.stderr


def test_lesion_experiment_records_every_deletion_and_draws_its_report(workdir: Path) -> None:
    res = run_cli(workdir, "experiment=lesion", "-m", *FAST, "model.depth=choice(8,14)", "lesion.draws=2",
                  "lesion.max_removed=2")
    assert res.returncode == 0, res.stderr[-3000:]
    client, parent, trials = sweep_and_trials(workdir, "lesion")
    assert sorted((r.data.params["model.family"], r.data.params["model.depth"]) for r in trials) == [
        ("plain", "14"), ("plain", "8"), ("resnet", "14"), ("resnet", "8")]
    for run in trials:
        blocks = client.download_artifacts(run.info.run_id, "lesion_blocks.txt", str(workdir))
        names = Path(blocks).read_text().split()
        assert names == (["layer1.0"] if run.data.params["model.depth"] == "8" else
                         ["layer1.0", "layer1.1", "layer2.1", "layer3.1"])
        single = client.get_metric_history(run.info.run_id, "lesion.single_acc")
        assert sorted(m.step for m in single) == list(range(len(names)))
        k = client.get_metric_history(run.info.run_id, "lesion.k_acc_mean")
        assert sorted(m.step for m in k) == list(range(1, min(2, len(names)) + 1))
        assert 0 <= run.data.metrics["lesion.intact_acc"] <= 1
    assert {"lesion_single.png", "lesion_k.png"} <= report_files(client, parent.info.run_id)


SHARED_MNIST = next((p for p in (Path(__file__).resolve().parents[2] / "shared/data/mnist",
                                 Path("/work/shared/data/mnist")) if (p / "MNIST/raw").is_dir()), None)


def mnist_shaped_files(root: Path, train: int = 3000, test: int = 300) -> Path:
    """Random uint8 images and labels in MNIST's IDX files, torchvision's layout (root/MNIST/raw)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        header = np.array([2051, n, 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + rng.integers(0, 256, (n, 28, 28), np.uint8).tobytes())
        labels = np.array([2049, n], dtype=">i4").tobytes() + rng.integers(0, 10, n, np.uint8).tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
    return root


@pytest.mark.parametrize("source", ["real", "synthetic"])
def test_mnist_fast_runs_an_epoch_of_its_recipe_on_mnist_files(workdir: Path, source: str) -> None:
    if source == "real" and SHARED_MNIST is None:
        pytest.skip("the real MNIST files (../shared/data/mnist) are not on this machine")
    root = SHARED_MNIST if source == "real" else mnist_shaped_files(workdir / "fake")
    res = run_cli(workdir, "experiment=mnist_fast", f"data.root={root}", "data.download=false", "trainer.epochs=1",
                  "data.train_subset=1024", "data.val_subset=256")
    assert res.returncode == 0, res.stderr[-3000:]
    test_images = 10000 if source == "real" else 300
    assert f"on mnist (1024 train / 256 val / {test_images} test)" in res.stdout + res.stderr
    client = client_for(workdir)
    (run,) = client.search_runs([client.get_experiment_by_name("mnist_fast").experiment_id])
    p = run.data.params
    assert (p["model.family"], p["model.depth"], p["model.stem"], p["trainer.batch_size"]) == \
        ("resnet", "8", "large", "256")
    assert (p["optimizer.nesterov"], p["scheduler.name"], p["scheduler.warmup_epochs"]) == ("True", "cosine", "0.5")
    assert run.info.status == "FINISHED" and 0 <= run.data.metrics["test_acc"] <= 1
