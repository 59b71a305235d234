"""Datasets load offline into seeded splits; a missing dataset says where its files belong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnet_sweep.config import DataConfig, DatasetName
from resnet_sweep import data as datasets
from resnet_sweep.data import DEBIAN_FASHION_MNIST, DataUnavailable, batches, load, load_arrays, pad_crop_flip

CPU = torch.device("cpu")


def test_digits_split_is_seeded_and_disjoint() -> None:
    cfg = DataConfig(val_fraction=0.1, split_seed=0)
    a, b = load(cfg, CPU), load(cfg, CPU)
    assert (len(a.train), len(a.val), len(a.test)) == (1293, 144, 360)
    assert torch.equal(a.val.x, b.val.x)
    other = load(DataConfig(val_fraction=0.1, split_seed=1), CPU)
    assert not torch.equal(a.val.x, other.val.x)
    assert torch.equal(a.test.x, other.test.x)  # the test set never moves
    # disjoint: the validation images are not among the training images (digits has no duplicates to blur this)
    train_rows = {row.numpy().tobytes() for row in a.train.x.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in a.val.x.flatten(1))
    assert len(train_rows) == len(a.train)
    # normalised with the preset's statistics: roughly zero mean, unit std
    assert abs(a.train.x.mean().item()) < 0.1 and abs(a.train.x.std().item() - 1) < 0.1


def test_the_digits_kept_in_the_cache_folder_are_scikit_learns_split_and_a_damaged_file_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    made = datasets._digits()  # no file yet: split by scikit-learn, then kept
    (kept,) = (tmp_path / "resnet_sweep").glob("digits-sklearn-*.npz")
    expected = datasets._split_digits()
    for read in (made, datasets._digits()):  # the second is read from the file
        assert all(a.dtype == b.dtype and (a == b).all() for a, b in zip(read, expected, strict=True))
    for damage in (b"", b"\0" * 100):  # a crash before the file reached the disk; zeros over it
        kept.write_bytes(damage)
        assert all((a == b).all() for a, b in zip(datasets._digits(), expected, strict=True))
        assert kept.stat().st_size > 100 and [p.name for p in kept.parent.iterdir()] == [kept.name]


def test_a_process_reads_its_dataset_once_and_no_run_can_change_what_it_holds() -> None:
    cfg = DataConfig()
    held = load_arrays(cfg)
    assert load_arrays(DataConfig(split_seed=3, train_subset=10)) is held  # the same dataset: not read again
    assert not any(a.flags.writeable for a in held)
    first = load(cfg, CPU)
    for split in (first.train, first.val, first.test):  # a run that changed its tensors in place
        split.x.add_(100.0)
        split.y.zero_()
    again = load(cfg, CPU)
    assert again.train.x.max() < 50 and again.test.y.sum() > 0 and again.val.y.sum() > 0


def test_train_subset_caps_the_training_set_only() -> None:
    d = load(DataConfig(train_subset=100), CPU)
    assert len(d.train) == 100 and len(d.val) == 144


def test_val_subset_caps_the_validation_set_with_the_first_of_the_same_split() -> None:
    whole, capped = load(DataConfig(), CPU), load(DataConfig(val_subset=50, train_subset=100), CPU)
    assert len(capped.val) == 50 and len(capped.test) == len(whole.test)
    assert torch.equal(capped.val.x, whole.val.x[:50])  # the same images: a subset of the fixed split


def test_batches_cover_every_example_once_per_epoch() -> None:
    d = load(DataConfig(), CPU)
    seen = torch.cat([y for _, y in batches(d.train, 128, torch.Generator().manual_seed(0), shuffle=True)])
    assert len(seen) == len(d.train) and torch.equal(seen.sort().values, d.train.y.sort().values)


def test_wrong_input_shape_is_named() -> None:
    with pytest.raises(ValueError, match=r"data.input_shape=\[1, 8, 8\]"):
        load(DataConfig(input_shape=[1, 28, 28]), CPU)


def test_missing_mnist_offline_names_the_files_and_digits(tmp_path: Path) -> None:
    cfg = DataConfig(name=DatasetName.mnist, root=str(tmp_path), download=False, input_shape=[1, 28, 28],
                     mean=[0.1307], std=[0.3081])
    with pytest.raises(DataUnavailable) as err:
        load(cfg, CPU)
    assert str(tmp_path / "MNIST" / "raw") in str(err.value) and "data=digits" in str(err.value)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_loads_from_debians_package(tmp_path: Path) -> None:
    cfg = DataConfig(name=DatasetName.fashion_mnist, root=str(tmp_path), download=False, input_shape=[1, 28, 28],
                     mean=[0.2860], std=[0.3530], train_subset=1000)
    d = load(cfg, CPU)
    assert (len(d.train), len(d.val), len(d.test)) == (1000, 6000, 10000)
    assert set(d.test.y.tolist()) == set(range(10))


def test_the_flip_mirrors_left_and_right_only() -> None:
    x = torch.randn(64, 3, 8, 8)
    out = pad_crop_flip(x, torch.Generator().manual_seed(0), pad=0)  # no shift: each image is kept or mirrored
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]  # along the width: left <-> right
    assert all(k or m for k, m in zip(kept, mirrored)) and 16 < sum(mirrored) < 48


def test_pad_crop_flip_keeps_shape_and_content_scale() -> None:
    x = torch.randn(16, 3, 32, 32)
    out = pad_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    # a zero shift without flip is the identity: some images keep most of their pixels
    assert (out == 0).float().mean() < 0.3
