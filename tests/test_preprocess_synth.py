"""The synthetic image set: varied sizes, separable classes, and a CLI with --help everywhere."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from preprocess.__main__ import main
from preprocess.synth import draw, image_size_for


def test_sizes_vary_around_the_requested_size_with_portraits():
    rng = np.random.default_rng(0)
    sizes = [image_size_for(rng, 500, 375) for _ in range(400)]
    long_sides = np.array([max(size) for size in sizes])
    assert 280 < long_sides.min() and long_sides.max() < 760 and len(set(sizes)) > 300
    assert 0.8 < np.mean([w * h for w, h in sizes]) / (500 * 375) < 1.2
    assert 0.1 < np.mean([h > w for w, h in sizes]) < 0.4


def test_classes_are_separable_by_a_nearest_mean_classifier():
    # a learnable set: even mean colour inside the central region tells most classes apart
    rng = np.random.default_rng(1)
    classes, per_class = 6, 12
    features = np.array([[draw(c, rng, 48, 36)[9:27, 12:36].reshape(-1, 3).mean(0) for _ in range(per_class)]
                         for c in range(classes)])
    train, test = features[:, :8], features[:, 8:]
    centres = train.mean(axis=1)
    predicted = np.argmin(((test[:, :, None, :] - centres[None, None]) ** 2).sum(-1), axis=-1)
    accuracy = (predicted == np.arange(classes)[:, None]).mean()
    assert accuracy > 0.5, accuracy      # chance is 1/6


def test_folder_layout_is_complete(tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--classes", "3", "--per-class", "4", "--size", "40x30"]) == 0
    for split, count in (("train", 4), ("val", 1)):
        folders = sorted((tmp_path / split).iterdir())
        assert len(folders) == 3 and all(len(list(f.iterdir())) == count for f in folders)
    image = Image.open(next((tmp_path / "train").iterdir()).iterdir().__next__())
    assert image.format == "JPEG" and image.mode == "RGB"


def test_bad_size_is_a_one_line_error(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--size", "big"]) == 2
    assert "--size 'big'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["imagenet", "folder", "synth", "verify"])
def test_every_command_has_help(command):
    run = subprocess.run([sys.executable, "-m", "preprocess", command, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "python -m preprocess" in run.stdout
