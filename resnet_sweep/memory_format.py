"""Which memory format trains a net faster on this machine: channels_last (NHWC) or PyTorch's default (NCHW).

It differs by machine: channels_last trains 20-40 % faster on an AMD EPYC here and cut the article model
from 325 to 131 samples/s on an Intel Xeon (BENCHMARKS.md). So `trainer.channels_last=null` (the default)
times both on the net's own first batch, once per machine, net, batch size, threads and precision, and keeps
the answer in the cache folder: later runs (a sweep's other trials) take it without measuring, so one config
trains alike on one machine. true or false chooses without measuring. Each run records its format as the
param `memory_format`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from resnet_sweep import cache
from resnet_sweep.config import TrainerConfig
from resnet_sweep.data import Split, batches
from resnet_sweep.train import autocast
from resnet_sweep.workers import cpu_name

log = logging.getLogger(__name__)

ROUNDS = 3  # timed steps per format, alternating, the fastest of each counted (a busy machine slows some)
MARGIN = 1.05  # channels_last must be this much faster to be chosen over PyTorch's default


def choose(model: nn.Module, train: Split, trainer: TrainerConfig, device: torch.device) -> nn.Module:
    """`model` in the memory format `trainer.channels_last` names; null: the faster here (channels_last_pays),
    written into `trainer` for the run's record."""
    if trainer.channels_last is None:
        trainer.channels_last = channels_last_pays(model, train, trainer.batch_size, trainer.precision.name, device)
    return model.to(memory_format=torch.channels_last) if trainer.channels_last else model


def channels_last_pays(model: nn.Module, train: Split, batch_size: int, precision: str,
                       device: torch.device) -> bool:
    """Whether channels_last trains `model` faster here: kept from an earlier run, else measured now and kept,
    one file per machine, net, batch, threads and precision; the first job to keep one is the one every
    later job follows, those that measured at the same moment included."""
    x, y = next(batches(train, batch_size))
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    key = (f"{machine} | torch {torch.__version__} | {torch.get_num_threads()} threads | {precision} | "
           f"batch {tuple(x.shape)} | net {hashlib.sha1(repr(model).encode()).hexdigest()}")
    try:
        kept: Path | None = cache.folder() / "memory_format" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    except RuntimeError:  # no home folder
        kept = None
    if (known := _read(kept)) is not None:
        return known
    rates = {fmt: len(y) / seconds for fmt, seconds in _fastest_steps(model, x, y, precision, device).items()}
    pays = rates["channels_last"] >= MARGIN * rates["contiguous"]
    record = json.dumps({"key": key, "channels_last": pays, "samples_per_s": rates}, indent=1).encode()
    cache.keep(kept, lambda out: out.write(record), first=True)
    if (known := _read(kept)) is None:
        log.warning("memory format: nothing could be kept in %s, so each run measures again and runs of one "
                    "config may differ in it; set trainer.channels_last=true or false to fix it", kept)
        known = pays
    log.info("memory format: %s (channels_last %.0f, contiguous %.0f samples/s measured here%s)",
             "channels_last" if known else "contiguous", rates["channels_last"], rates["contiguous"],
             "" if known == pays else "; another job measured first, and its answer is kept")
    return known


def _fastest_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str,
                   device: torch.device) -> dict[str, float]:
    """The fastest of ROUNDS forward and backward passes in each format, on copies of the net (its weights
    and BatchNorm statistics stay as they are), after one untimed pass each."""
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    copies = {name: copy.deepcopy(model).to(memory_format=fmt).train() for name, fmt in formats.items()}
    fastest = {name: float("inf") for name in formats}
    for round_ in range(ROUNDS + 1):
        for name, fmt in formats.items():
            began = time.perf_counter()
            with autocast(device, precision):
                loss = F.cross_entropy(copies[name](x.contiguous(memory_format=fmt)).float(), y)
            loss.backward()
            _sync(device)
            if round_:
                fastest[name] = min(fastest[name], time.perf_counter() - began)
    return fastest


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _read(path: Path | None) -> bool | None:
    """The kept answer, or None (none yet, damaged, or nowhere to keep one)."""
    found = cache.read_json(path)
    return bool(found["channels_last"]) if isinstance(found, dict) and "channels_last" in found else None
