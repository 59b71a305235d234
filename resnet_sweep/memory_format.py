"""Which memory format trains a net faster on this machine: channels_last (NHWC) or PyTorch's default (NCHW).

It differs by machine: channels_last trains 20-40 % faster on an AMD EPYC here and cut the article model
from 325 to 131 samples/s on an Intel Xeon (BENCHMARKS.md). So `trainer.channels_last=null` (the default)
times both on the net's own first batch, once per machine, net, batch size, threads and precision, and keeps
the answer in the cache folder: later runs (a sweep's other trials) take it without measuring, so one config
trains alike on one machine (jobs that measure at the same moment may each keep their own answer). true or
false chooses without measuring. Each run records its format as the param `memory_format`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resnet_sweep import cache
from resnet_sweep.data import Split, batches
from resnet_sweep.train import autocast
from resnet_sweep.workers import cpu_name

log = logging.getLogger(__name__)

ROUNDS = 3  # timed steps per format, alternating, the fastest of each counted (a busy machine slows some)
MARGIN = 1.05  # channels_last must be this much faster to be chosen over PyTorch's default


def channels_last_pays(model: nn.Module, train: Split, batch_size: int, precision: str,
                       device: torch.device) -> bool:
    """Whether channels_last trains `model` faster here: kept from an earlier run, else measured now."""
    x, y = next(batches(train, batch_size))
    net = hashlib.sha1(repr(model).encode()).hexdigest()[:12]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    key = (f"{machine} | torch {torch.__version__} | {torch.get_num_threads()} threads | {precision} | "
           f"batch {tuple(x.shape)} | net {net}")
    kept = cache.folder() / "memory_format.json"
    if (known := _read(kept).get(key)) is not None:
        return bool(known["channels_last"])
    rates = {fmt: len(y) / seconds for fmt, seconds in _fastest_steps(model, x, y, precision, device).items()}
    pays = rates["channels_last"] >= MARGIN * rates["contiguous"]
    log.info("memory format: %s (channels_last %.0f, contiguous %.0f samples/s measured here; kept in %s)",
             "channels_last" if pays else "contiguous", rates["channels_last"], rates["contiguous"], kept)
    # read again before writing: parallel jobs may have kept theirs since
    everything = {**_read(kept), key: {"channels_last": pays, "samples_per_s": rates}}
    cache.keep(kept, lambda out: out.write(json.dumps(everything, indent=1).encode()))
    return pays


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


def _read(path: Any) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except Exception:  # noqa: BLE001 (none yet, damaged, no home folder: measured again)
        return {}
