"""The synthetic image set: varied sizes, separable classes, and a CLI with --help everywhere."""
import errno
import os
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


def test_an_out_that_cannot_take_the_set_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "used" / "train").mkdir(parents=True)
    for argv, message in (
            (["--out", str(tmp_path / "a-file")], f"--out {tmp_path / 'a-file'} is a file; give a folder for the set"),
            (["--out", str(tmp_path / "used")], f"--out {tmp_path / 'used'} already holds train; remove it or "
                                                f"choose another --out"),
            (["--out", str(tmp_path / "big"), "--classes", "20000000", "--layout", "imagenet"],
             "--classes 20000000: at most 49151 with --layout imagenet")):
        assert main(["synth", *argv, "--per-class", "1", "--size", "40x30"]) == 2   # were tracebacks
        error = capsys.readouterr().err.splitlines()
        assert len(error) == 1 and error[0].startswith(f"synth: {message}"), error
    assert not (tmp_path / "big").exists()


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    from preprocess import synth
    add_bytes = synth.add_bytes

    def full_in_the_val_tar(archive, name, data):
        if name.startswith("ILSVRC2012_val_"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        add_bytes(archive, name, data)
    monkeypatch.setattr(synth, "add_bytes", full_in_the_val_tar)
    out = tmp_path / "out"
    out.mkdir()   # a folder that existed stays, empty as it was
    assert main(["synth", "--out", str(out), "--classes", "2", "--per-class", "2", "--size", "40x30",
                 "--layout", "imagenet"]) == 1
    assert capsys.readouterr().err == (f"synth: cannot write under --out {out}: No space left on device; choose a "
                                       f"writable folder with space for the images (nothing was left there)\n")
    assert os.listdir(out) == []   # was a traceback, ILSVRC2012_img_val.tar.tmp and a train tar left behind
    # the folders it made for --out go with the rest
    assert main(["synth", "--out", str(tmp_path / "new" / "set"), "--classes", "2", "--per-class", "2",
                 "--size", "40x30", "--layout", "imagenet"]) == 1
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("command", ["imagenet", "folder", "synth", "verify"])
def test_every_command_has_help(command):
    run = subprocess.run([sys.executable, "-m", "preprocess", command, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "python -m preprocess" in run.stdout
