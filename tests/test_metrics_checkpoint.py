"""metrics.jsonl and checkpoints on a disk that fills up: whole lines and whole files, or
none, and one line naming the file."""
import errno
import json
import os

import h5py
import numpy as np
import pytest

from mpiconvnet import checkpoint
from mpiconvnet.metrics import MetricsLog, read_records
from mpiconvnet.plot import read_metrics


def meta_of(step):
    """A checkpoint's meta with every key a resume reads."""
    return {"step": step, "model": "m", "num_classes": 4, "steps_per_epoch": 3, "config": {},
            "schedule": {"drops": 0, "best_top1": 0.5, "bad_evals": 1}}


def record(step, kind="train"):
    if kind == "eval":
        return {"kind": "eval", "step": step, "loss": 1.0, "top1": 0.5, "top5": 0.9}
    return {"kind": "train", "step": step, "loss": 2.0, "lr": 0.01, "images_per_s": 10.0}


def test_a_line_cut_short_is_skipped_by_readers_and_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps(record(s)) + "\n" for s in (1, 2, 3))
    path.write_text(whole + json.dumps(record(4))[:20])    # a crash in the middle of a write
    assert [r["step"] for r in read_records(path)] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(tmp_path)[0]] == [1, 2, 3]
    MetricsLog(tmp_path, True, resume_step=2).write(record(3))
    assert [r["step"] for r in read_records(path)] == [1, 2, 3]
    assert path.read_text().endswith("\n")


def test_a_fresh_run_starts_the_file_anew(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record(5)) + "\n")
    MetricsLog(tmp_path, True).write(record(1))
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("text, message", [
    ('{"kind": "train", "step": 1\n' + json.dumps(record(2)) + "\n", "metrics.jsonl:1 is not JSON"),
    ("[1, 2]\n", "metrics.jsonl:1 is not a metrics record"),
    ('{"kind": "train", "step": 1}\n', "the train record of step 1 has no loss, lr, images_per_s"),
])
def test_damage_before_the_last_line_is_named(tmp_path, text, message):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_metrics(tmp_path)


def test_a_line_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes((json.dumps(record(1)) + "\n").encode() + b"\xff\xfe\x00garbage\n")
    with pytest.raises(ValueError, match=f"^{path}:2 is not UTF-8 text; the file is damaged$"):
        read_metrics(tmp_path)
    with pytest.raises(checkpoint.OutputError) as error:
        MetricsLog(tmp_path, True, resume_step=1)   # train --resume auto
    assert str(error.value) == (f"{path}:2 is not UTF-8 text; the file is damaged; move {path} aside (or delete "
                                f"that line) and run the same command again")
    path.write_bytes((json.dumps(record(1)) + "\n").encode() + b"\xff\xfe")   # cut short: skipped as ever
    assert [r["step"] for r in read_records(path)] == [1]


def test_a_failed_metrics_write_leaves_no_half_line(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path, True)
    log.write(record(1))
    write = os.write

    def half_then_full(fd, data):
        if len(data) > 10:
            return write(fd, data[:10])     # the disk takes ten bytes, then is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(checkpoint.OutputError, match="cannot write .*metrics.jsonl: No space left on device"):
        log.write(record(2))
    monkeypatch.setattr(os, "write", write)
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(record(1)) + "\n"


def test_a_full_disk_while_a_resume_rewrites_the_metrics_leaves_no_temporary_file(tmp_path):
    lines = [json.dumps(record(s)) + "\n" for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    (tmp_path / "metrics.jsonl.tmp").symlink_to("/dev/full")   # the kernel's real ENOSPC
    with pytest.raises(checkpoint.OutputError, match="cannot write .*metrics.jsonl: No space left on device"):
        MetricsLog(tmp_path, True, resume_step=1)
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines)


def test_a_metrics_file_that_cannot_be_read_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(checkpoint.OutputError) as error:
        MetricsLog(tmp_path, True, resume_step=4)
    assert str(error.value) == (f"cannot read {tmp_path}/metrics.jsonl: Is a directory; move it aside and run the "
                                f"same command again")


def test_a_checkpoint_that_meets_a_full_disk_leaves_no_file(tmp_path, monkeypatch):
    params = {"conv1.weight": np.ones((4, 3, 2, 2), np.float32)}
    checkpoint.save(tmp_path, 1, params, params, meta_of(1), keep=3)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(checkpoint.OutputError, match="ckpt-00000002.h5: No space left on device"):
        checkpoint.save(tmp_path, 2, params, params, meta_of(2), keep=3)
    assert os.listdir(tmp_path / "checkpoints") == ["ckpt-00000001.h5"]
    loaded, _, meta = checkpoint.load(checkpoint.list_checkpoints(tmp_path)[0])
    np.testing.assert_array_equal(loaded["conv1.weight"], params["conv1.weight"])
    assert meta["step"] == 1


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    with h5py.File(tmp_path / "shard.h5", "w") as f:   # a data shard: attributes, no params
        f.attrs["format_version"] = 2
    with h5py.File(tmp_path / "broken.h5", "w") as f:
        f.attrs["format_version"] = checkpoint.FORMAT_VERSION
        f.attrs["meta"] = "{not json"
        f.create_group("params")
        f.create_group("velocity")
    with pytest.raises(checkpoint.CheckpointError, match="is not an mpiconvnet checkpoint"):
        checkpoint.load(str(tmp_path / "shard.h5"))
    with pytest.raises(checkpoint.CheckpointError, match="broken.h5 is unreadable"):
        checkpoint.load(str(tmp_path / "broken.h5"))


def test_files_that_are_no_hdf5_are_no_checkpoint_and_the_line_names_the_flag(tmp_path):
    np.savez(tmp_path / "w.npz", a=np.zeros(2))
    (tmp_path / "notes.txt").write_text("hello\n")
    for name in ("w.npz", "notes.txt"):
        with pytest.raises(checkpoint.CheckpointError) as error:
            checkpoint.load(str(tmp_path / name))
        assert str(error.value) == (f"--checkpoint {tmp_path / name} is not a checkpoint (an HDF5 file written by "
                                    f"python -m mpiconvnet.train); give a checkpoint file or a run directory (an "
                                    f".npz of weights starts a new run with train --init-weights)")
    with h5py.File(tmp_path / "shard.h5", "w") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(checkpoint.CheckpointError, match="^--init-weights .*shard.h5 is not an mpiconvnet"):
        checkpoint.load(str(tmp_path / "shard.h5"), "--init-weights")
    # a damaged checkpoint alone: the fix names the flag that takes another
    (tmp_path / "cut.h5").write_bytes(checkpoint.HDF5_SIGNATURE + b"\0" * 100)
    with pytest.raises(checkpoint.CheckpointError, match="cut.h5 is unreadable .*; give --init-weights an older "
                                                         "checkpoint$"):
        checkpoint.load(str(tmp_path / "cut.h5"), "--init-weights")


def test_the_checkpoints_folder_is_taken_like_its_run_directory(tmp_path):
    params = {"w": np.ones(2, np.float32)}
    for step in (1, 2):
        checkpoint.save(tmp_path, step, params, params, meta_of(step), keep=3)
    newest = str(tmp_path / "checkpoints" / "ckpt-00000002.h5")
    assert checkpoint.find_checkpoint(str(tmp_path)) == checkpoint.find_checkpoint(str(tmp_path / "checkpoints")) \
        == newest


def test_a_newest_checkpoint_pruned_before_it_is_opened_is_chosen_again(tmp_path, monkeypatch):
    # a live run with --keep-checkpoints 1 writes step 3 and removes step 2 between the
    # listing and the opening
    params = {"w": np.ones(2, np.float32)}
    checkpoint.save(tmp_path, 2, params, params, meta_of(2), keep=1)
    load = checkpoint.load

    def load_after_the_run_moved_on(path, flag="--checkpoint"):
        if path.endswith("ckpt-00000002.h5"):
            checkpoint.save(tmp_path, 3, params, params, meta_of(3), keep=1)
        return load(path, flag)

    monkeypatch.setattr(checkpoint, "load", load_after_the_run_moved_on)
    path, _, _, meta = checkpoint.load_given(str(tmp_path))
    assert path.endswith("ckpt-00000003.h5") and meta["step"] == 3


def test_the_class_list_is_checked_when_the_checkpoint_records_one(tmp_path):
    params = {"w": np.ones(2, np.float32)}
    classes = ["n0", "n1", "n2", "n3"]
    checkpoint.save(tmp_path, 1, params, params, {**meta_of(1), "classes": classes}, keep=3)
    _, _, meta = checkpoint.load(checkpoint.list_checkpoints(tmp_path)[-1])
    assert meta["classes"] == classes
    assert checkpoint.class_mismatch(meta, classes, "C", "D") is None
    assert checkpoint.class_mismatch(meta, ["n0", "n2", "n1", "n3"], "C", "D") == \
        "D has other classes than checkpoint C was trained on: label 1 is n2 there, n1 in the checkpoint"
    assert checkpoint.class_mismatch(meta_of(1), ["x"], "C", "D") is None   # from before the list: not checked
    checkpoint.save(tmp_path, 2, params, params, {**meta_of(2), "classes": classes[:3]}, keep=3)
    with pytest.raises(checkpoint.CheckpointError, match="its meta's classes is not a list of 4 class names"):
        checkpoint.load(checkpoint.list_checkpoints(tmp_path)[-1])


def test_checkpoints_set_aside_never_overwrite_and_a_same_step_branch_goes_too(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()

    def make(*steps):
        for step in steps:
            (folder / f"ckpt-{step:08d}.h5").write_text(str(step))

    make(4, 6, 8)
    aside, names = checkpoint.set_aside_newer(tmp_path, str(folder / "ckpt-00000004.h5"), 4)
    assert aside.endswith("superseded/1") and names == ["ckpt-00000006.h5", "ckpt-00000008.h5"]
    make(6)
    assert checkpoint.set_aside_newer(tmp_path, str(folder / "ckpt-00000004.h5"), 4)[0].endswith("superseded/2")
    # the first folder deleted (to free space): the next move still takes a new number
    for name in os.listdir(folder / "superseded" / "1"):
        os.remove(folder / "superseded" / "1" / name)
    os.rmdir(folder / "superseded" / "1")
    make(5)
    # resumed from the other branch's step 4: this branch's step 4 goes aside too
    other = folder / "superseded" / "2" / "ckpt-00000004.h5"
    other.write_text("the other branch")
    aside, names = checkpoint.set_aside_newer(tmp_path, str(other), 4)
    assert aside.endswith("superseded/3") and names == ["ckpt-00000004.h5", "ckpt-00000005.h5"]
    assert (folder / "superseded" / "2" / "ckpt-00000006.h5").read_text() == "6"


def save_steps(run, *steps):
    """Checkpoints of `steps` with arrays of ones; returns their paths."""
    params = {"conv1.weight": np.ones((4, 3, 2, 2), np.float32), "conv1.bias": np.ones(4, np.float32)}
    return [checkpoint.save(run, step, params, params, meta_of(step), keep=9)
            for step in steps]


def overwrite(path, dataset, data):
    """Bytes of `dataset` replaced where they lie in the file, as a bad disk would."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(data)


def test_a_checkpoint_damaged_after_it_was_written_is_refused_naming_an_older_one(tmp_path):
    older, newest = save_steps(tmp_path, 1, 2)
    # finite numbers: only the checksum can tell (0xff bytes would be NaN)
    overwrite(newest, "velocity/conv1.weight", np.float32(1.5).tobytes() * 4)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load(newest, "--resume")
    assert str(error.value) == (f"checkpoint {newest} is damaged (velocity/conv1.weight does not match its "
                                f"checksum); use the older one instead: --resume {older}")
    with h5py.File(older, "r+") as f:   # a meta rewritten in place: another step, the old checksum
        f.attrs["meta"] = f.attrs["meta"].replace('"step": 1', '"step": 7')
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt-00000001.h5 is damaged \(its meta attribute does "
                                                         r"not match its checksum\); no older checkpoint is beside"):
        checkpoint.load(older)


def test_checkpoints_without_checksums_load_and_nan_or_inf_is_refused(tmp_path):
    # written as before the checksums: the same file without their attributes
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    ones = np.ones((4, 3, 2, 2), np.float32)
    for step, value in ((1, ones), (2, np.full_like(ones, np.inf))):
        with h5py.File(folder / f"ckpt-{step:08d}.h5", "w") as f:
            f.attrs["format_version"] = checkpoint.FORMAT_VERSION
            f.attrs["meta"] = json.dumps(meta_of(step))
            f["params/conv1.weight"] = f["velocity/conv1.weight"] = value
    params, velocity, meta = checkpoint.load(str(folder / "ckpt-00000001.h5"))
    np.testing.assert_array_equal(params["conv1.weight"], ones)
    assert meta["step"] == 1
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load(str(folder / "ckpt-00000002.h5"), "--resume")
    assert str(error.value) == (f"checkpoint {folder}/ckpt-00000002.h5 holds NaN or Inf in params/conv1.weight; "
                                f"use the older one instead: --resume {folder}/ckpt-00000001.h5")


def rewrite_meta(path, change):
    """The meta attribute changed by change(meta), its checksum with it: a file written
    whole, by another tool or by hand, not damaged."""
    import zlib
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        change(meta)
        f.attrs["meta"] = text = json.dumps(meta)
        f.attrs["meta_crc32"] = zlib.crc32(text.encode())


def test_a_checkpoint_with_a_part_missing_or_misshapen_is_refused_naming_the_part(tmp_path):
    older, newest = save_steps(tmp_path, 1, 2)
    with h5py.File(newest, "r+") as f:
        del f["velocity/conv1.bias"]
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load(newest)
    assert str(error.value) == (f"checkpoint {newest} is incomplete (velocity/conv1.bias is missing); use the "
                                f"older one instead: --checkpoint {older}")
    with h5py.File(newest, "r+") as f:
        f["velocity/conv1.bias"] = np.ones(3, np.float32)
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt-00000002.h5 is damaged \(velocity/conv1.bias has "
                                                         r"shape \(3,\), params/conv1.bias \(4,\)\)"):
        checkpoint.load(newest)
    rewrite_meta(older, lambda meta: meta.pop("schedule"))
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt-00000001.h5 is incomplete \(its meta attribute "
                                                         r"lacks schedule\); no older checkpoint is beside it"):
        checkpoint.load(older)


def test_every_array_comes_back_with_its_shape_a_scalar_too(tmp_path):
    # np.ascontiguousarray would have saved a 0-d array as shape (1,)
    params = {"scale": np.float32(2.5) * np.ones((), np.float32), "w": np.arange(6, dtype=np.float32).reshape(2, 3).T}
    path = checkpoint.save(str(tmp_path), 3, params, params, meta_of(3), keep=2)
    loaded, velocity, _ = checkpoint.load(path)
    for name, value in params.items():
        assert loaded[name].shape == value.shape and np.array_equal(loaded[name], value)
        assert velocity[name].shape == value.shape
