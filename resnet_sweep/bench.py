"""Training throughput, side by side in one process, on the same model, batch size, data and device:

  (a) the seed article's loop: a torchvision MNIST-style dataset, per-sample ToTensor, a DataLoader, Adam;
  (b) a bare PyTorch loop over tensors already in memory (the floor any framework adds to);
  (c) resnet_sweep's own trial loop (train.fit) with all its recording on: MLflow metrics every epoch
      in a real (temporary) SQLite store, per-layer gradient norms, the non-finite-loss check.

    python -m resnet_sweep.bench [model=article] [trainer.batch_size=32] [--steps 40] [--repeats 5] [--threads 2]
    python -m resnet_sweep.bench --sweep [--cases default short degradation] [--repeats 3]   (whole sweeps)
    python -m resnet_sweep.bench --time-to 0.99 experiment=mnist_fast data.root=...  (seconds to a test accuracy)

Positional arguments are the training config's overrides (model, trainer, ...). Real MNIST is used when
its files are found under data.root, else synthetic uint8 images shaped like MNIST (1x28x28, 10 classes),
served to (a) as PIL images so its per-sample ToTensor costs what it costs on MNIST. Each loop gets
`--warmup` untimed steps, then `--repeats` timed runs of `--steps` steps; the table shows the median.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from resnet_sweep import memory_format
from resnet_sweep.config import DataConfig, DatasetName, TrainerConfig, to_typed
from resnet_sweep.data import Data, DataUnavailable, Split, load_arrays
from resnet_sweep.diagnostics import GradientNorms
from resnet_sweep.models import build_model, count_parameters
from resnet_sweep.presets import compose
from resnet_sweep.train import autocast, fit, resolve_device, seed_everything
from resnet_sweep.workers import cpu_name

MNIST_SHAPE = (1, 28, 28)


class PilImages(Dataset):
    """A torchvision-MNIST-style dataset: uint8 images handed out one by one as PIL, through `transform`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:  # noqa: ANN001
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.transform(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def mnist_images(root: str, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 images N x 28 x 28, labels, where they came from)."""
    cfg = DataConfig(name=DatasetName.mnist, root=root, download=False, input_shape=list(MNIST_SHAPE),
                     mean=[0.1307], std=[0.3081])
    try:
        x, _, y, _ = load_arrays(cfg)
        x, y, source = (x[:n, 0] * 255).round().astype(np.uint8), y[:n], "MNIST"
    except DataUnavailable:
        rng = np.random.default_rng(0)
        x, y, source = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n), "synthetic"
    return x, y.astype(np.int64), source


def _timed(fn, device: torch.device) -> float:  # noqa: ANN001
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def article_loop(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int, steps: int, device: torch.device):  # noqa: ANN201
    """The seed article's train(): DataLoader(ToTensor dataset), .to(device) per batch, Adam, loss.item()."""
    from torchvision.transforms import ToTensor

    loader = DataLoader(PilImages(x, y, ToTensor()), batch_size=batch, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def run(n: int) -> None:
        model.train()
        for i, (xb, yb) in enumerate(loader):
            if i == n:
                break
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # the article prints it every 100 batches, and reads it every batch

    return run


def bare_loop(model: nn.Module, data: Split, batch: int, device: torch.device, trainer: TrainerConfig):  # noqa: ANN201
    """The least a loop can do, with the same precision and memory format as the trainer's."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if trainer.channels_last else torch.contiguous_format

    def run(n: int) -> None:
        model.train()
        order = torch.randperm(len(data), generator=gen).to(device)
        for i in range(n):
            idx = order[i * batch: (i + 1) * batch]
            with autocast(device, trainer.precision.name):
                loss = F.cross_entropy(model(data.x[idx].contiguous(memory_format=fmt)).float(), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def framework_loop(model: nn.Module, data: Data, trainer: TrainerConfig, repeats: int, workdir: Path,
                   grad_norms: bool = True) -> tuple[list[float], float]:
    """resnet_sweep's fit() with MLflow (and gradient norms) on: (train-phase samples/s per epoch after
    the first, whole-trial samples/s including validation, logging and any compile time)."""
    from mlflow import MlflowClient

    from resnet_sweep.tracking import JobRun, prepare_store

    uri = f"sqlite:///{workdir / 'bench_mlflow.db'}"
    client = MlflowClient(uri)
    run = JobRun(client, client.create_run(prepare_store(uri, "bench", str(workdir / "artifacts"))).info.run_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    per_epoch: list[float] = []

    def on_epoch(metrics: dict[str, float], epoch: int) -> None:
        run.log_metrics(metrics, epoch)
        per_epoch.append(metrics["samples_per_s"])

    cfg = replace(trainer, epochs=repeats + 1)  # epoch 1 is the warm-up
    device = data.train.y.device
    gradients = GradientNorms(model) if grad_norms else None
    train_model = torch.compile(model) if trainer.compile else model
    seconds = _timed(lambda: fit(train_model, data, opt, None, cfg, seed_everything(0), on_epoch=on_epoch,
                                 gradients=gradients), device)
    client.set_terminated(run.run_id)
    whole = (repeats + 1) * len(data.train) / seconds
    return per_epoch[1:], whole


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_sweep.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing each loop")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-article", action="store_true", help="skip loop (a), the slowest to time")
    parser.add_argument("--sweep", action="store_true",
                        help="measure whole sweeps instead: trials/hour, efficiency, overhead (bench_sweep.py)")
    parser.add_argument("--time-to", type=float, metavar="ACC",
                        help="measure instead the seconds a training command takes, start-up included, to its first "
                             "epoch at or above this test accuracy, per seed (bench_time.py; --seeds, --limit)")
    args, overrides = parser.parse_known_args(argv)
    if args.time_to is not None or args.sweep:
        return _other_bench(args.sweep, argv if argv is not None else sys.argv[1:])
    cfg = compose(["model=article", "trainer.batch_size=32", *overrides], job_name="bench")
    model_cfg, trainer = to_typed(cfg.model, "model."), to_typed(cfg.trainer, "trainer.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(trainer.device)
    batch, steps = trainer.batch_size, args.steps
    n = batch * steps
    images, labels, source = mnist_images(cfg.data.root, n)

    torch.manual_seed(0)
    reference = build_model(model_cfg, MNIST_SHAPE, 10).to(device)
    xt = ((torch.from_numpy(images).float() / 255 - 0.1307) / 0.3081)[:, None].to(device)
    yt = torch.from_numpy(labels).to(device)
    train = Split(xt, yt)
    n_val = max(1, n // 10)  # the default 10 % validation split, evaluated every epoch in (c)
    data = Data(train, Split(xt[:n_val], yt[:n_val]), Split(xt[:n_val], yt[:n_val]))

    results: dict[str, list[float]] = {}
    if not args.skip_article:
        run = article_loop(copy.deepcopy(reference), images, labels, batch, steps, device)
        run(args.warmup)
        results["(a) article loop: DataLoader + per-sample ToTensor"] = [
            steps * batch / _timed(lambda: run(steps), device) for _ in range(args.repeats)]
    reference = memory_format.choose(reference, train, trainer, device)  # as a run would
    run = bare_loop(copy.deepcopy(reference), train, batch, device, trainer)
    run(args.warmup)
    results["(b) bare PyTorch loop, tensors in memory"] = [
        steps * batch / _timed(lambda: run(steps), device) for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        per_epoch, whole = framework_loop(copy.deepcopy(reference), data, trainer, args.repeats, Path(tmp))
        bare_fit, _ = framework_loop(copy.deepcopy(reference), data, trainer, args.repeats, Path(tmp), False)
    results["(c) resnet_sweep fit(), MLflow + grad norms on"] = per_epoch
    results["(c') same, whole trial incl. validation + logging"] = [whole]
    results["(c0) fit() with gradient norms off"] = bare_fit

    print(f"# resnet_sweep.bench, {date.today()}: {model_cfg.layout.name} {model_cfg.family.name}-{model_cfg.depth} "
          f"({count_parameters(reference):,} params), batch {batch}, {steps} steps x {args.repeats} repeats, "
          f"{source} 1x28x28 data, {trainer.precision.name}, channels_last={trainer.channels_last}")
    print_table(results, device)
    return 0


def _other_bench(sweep: bool, argv: list[str]) -> int:
    """--sweep (bench_sweep.py) or --time-to (bench_time.py), each with its own arguments."""
    if sweep:
        if any(a.startswith("--time-to") for a in argv):
            raise SystemExit("python -m resnet_sweep.bench: --sweep and --time-to measure different things; give one")
        from resnet_sweep import bench_sweep

        return bench_sweep.main([a for a in argv if a != "--sweep"])
    from resnet_sweep import bench_time

    return bench_time.main(argv)


def print_table(results: dict[str, list[float]], device: torch.device) -> None:
    """The loops' samples/s (median, min, max) and the ratios that matter: (c)/(b) and (c)/(a)."""
    print(f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| loop | samples/s (median) | min | max |\n| --- | --- | --- | --- |")
    med = {}
    for name, values in results.items():
        med[name] = statistics.median(values)
        print(f"| {name} | {med[name]:.0f} | {min(values):.0f} | {max(values):.0f} |")
    a = next((v for k, v in med.items() if k.startswith("(a)")), None)
    b = next(v for k, v in med.items() if k.startswith("(b)"))
    c = next(v for k, v in med.items() if k.startswith("(c)"))
    print(f"\nratio (c)/(b) = {c / b:.3f}" + (f"   ratio (c)/(a) = {c / a:.2f}" if a else ""))


if __name__ == "__main__":
    raise SystemExit(main())
