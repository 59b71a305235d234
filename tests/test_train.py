"""The training loop: it learns, stops at the first non-finite loss, and its fast paths give the same kind of result."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from resnet_sweep.config import (DataConfig, ModelConfig, Norm, OptimizerConfig, Precision, SchedulerConfig,
                                 SchedulerName, TrainerConfig)
from resnet_sweep.data import load
from resnet_sweep.models import build_model
from resnet_sweep.train import NonFiniteLoss, build_optimizer, build_schedule, evaluate, fit, seed_everything

DATA = load(DataConfig(train_subset=512), torch.device("cpu"))


def train(epochs: int = 3, lr: float = 0.05, seed: int = 0, **trainer) -> tuple[torch.nn.Module, dict[str, float]]:
    generator = seed_everything(seed)
    model = build_model(ModelConfig(depth=8), (1, 8, 8), 10)
    if trainer.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), OptimizerConfig(lr=lr, settings={"momentum": 0.9}))
    return model, fit(model, DATA, opt, None, TrainerConfig(epochs=epochs, batch_size=64, **trainer), generator)


def test_it_learns_and_reports_every_metric() -> None:
    _, metrics = train()
    assert metrics["train_acc"] > 0.8 and metrics["test_acc"] > 0.7
    assert {"train_loss", "val_loss", "val_acc", "lr", "epoch_seconds", "samples_per_s", "test_loss"} <= set(metrics)


def test_same_seed_same_result_and_another_seed_another() -> None:
    first = train(epochs=1)[1]["train_loss"]
    assert train(epochs=1)[1]["train_loss"] == first
    assert train(epochs=1, seed=1)[1]["train_loss"] != first


# fp16 autocast on the CPU: ~1 s a step here (bf16: ~0.06 s), on Xeons with AVX512-FP16 too: a slow test
@pytest.mark.parametrize("trainer", [{"precision": Precision.bf16},
                                     pytest.param({"precision": Precision.fp16}, marks=pytest.mark.slow),
                                     {"channels_last": True}])
def test_fast_paths_still_learn_on_the_cpu(trainer: dict) -> None:
    _, metrics = train(**trainer)
    assert metrics["train_acc"] > 0.7 and torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_a_non_finite_loss_stops_before_its_update() -> None:
    generator = seed_everything(0)
    model = build_model(ModelConfig(depth=8, norm=Norm.none), (1, 8, 8), 10)
    opt = build_optimizer(model.parameters(), OptimizerConfig(lr=1e12))
    with pytest.raises(NonFiniteLoss) as err:
        fit(model, DATA, opt, None, TrainerConfig(epochs=5, batch_size=64), generator)
    assert err.value.epoch == 1 and "non-finite" in str(err.value)
    # the weights it stopped with came from finite losses only: no NaN was ever applied
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_multistep_milestones_are_fractions_of_the_epochs() -> None:
    model = build_model(ModelConfig(depth=8), (1, 8, 8), 10)
    opt = build_optimizer(model.parameters(), OptimizerConfig(lr=0.1))
    sched = build_schedule(opt, SchedulerConfig(name=SchedulerName.multistep, milestones=[0.5, 0.75]), 20, 1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.epoch_end({})
    assert lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.01) and lrs[15] == pytest.approx(0.001)


def _step_lrs(scheduler: SchedulerConfig, epochs: int, steps_per_epoch: int, metric: float = 1.0) -> list[float]:
    """The lr each optimizer step trains with, under `scheduler` (plateau sees `metric` every epoch)."""
    model = build_model(ModelConfig(depth=8), (1, 8, 8), 10)
    opt = build_optimizer(model.parameters(), OptimizerConfig(lr=0.1))
    schedule = build_schedule(opt, scheduler, epochs, steps_per_epoch)
    lrs = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            schedule.before_step()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
        schedule.epoch_end({"val_loss": metric, "train_loss": metric})
    return lrs


def test_warmup_rises_linearly_over_fractional_epochs_then_follows_the_schedule() -> None:
    # 1.5 epochs of 4 steps: 6 warm-up steps at 1/6 .. 6/6 of the scheduled lr, then cosine's per-epoch values
    lrs = _step_lrs(SchedulerConfig(name=SchedulerName.cosine, min_lr=0.0, warmup_epochs=1.5), 4, 4)
    assert lrs[:4] == pytest.approx([0.1 * k / 6 for k in range(1, 5)])
    cosine = [0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]  # the lr of epochs 0..3
    assert lrs[4:6] == pytest.approx([cosine[1] * 5 / 6, cosine[1]])  # the warm-up scales epoch 1's value
    assert lrs[6:] == pytest.approx([cosine[1]] * 2 + [cosine[2]] * 4 + [cosine[3]] * 4)


def test_warmup_composes_with_constant_multistep_and_plateau() -> None:
    constant = _step_lrs(SchedulerConfig(name=SchedulerName.none, warmup_epochs=0.5), 3, 4)
    assert constant == pytest.approx([0.05, 0.1] + [0.1] * 10)
    # 2.5 epochs of 2 steps warm up over 5 steps, past the schedulers' first cut at the end of epoch 2: each
    # cuts from the lr it set (0.1), not from the warmed one (0.08)
    multistep = _step_lrs(SchedulerConfig(name=SchedulerName.multistep, milestones=[0.5], gamma=0.1,
                                          warmup_epochs=2.5), 4, 2)
    assert multistep == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.01, 0.01, 0.01, 0.01])
    # a metric that never improves: plateau (patience 0) halves the lr at the end of every epoch after the first
    plateau = _step_lrs(SchedulerConfig(name=SchedulerName.plateau, patience=0, factor=0.5, warmup_epochs=2.5), 4, 2)
    assert plateau == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.05, 0.05, 0.025, 0.025])
    none = _step_lrs(SchedulerConfig(name=SchedulerName.none), 2, 2)
    assert none == pytest.approx([0.1] * 4)


def test_a_warmup_as_long_as_the_training_says_the_lr_never_peaks(caplog: pytest.LogCaptureFixture) -> None:
    _step_lrs(SchedulerConfig(name=SchedulerName.cosine, warmup_epochs=2), 2, 2)
    assert "scheduler.warmup_epochs=2 is as long as the training (trainer.epochs=2)" in caplog.text
    caplog.clear()
    _step_lrs(SchedulerConfig(name=SchedulerName.cosine, warmup_epochs=1.5), 2, 2)
    assert "warmup_epochs" not in caplog.text


@pytest.mark.slow  # fp16 on the CPU: see test_fast_paths_still_learn_on_the_cpu
def test_fp16_scales_its_loss() -> None:
    scaled = []
    original = torch.amp.GradScaler.scale

    def spy(self, outputs):  # noqa: ANN001, ANN202
        scaled.append(self.get_scale())
        return original(self, outputs)

    torch.amp.GradScaler.scale = spy
    try:
        train(epochs=1, precision=Precision.fp16)
    finally:
        torch.amp.GradScaler.scale = original
    assert len(scaled) == 8 and scaled[0] > 1  # every step of 512 / 64, with a loss scale against underflow


def test_save_best_tests_the_best_validation_epoch_not_the_last(tmp_path) -> None:  # noqa: ANN001
    # A high lr makes val_acc go up and down; take the first (lr, seed) whose last epoch is not its best.
    for lr, seed in itertools.product((1.0, 2.0, 0.5), range(3)):
        generator = seed_everything(seed)
        model = build_model(ModelConfig(depth=8), (1, 8, 8), 10)
        opt = build_optimizer(model.parameters(), OptimizerConfig(lr=lr, settings={"momentum": 0.9}))
        states, accs = [], []

        def on_epoch(metrics: dict[str, float], epoch: int) -> None:
            accs.append(metrics["val_acc"])
            states.append({k: v.clone() for k, v in model.state_dict().items()})

        metrics = fit(model, DATA, opt, None, TrainerConfig(epochs=6, batch_size=64), generator, on_epoch=on_epoch,
                      best_checkpoint=tmp_path / "best.pt")
        best = max(range(len(accs)), key=lambda i: accs[i])  # the first epoch with the highest val_acc
        if best != len(accs) - 1:
            break
    assert best != len(accs) - 1, f"every seed's last epoch was its best ({accs}): pick a higher lr"
    assert all(torch.equal(v, states[best][k]) for k, v in model.state_dict().items())
    assert metrics["test_acc"] == evaluate(model, DATA.test, 1024)[1]


def test_the_faster_memory_format_is_measured_once_per_machine_net_and_batch_and_kept(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from resnet_sweep.memory_format import channels_last_pays

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = build_model(ModelConfig(depth=8), (1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = channels_last_pays(model, DATA.train, 64, "fp32", torch.device("cpu"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # timed on copies
    (kept,) = (tmp_path / "resnet_sweep" / "memory_format").glob("*.json")
    entry = json.loads(kept.read_text())
    assert f"{torch.get_num_threads()} threads | fp32 | batch (64, 1, 8, 8)" in entry["key"]
    assert entry["channels_last"] is chosen
    assert set(entry["samples_per_s"]) == {"channels_last", "contiguous"} and min(entry["samples_per_s"].values()) > 0
    # a later run takes what is kept, without measuring: shown by a kept answer that says the opposite
    kept.write_text(json.dumps({**entry, "channels_last": not chosen}))
    assert channels_last_pays(model, DATA.train, 64, "fp32", torch.device("cpu")) is (not chosen)
    channels_last_pays(model, DATA.train, 32, "fp32", torch.device("cpu"))  # another batch size: measured, kept
    assert len(list(kept.parent.glob("*.json"))) == 2
    from resnet_sweep import cache

    cache.keep(kept, lambda out: out.write(b"{}"), first=True)  # a job that measured at the same moment keeps nothing
    assert json.loads(kept.read_text())["channels_last"] is (not chosen)


def test_where_no_memory_format_can_be_kept_the_run_measures_and_says_how_to_fix_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from resnet_sweep.memory_format import channels_last_pays

    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null/cache")  # no folder can be made there
    model = build_model(ModelConfig(depth=8), (1, 8, 8), 10)
    assert channels_last_pays(model, DATA.train, 64, "fp32", torch.device("cpu")) in (True, False)
    assert "nothing could be kept" in caplog.text and "trainer.channels_last=true or false" in caplog.text
