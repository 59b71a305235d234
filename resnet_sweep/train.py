"""The training loop: optimizer, schedule, per-epoch train/val metrics, non-finite-loss stop.

It takes a model, resident data and typed configs, and hands each epoch's metrics to a callback; it
knows nothing of Hydra or MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from resnet_sweep.config import (SCHEDULER_SETTINGS, ConfigError, OptimizerConfig, SchedulerConfig,
                                  TrainerConfig, named_class, settings)
from resnet_sweep.data import Data, Split, batches, pad_crop_flip
from resnet_sweep.diagnostics import GradientNorms

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The net diverged: its training loss, validation or test loss, or weights (BatchNorm's running
    statistics included) became NaN or infinite. The run stops there instead of training on, and is
    never a result: a finite training loss of 5e18 can leave NaN statistics and a chance-level val_acc."""

    def __init__(self, epoch: int, step: int, value: float, what: str = "training loss") -> None:
        super().__init__(f"non-finite {what} {value} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.value = epoch, step, value


def _check_finite(model: nn.Module, epoch: int, step: int, **losses: float) -> None:
    for what, value in losses.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(epoch, step, value, what.replace("_", " "))
    # one host sync for every parameter and buffer (BatchNorm's running mean and variance overflow first)
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if tensors and not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
        bad = next(name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all())
        raise NonFiniteLoss(epoch, step, float("nan"), f"weights ({bad})")


def resolve_device(name: str) -> torch.device:
    """The torch device `trainer.device` names; ConfigError if this machine has none such."""
    if name != "auto":
        kind, _, index = name.partition(":")
        if kind == "cuda" and (not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()):
            raise ConfigError(f"trainer.device={name}: torch sees {torch.cuda.device_count()} CUDA device(s) here "
                              f"(torch.cuda.is_available() is {torch.cuda.is_available()}); use trainer.device=auto "
                              f"(cuda, then mps, then cpu) or trainer.device=cpu")
        if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"trainer.device={name}: this machine has no Apple MPS device; use trainer.device=auto")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator that orders batches and augments."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The class the preset names, given its arguments (a list as a tuple: Adam's betas)."""
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.settings.items()}
    return named_class(cfg.target)(params, lr=cfg.lr, **given)


def build_schedule(opt: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: int, steps_per_epoch: int) -> Schedule:
    """The learning-rate schedule `cfg` names, for `epochs` epochs of `steps_per_epoch` optimizer steps."""
    name, own = cfg.name.name, settings(cfg, SCHEDULER_SETTINGS)
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
    if name == "multistep":
        milestones = sorted({max(1, round(m * epochs)) for m in own["milestones"]})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=own["gamma"])
    elif name == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=own["min_lr"])
    elif name == "plateau":
        mode = "min" if own["monitor"].name.endswith("loss") else "max"
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=own["factor"],
                                                               patience=own["patience"], min_lr=own["min_lr"])
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
    if warmup >= epochs * steps_per_epoch:
        log.warning("scheduler.warmup_epochs=%g is as long as the training (trainer.epochs=%d): the learning rate "
                    "rises throughout and never reaches optimizer.lr; lower the warm-up or train longer",
                    cfg.warmup_epochs, epochs)
    return Schedule(opt, scheduler, warmup, own["monitor"].name if name == "plateau" else "val_loss")


class Schedule:
    """The learning rate of each optimizer step: the scheduler's value for the epoch (a torch scheduler,
    stepped at each epoch's end) times a linear warm-up factor step/W over the first W steps (Goyal et al.
    2017's gradual warm-up; He et al. 2015 warm up ResNet-110). A multiplier on whatever the scheduler set,
    so warm-up composes with every scheduler, ReduceLROnPlateau included, and can end mid-epoch."""

    def __init__(self, opt: torch.optim.Optimizer, scheduler, warmup_steps: int = 0,  # noqa: ANN001
                 monitor: str = "val_loss") -> None:
        self.opt, self.scheduler, self.warmup_steps, self.monitor = opt, scheduler, warmup_steps, monitor
        self.steps = 0
        self.scheduled = [group["lr"] for group in opt.param_groups]  # the scheduler's lr, before warm-up

    def before_step(self) -> None:
        """Set the lr of the optimizer step about to be taken."""
        self.steps += 1
        if self.steps <= self.warmup_steps:  # the last warm-up step trains at exactly the scheduled lr
            for group, lr in zip(self.opt.param_groups, self.scheduled):
                group["lr"] = lr * self.steps / self.warmup_steps

    def epoch_end(self, metrics: dict[str, float]) -> None:
        """Step the scheduler on the lr it set itself (not the warmed one), with the metric it monitors."""
        for group, lr in zip(self.opt.param_groups, self.scheduled):
            group["lr"] = lr
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics[self.monitor])
        elif self.scheduler is not None:
            self.scheduler.step()
        self.scheduled = [group["lr"] for group in self.opt.param_groups]


def autocast(device: torch.device, precision: str):  # noqa: ANN201
    """The autocast context for `precision` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int, precision: str = "fp32") -> tuple[float, float]:
    """(mean cross-entropy, accuracy in [0, 1]) over `split`, in eval mode."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=split.y.device)
    correct = torch.zeros((), device=split.y.device, dtype=torch.long)
    for x, y in batches(split, batch_size):
        with autocast(split.y.device, precision):
            out = model(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = len(split)
    return loss.item() / n, correct.item() / n


EpochCallback = Callable[[dict[str, float], int], None]  # (metrics, epoch)


def steps_per_epoch(data: Data, batch_size: int) -> int:
    """Optimizer steps in one pass over the training split (the last batch may be smaller)."""
    return math.ceil(len(data.train) / batch_size)


def train_epoch(model: nn.Module, data: Data, opt: torch.optim.Optimizer, cfg: TrainerConfig,
                generator: torch.Generator, epoch: int, augment: bool = False,
                scaler: torch.amp.GradScaler | None = None, gradients: GradientNorms | None = None,
                on_step: Callable[[], None] | None = None, schedule: Schedule | None = None,
                bar: tqdm | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over the training split: (summed loss, correct predictions, steps), the sums on the device
    (no host sync per step but the finite check)."""
    model.train()
    device, precision = data.train.y.device, cfg.precision.name
    steps = steps_per_epoch(data, cfg.batch_size)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for step, (x, y) in enumerate(batches(data.train, cfg.batch_size, generator, shuffle=True), 1):
        if augment:
            x = pad_crop_flip(x, generator)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
        if step % cfg.finite_check_every == 0 and not math.isfinite(value := loss.item()):
            raise NonFiniteLoss(epoch, step, value)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # true gradients for the diagnostics; step skips inf/nan ones
        else:
            loss.backward()
        if gradients is not None and gradients.wants(step, steps):
            gradients.observe()
        if schedule is not None:
            schedule.before_step()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        if on_step is not None:
            on_step()
        if bar is not None:
            bar.update(len(y))
    return loss_sum, correct, step


def fit(model: nn.Module, data: Data, opt: torch.optim.Optimizer, schedule: Schedule | None, cfg: TrainerConfig,
        generator: torch.Generator, augment: bool = False,
        on_epoch: EpochCallback | None = None, best_checkpoint: Path | None = None,
        gradients: GradientNorms | None = None, on_step: Callable[[], None] | None = None,
        progress: bool = False) -> dict[str, float]:
    """Train for cfg.epochs; return the final metrics, test included. `schedule` sets each step's lr
    (None: the optimizer's lr throughout).

    With `best_checkpoint`, the weights of the best-val_acc epoch are saved there (the article's
    "best model kept") and reloaded, with weights_only=True, for the test.

    Each epoch's metrics (train_loss, train_acc, val_loss, val_acc, lr, epoch_seconds, samples_per_s; with
    cfg.eval_test, epoch_test_loss and epoch_test_acc too) go to `on_epoch(metrics, epoch)` as soon as the epoch ends
    (lr: the last step's). Raises NonFiniteLoss at the first NaN/inf loss it checks (every
    cfg.finite_check_every steps), before that step's update. With `gradients`, each epoch's metrics also
    carry its per-layer gradient norms. `on_step()` is called after each training step (a sweep's job
    counts it as progress; it may raise to stop the training). With `progress`, a bar on stderr shows the
    epoch's samples, samples/s and time left, and is cleared when the epoch's line is logged.
    """
    device, precision = data.train.y.device, cfg.precision.name
    # fp16 needs loss scaling against underflow; bf16 has fp32's exponent range and does not
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    best_acc = -1.0
    metrics: dict[str, float] = {}
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        # no tqdm at all without a bar: even a disabled one makes tqdm's multiprocessing lock, a named semaphore
        # that a sweep's worker, killed when the sweep ends, leaves behind ("leaked semaphore objects")
        with (tqdm(total=len(data.train), desc=f"epoch {epoch}/{cfg.epochs}", unit="sample", unit_scale=True,
                   leave=False, dynamic_ncols=True) if progress else contextlib.nullcontext()) as bar:
            loss_sum, correct, step = train_epoch(model, data, opt, cfg, generator, epoch, augment=augment,
                                                  scaler=scaler, gradients=gradients, on_step=on_step,
                                                  schedule=schedule, bar=bar)
        metrics = _epoch_metrics(model, data, cfg, epoch, step, loss_sum, correct, time.perf_counter() - start,
                                 opt.param_groups[0]["lr"], gradients)
        if on_epoch is not None:
            on_epoch(metrics, epoch)
        if best_checkpoint is not None and metrics["val_acc"] > best_acc:
            best_acc = metrics["val_acc"]
            # the net's own keys: a torch.compile'd model's state_dict prefixes each with "_orig_mod."
            torch.save(getattr(model, "_orig_mod", model).state_dict(), best_checkpoint)
        if schedule is not None:
            schedule.epoch_end(metrics)
    if best_checkpoint is not None:
        getattr(model, "_orig_mod", model).load_state_dict(
            torch.load(best_checkpoint, map_location=data.test.y.device, weights_only=True))
    if best_checkpoint is None and cfg.eval_test:  # the last epoch's test is the result
        metrics["test_loss"], metrics["test_acc"] = metrics["epoch_test_loss"], metrics["epoch_test_acc"]
    else:
        metrics["test_loss"], metrics["test_acc"] = evaluate(model, data.test, cfg.eval_batch_size, precision)
    _check_finite(model, cfg.epochs, steps_per_epoch(data, cfg.batch_size), test_loss=metrics["test_loss"])
    log.info("test loss %.4f acc %.2f%%%s", metrics["test_loss"], 100 * metrics["test_acc"],
             f" (best val_acc {100 * best_acc:.2f}% checkpoint)" if best_checkpoint is not None else "")
    return metrics


def _epoch_metrics(model: nn.Module, data: Data, cfg: TrainerConfig, epoch: int, step: int, loss_sum: torch.Tensor,
                   correct: torch.Tensor, seconds: float, lr: float, gradients: GradientNorms | None) -> dict[str, float]:
    """An epoch's metrics, logged in one line: its training sums as means, validation (and, with
    cfg.eval_test, test) loss and accuracy, lr, speed and gradient norms."""
    n = len(data.train)
    train_loss = loss_sum.item() / n
    if not math.isfinite(train_loss):
        raise NonFiniteLoss(epoch, step, train_loss)
    val_loss, val_acc = evaluate(model, data.val, cfg.eval_batch_size, cfg.precision.name)
    _check_finite(model, epoch, step, validation_loss=val_loss)
    metrics = {"train_loss": train_loss, "train_acc": correct.item() / n, "val_loss": val_loss, "val_acc": val_acc,
               "lr": lr, "epoch_seconds": seconds, "samples_per_s": n / seconds}
    tested = ""
    if cfg.eval_test:
        metrics["epoch_test_loss"], metrics["epoch_test_acc"] = evaluate(model, data.test, cfg.eval_batch_size,
                                                                          cfg.precision.name)
        tested = f"  test acc {100 * metrics['epoch_test_acc']:.2f}%"
    if gradients is not None:
        metrics.update(gradients.epoch_end())
    log.info("epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%%s  lr %.3g  %.1f s  %.0f samples/s",
             epoch, cfg.epochs, train_loss, 100 * metrics["train_acc"], val_loss, 100 * val_acc, tested, lr,
             seconds, metrics["samples_per_s"])
    return metrics
