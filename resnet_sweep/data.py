"""Datasets as whole tensors: load once, split, normalise, move to the training device, batch by index.

Holding the dataset on the device and slicing it by a random permutation replaces the per-sample
DataLoader of the seed article, which is the slow path on a GPU (and on a CPU for tiny images).
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from resnet_sweep import cache
from resnet_sweep.config import DataConfig
from resnet_sweep.errors import UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataUnavailable(UserError):
    """The dataset's files are missing and could not be downloaded."""


@dataclass
class Split:
    x: torch.Tensor  # float32 (N, C, H, W), normalised
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Data:
    train: Split
    val: Split
    test: Split


DIGITS_SPLIT = 1  # the version of _split_digits: a change to it makes the kept files stale


def _digits() -> tuple[np.ndarray, ...]:
    """scikit-learn's 8x8 digits, split once, kept as a .npz in the user's cache folder ($XDG_CACHE_HOME or
    ~/.cache, resnet_sweep/): importing sklearn.datasets costs each process ~2.5 s of CPU, more than a short
    trial trains, and every sweep worker pays it. Keyed by scikit-learn's version and the split's; a file
    that cannot be read is made again; where none can be written, nothing is kept."""
    from importlib.metadata import version

    names = ("x_train", "x_test", "y_train", "y_test")
    kept = None
    try:
        kept = cache.folder() / f"digits-sklearn-{version('scikit-learn')}-split{DIGITS_SPLIT}.npz"
        with np.load(kept) as held:
            return tuple(held[n] for n in names)
    except Exception:  # noqa: BLE001 (missing, empty, damaged, no home folder: made again below)
        pass
    arrays = _split_digits()
    cache.keep(kept, lambda out: np.savez(out, **dict(zip(names, arrays))))
    return arrays


def _split_digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # pixels 0..16 -> [0, 1]
    # No official test split: a fixed, stratified 20 %, the same for every run.
    return tuple(train_test_split(x, digits.target, test_size=0.2, stratify=digits.target, random_state=0))  # type: ignore[return-value]


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, with torchvision's reader (which reads plain
    files only: a .gz one is unpacked to a temporary file first)."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    if path.suffix != ".gz":
        return read_sn3_pascalvincent_tensor(str(path), strict=False).numpy()
    with tempfile.TemporaryDirectory() as tmp, gzip.open(path, "rb") as packed:
        plain = Path(tmp) / path.stem
        with open(plain, "wb") as out:
            shutil.copyfileobj(packed, out)
        return read_sn3_pascalvincent_tensor(str(plain), strict=False).numpy()


def _find_idx(folder: Path) -> list[Path] | None:
    found = []
    for name in IDX_FILES:
        hits = [p for p in (folder / name, folder / f"{name}.gz") if p.is_file()]
        if not hits:
            return None
        found.append(hits[0])
    return found


def _mnist_like(cfg: DataConfig, folder_name: str, extra: list[Path]) -> tuple[np.ndarray, ...]:
    from torchvision import datasets

    root = Path(cfg.root)
    folders = [root / folder_name / "raw", *extra]
    files = next((f for f in map(_find_idx, folders) if f), None)
    if files is None and cfg.download:
        try:
            with _nothing_left_on_failure(root / folder_name):
                getattr(datasets, folder_name)(str(root), train=True, download=True)
                getattr(datasets, folder_name)(str(root), train=False, download=True)
        except Exception as exc:  # offline: say what is missing instead of torchvision's URL error
            raise _unavailable(cfg, folders, exc) from None
        files = _find_idx(folders[0])
    if files is None:
        raise _unavailable(cfg, folders, None)
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in files)
    scale = lambda a: (a.astype(np.float32) / 255.0)[:, None]  # noqa: E731
    return scale(x_train), scale(x_test), y_train.astype(np.int64), y_test.astype(np.int64)


def _cifar10(cfg: DataConfig) -> tuple[np.ndarray, ...]:
    from torchvision import datasets

    folder = Path(cfg.root) / "cifar-10-batches-py"
    try:
        with _nothing_left_on_failure(folder, Path(cfg.root) / "cifar-10-python.tar.gz"):
            train = datasets.CIFAR10(cfg.root, train=True, download=cfg.download)
            test = datasets.CIFAR10(cfg.root, train=False, download=cfg.download)
    except Exception as exc:
        raise _unavailable(cfg, [folder], exc) from None
    to_chw = lambda a: (a.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)  # noqa: E731
    return to_chw(train.data), to_chw(test.data), np.array(train.targets), np.array(test.targets)


@contextmanager
def _nothing_left_on_failure(*paths: Path) -> Iterator[None]:
    """A failed download leaves no folder or partial file behind: each of `paths` that did not exist
    before, and the data root itself if it was made for this, is removed again on failure."""
    made = [p for p in (*paths, paths[0].parent) if not p.exists()]
    try:
        yield
    except BaseException:
        for p in made:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        raise


def _unavailable(cfg: DataConfig, folders: list[Path], exc: Exception | None) -> DataUnavailable:
    where = " or ".join(str(f.resolve()) for f in folders)
    why = f" (download failed: {type(exc).__name__}: {' '.join(str(exc).split())[:400]})" if exc else " (data.download=false)"
    files = ("the four IDX files " + ", ".join(IDX_FILES) + " (each may end in .gz)"
             if cfg.name.name in ("mnist", "fashion_mnist") else "CIFAR-10's python batches (data_batch_1..5, test_batch)")
    fetch = "with the network and data.download=true" if exc is None else "where the network reaches them"
    return DataUnavailable(
        f"dataset '{cfg.name.name}' not found: expected {files} in {where}{why}. "
        f"Put them there, run once {fetch}, set data.root, or use data=digits, which works offline.")


# The arrays this process loaded last, kept for its next job: a sweep's worker runs trial after trial on the
# same data, and reading it again costs each trial ~10 ms for digits, ~0.3 s for MNIST, ~1 s for CIFAR-10.
# One dataset at a time, read-only (load() copies what it changes); a load that fails keeps nothing.
_held: dict[tuple[str, str, bool], tuple[np.ndarray, ...]] = {}


def load_arrays(cfg: DataConfig) -> tuple[np.ndarray, ...]:
    """(x_train, x_test, y_train, y_test) with pixels in [0, 1], before any split or normalisation; held in
    this process for the next job that asks for the same dataset (same name, root and download setting)."""
    key = (cfg.name.name, str(Path(cfg.root).resolve()), bool(cfg.download))
    if key not in _held:
        arrays = _read_arrays(cfg)
        for a in arrays:
            a.setflags(write=False)
        _held.clear()
        _held[key] = arrays
    return _held[key]


def _read_arrays(cfg: DataConfig) -> tuple[np.ndarray, ...]:
    name = cfg.name.name
    if name == "digits":
        x_train, x_test, y_train, y_test = _digits()
        return x_train, x_test, y_train, y_test
    if name == "mnist":
        return _mnist_like(cfg, "MNIST", [])
    if name == "fashion_mnist":
        return _mnist_like(cfg, "FashionMNIST", [DEBIAN_FASHION_MNIST])
    return _cifar10(cfg)


def load(cfg: DataConfig, device: torch.device) -> Data:
    """Load, split train into train/val (seeded by data.split_seed), normalise, move to `device`."""
    x_train, x_test, y_train, y_test = load_arrays(cfg)
    shape = list(x_train.shape[1:])
    if shape != list(cfg.input_shape):
        raise ValueError(f"dataset '{cfg.name.name}' has images of shape {shape}, but data.input_shape="
                         f"{list(cfg.input_shape)}; set data.input_shape={shape}")
    order = np.random.default_rng(cfg.split_seed).permutation(len(y_train))
    n_val = max(1, round(cfg.val_fraction * len(order)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if cfg.train_subset is not None:
        train_idx = train_idx[: cfg.train_subset]
    if cfg.val_subset is not None:
        val_idx = val_idx[: cfg.val_subset]
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1)

    def own(a: np.ndarray, dtype: type) -> torch.Tensor:  # a held (read-only) array is copied, never shared
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype) if a.flags.writeable else np.array(a, dtype=dtype))

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(((own(x, np.float32) - mean) / std).to(device), own(y, np.int64).to(device))

    return Data(split(x_train[train_idx], y_train[train_idx]), split(x_train[val_idx], y_train[val_idx]),
                split(x_test, y_test))


def batches(split: Split, batch_size: int, generator: torch.Generator | None = None,
            shuffle: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Slices of `split`, in a fresh random order when `shuffle`; the last batch may be smaller."""
    n = len(split)
    if shuffle:
        order = torch.randperm(n, generator=generator, device="cpu").to(split.y.device)
        for i in range(0, n, batch_size):
            idx = order[i: i + batch_size]
            yield split.x[idx], split.y[idx]
    else:
        for i in range(0, n, batch_size):
            yield split.x[i: i + batch_size], split.y[i: i + batch_size]


def probe_batch(split: Split, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of `split`, the same for every run that shares `seed` (the split seed)."""
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:size].to(split.y.device)
    return split.x[idx], split.y[idx]


def pad_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """He et al. 2015's CIFAR augmentation on a batch: pad by 4, random crop back, random h-flip."""
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    rows = (torch.arange(h, device=dev)[None] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w, device=dev)[None] + dx[:, None])[:, None, None, :]
    out = padded[torch.arange(b, device=dev)[:, None, None, None],
                 torch.arange(x.shape[1], device=dev)[None, :, None, None], rows, cols]
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)[:, None, None, None]
    return torch.where(flip, out.flip(3), out)
