"""The package as a user installs it: a wheel (not editable) that runs from any folder, presets inside it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_the_wheel_holds_the_presets_and_trains_from_another_folder_with_the_users_own_preset(tmp_path: Path) -> None:
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], check=True, capture_output=True)
    (wheel,) = wheels.glob("resnet_sweep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "resnet_sweep/conf/config.yaml" in names
    assert "resnet_sweep/conf/experiment/degradation.yaml" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    (work / "presets" / "model").mkdir(parents=True)
    (work / "presets" / "model" / "tiny_plain.yaml").write_text("family: plain\nlayout: cifar\ndepth: 8\n")
    # The installed copy, not this checkout, comes first on the path.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import resnet_sweep; print(resnet_sweep.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))
    res = subprocess.run([sys.executable, "-m", "resnet_sweep", "model=tiny_plain", "trainer.epochs=1",
                          "data.train_subset=64"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "epoch 1/1" in res.stdout + res.stderr
    assert (work / "mlflow.db").exists()
