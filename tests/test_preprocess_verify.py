"""verify re-reads every shard and names the first bad file."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mpiconvnet.data.shards import ShardedDataset, content_checksum, file_sha256
from preprocess.__main__ import main


@pytest.fixture(params=["raw", "jpeg"])
def packed(tmp_path, request):
    source = tmp_path / "src"
    assert main(["synth", "--out", str(source), "--classes", "3", "--per-class", "6", "--size", "40x30"]) == 0
    out = tmp_path / "out"
    assert main(["folder", "--train", str(source / "train"), "--val", str(source / "val"), "--out", str(out),
                 "--image-size", "32", "--shard-size", "8", "--format", request.param, "--no-progress"]) == 0
    return out


def image_data_offset(path):
    """Byte offset of the first pixel data in a shard file (raw images or jpeg bytes)."""
    with h5py.File(path, "r") as shard:
        data = shard["images"] if "images" in shard else shard["jpeg"]
        return data.id.get_chunk_info(0).byte_offset if data.chunks else data.id.get_offset()


def verify_error(out, capsys):
    code = main(["verify", str(out)])
    return code, capsys.readouterr().err


def test_a_good_data_set_passes(packed, capsys):
    assert main(["verify", str(packed)]) == 0
    assert "all 21 images ok" in capsys.readouterr().out


def test_a_truncated_shard_is_named(packed, capsys):
    path = packed / "train-00001.h5"
    size = os.path.getsize(path)
    with open(path, "r+b") as stream:
        stream.truncate(size - 200)
    code, error = verify_error(packed, capsys)
    assert code == 1 and "train-00001.h5" in error and "sha256" in error


def flip_a_pixel_byte(path):
    offset = image_data_offset(path) + 5
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_byte_is_caught_by_the_file_checksum(packed, capsys):
    flip_a_pixel_byte(packed / "val-00000.h5")
    code, error = verify_error(packed, capsys)
    assert code == 1 and "val-00000.h5" in error


def as_format_version_1(path):
    """Turn a shard into what packs of format version 1 (before 2026-11-24) wrote: the same
    datasets plus the attribute content_sha256."""
    with h5py.File(path, "r+") as shard:
        shard.attrs["format_version"] = 1
        shard.attrs["content_sha256"] = content_checksum(shard)


def record_file_sha256s(packed, index_version=None):
    """Rewrite dataset.json with the shards' present file sha256s (and a format_version)."""
    index_path = packed / "dataset.json"
    index = json.loads(index_path.read_text())
    for entry in index["splits"].values():
        for shard in entry["shards"]:
            shard["sha256"] = file_sha256(packed / shard["file"])
    if index_version is not None:
        index["format_version"] = index_version
    index_path.write_text(json.dumps(index))


def test_a_format_version_1_data_set_is_still_read_and_verified(packed, capsys):
    before = ShardedDataset(packed, "train").read(range(12))
    for path in packed.glob("*.h5"):
        as_format_version_1(path)
    record_file_sha256s(packed, index_version=1)
    assert main(["verify", str(packed)]) == 0
    assert "all 21 images ok" in capsys.readouterr().out
    np.testing.assert_array_equal(ShardedDataset(packed, "train").read(range(12)), before)


def test_a_version_1_shards_content_checksum_is_still_checked(packed, capsys):
    # one version-1 shard among version-2 ones, as a pack resumed across the change leaves
    path = packed / "train-00000.h5"
    as_format_version_1(path)
    record_file_sha256s(packed)
    assert main(["verify", str(packed)]) == 0
    capsys.readouterr()
    # someone "fixed" dataset.json after the damage: the checksum over the data still disagrees
    flip_a_pixel_byte(path)
    record_file_sha256s(packed)
    code, error = verify_error(packed, capsys)
    assert code == 1 and "train-00000.h5: content checksum mismatch" in error


def test_a_missing_shard_and_a_missing_index(packed, capsys):
    os.remove(packed / "train-00002.h5")
    code, error = verify_error(packed, capsys)
    assert code == 1 and "train-00002.h5 not found" in error
    os.remove(packed / "dataset.json")
    code, error = verify_error(packed, capsys)
    assert code == 2 and "dataset.json not found" in error


@pytest.mark.parametrize("damage", ["index is a list", "shard without sha256", "shard file null",
                                    "mean image truncated", "mean image is text"])
def test_a_damaged_index_or_mean_image_is_one_line(packed, capsys, damage):
    index_path = packed / "dataset.json"
    index = json.loads(index_path.read_text())
    if damage == "index is a list":
        index = []
    elif damage == "shard without sha256":
        del index["splits"]["train"]["shards"][0]["sha256"]
    elif damage == "shard file null":
        index["splits"]["train"]["shards"][0]["file"] = None
    index_path.write_text(json.dumps(index))
    mean = packed / "mean_image.npy"
    if damage == "mean image truncated":
        os.truncate(mean, os.path.getsize(mean) // 2)
    elif damage == "mean image is text":
        mean.write_text("not an array")
    code, err = verify_error(packed, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert ("dataset.json" in err) if "mean" not in damage else ("mean_image.npy" in err), err


def test_a_set_whose_every_input_was_skipped_fails_verify_and_train_in_one_line(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    # packed all the same, for its skipped.tsv, and exit 1
    assert main(["folder", "--train", str(tmp_path / "train"), "--out", str(out), "--image-size", "64",
                 "--no-progress"]) == 1
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1    # was "all 0 images ok", exit 0
    assert capsys.readouterr().err == (f"verify: {out}: the train split holds no images (every input was skipped: "
                                       f"see {out / 'skipped.tsv'}); fix the inputs and re-pack it with python -m "
                                       f"preprocess\n")
    for drop_last in ("true", "false"):       # false was a ValueError traceback from the sampler
        run = subprocess.run([sys.executable, "-m", "mpiconvnet.train", "--data", str(out), "--out",
                              str(tmp_path / "run"), "--model", "alexnet-mini", "--workers", "0", "--progress",
                              "false", "--drop-last", drop_last],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr == (f"mpiconvnet.train: {out} holds no training images (every "
                                                      f"input was skipped when it was packed: see its skipped.tsv); "
                                                      f"fix the inputs and pack them again with python -m "
                                                      f"preprocess\n"), run.stderr
