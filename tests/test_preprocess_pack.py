"""Packing class folders: bad inputs skipped and listed, exit codes, resume after a kill,
and the same data set from 1 worker, 2 workers, 2 MPI ranks and 2 array tasks."""
import errno
import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from mpiconvnet.data.shards import ShardedDataset, file_sha256
from preprocess.__main__ import main
from preprocess.pack import pack_shard
from preprocess.writer import ShardWriter
from tests.conftest import as_an_ordinary_user, descendants

PACK = ["--image-size", "32", "--shard-size", "8", "--no-progress"]
BAD = {  # file name -> (bytes, reason expected in skipped.tsv)
    "empty.jpg": (b"", "empty file"),
    "notes.jpg": (b"shopping list: eggs, milk\n", "not an image"),
    "truncated.jpg": (None, "truncated"),
    "bomb.png": (None, "decompression bomb"),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    assert main(["synth", "--out", str(root), "--classes", "3", "--per-class", "9", "--val-per-class", "2",
                 "--size", "40x30"]) == 0
    return root


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    """Images large enough (400x300) that a shard takes a visible time, so a signal or a
    kill lands inside one; made once, read by every test that needs it."""
    root = tmp_path_factory.mktemp("photos")
    assert main(["synth", "--out", str(root), "--classes", "2", "--per-class", "40", "--val-per-class", "1",
                 "--size", "400x300"]) == 0
    return root


def add_bad_inputs(train):
    folder = train / sorted(os.listdir(train))[0]
    good = sorted(folder.iterdir())[0].read_bytes()
    for name, (data, _) in BAD.items():
        if name == "truncated.jpg":
            data = good[: len(good) // 2]
        if name == "bomb.png":
            import io
            stream = io.BytesIO()
            Image.new("1", (12000, 12000)).save(stream, "PNG")   # 144 M pixels, a few kB on disk
            data = stream.getvalue()
        (folder / name).write_bytes(data)
    # a dangling link cannot be read even by root (a mode-000 file can)
    (folder / "unreadable.jpg").symlink_to(folder / "deleted-meanwhile.jpg")
    return folder


def test_every_bad_input_is_skipped_and_listed(tree, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(tree / "train", train)
    add_bad_inputs(train)
    out = tmp_path / "out"
    assert main(["folder", "--train", str(train), "--out", str(out), "--max-pixels", "100000000"] + PACK) == 0
    rows = [line.split("\t") for line in (out / "skipped.tsv").read_text().splitlines()[1:]]
    reasons = {source.rsplit("/", 1)[-1]: reason for _, source, reason in rows}
    for name, (_, reason) in BAD.items():
        assert reason in reasons.pop(name), name
    assert "unreadable" in reasons.pop("unreadable.jpg")
    assert reasons == {}
    index = json.loads((out / "dataset.json").read_text())
    assert index["splits"]["train"]["num_images"] == 27 and index["skipped"] == len(rows)
    assert f"skipped {len(rows)}" in capsys.readouterr().out
    # --strict packs the same set but exits 1
    assert main(["folder", "--train", str(train), "--out", str(tmp_path / "strict"), "--strict",
                 "--max-pixels", "100000000"] + PACK) == 1


def test_nothing_usable_exits_non_zero(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(b"")
    assert main(["folder", "--train", str(tmp_path / "train"), "--out", str(tmp_path / "out")] + PACK) == 1
    assert main(["folder", "--train", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")] + PACK) == 2
    assert not (tmp_path / "o2").exists()   # a refused command leaves no --out folder behind


def test_bad_flags_are_one_line_errors(tree, tmp_path, capsys):
    base = ["folder", "--train", str(tree / "train"), "--out", str(tmp_path / "out")] + PACK
    assert main([*base, "--rank", "2", "--size", "2"]) == 2
    assert "--rank 2 --size 2" in capsys.readouterr().err
    assert main([*base, "--format", "jpeg", "--quality", "0"]) == 2
    assert "--quality 0" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "out"    # cannot be created, even by root
    assert main(["folder", "--train", str(tree / "train"), "--out", str(out)] + PACK) == 2
    assert capsys.readouterr().err == (f"preprocess: cannot write under --out {out}: Not a directory; choose a "
                                       f"writable directory with space for the shards\n")


def test_an_image_size_too_large_to_pack_is_refused_before_out_exists(tree, tmp_path, capsys):
    out = tmp_path / "out"
    # a MemoryError traceback from the first shard, after plan.json had locked --out to it
    assert main(["folder", "--train", str(tree / "train"), "--out", str(out), "--image-size", "100000",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == ("preprocess: --image-size 100000: at most 4096; a packing process holds 48 "
                                       "bytes a pixel of exact sums (447 GiB here, 0.75 GiB at 4096), and convnets "
                                       "train on crops of 224-512\n")
    assert not out.exists()


def test_squash_keeps_the_whole_picture(tmp_path):
    # a wide image, red on the left third, blue elsewhere: squash keeps the red, the centre crop loses it
    (tmp_path / "train" / "a").mkdir(parents=True)
    pixels = np.zeros((30, 90, 3), np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "train" / "a" / "wide.png")
    for resize, has_red in (("squash", True), ("shorter-crop", False)):
        out = tmp_path / resize
        assert main(["folder", "--train", str(tmp_path / "train"), "--out", str(out), "--resize", resize] + PACK) == 0
        image = ShardedDataset(out, "train").read([0])[0]
        assert (image[..., 0] > 200).any() == has_red, resize


def test_a_different_command_into_the_same_folder_is_refused(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["folder", "--train", str(tree / "train"), "--out", str(out)] + PACK) == 0
    assert main(["folder", "--train", str(tree / "train"), "--out", str(out), "--seed", "5"] + PACK) == 2
    assert "different seed" in capsys.readouterr().err


def test_jpeg_format_reads_back_close_to_raw(tree, tmp_path):
    raw, jpeg = tmp_path / "raw", tmp_path / "jpeg"
    assert main(["folder", "--train", str(tree / "train"), "--out", str(raw)] + PACK) == 0
    assert main(["folder", "--train", str(tree / "train"), "--out", str(jpeg), "--format", "jpeg",
                 "--quality", "95"] + PACK) == 0
    a, b = ShardedDataset(raw, "train"), ShardedDataset(jpeg, "train")
    np.testing.assert_array_equal(a.labels, b.labels)
    order = np.arange(a.num_images)[::-1]
    difference = np.abs(a.read(order).astype(int) - b.read(order).astype(int))
    assert difference.mean() < 6     # noisy synthetic images at q95
    np.testing.assert_allclose(a.mean, b.mean)   # statistics come from the same pixels


def test_shard_statistics_are_exact_integer_sums(tmp_path):
    # more images than the writer's narrow running sums hold, the first ones all 255 so that
    # a missed widening overflows; at S=32 a channel's sum of squares passes 2^24, beyond
    # what float32 adds exactly
    size, count = 32, 2 * ShardWriter.WIDEN_EVERY + 3
    images = np.random.default_rng(0).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    images[:ShardWriter.WIDEN_EVERY + 1] = 255
    writer = ShardWriter(str(tmp_path), "train-00000.h5", "train", ["a"], size, "raw", capacity=count)
    for position, image in enumerate(images):
        writer.add(image, 0, f"{position}.jpg", position)
    writer.finish()
    with h5py.File(tmp_path / "train-00000.h5", "r") as shard:
        np.testing.assert_array_equal(shard["sum_image"][()], images.sum(axis=0, dtype=np.int64))
        np.testing.assert_array_equal(shard.attrs["channel_sum_squares"],
                                      (images.astype(np.int64) ** 2).sum(axis=(0, 1, 2)))
        np.testing.assert_array_equal(shard["images"][()], images)


def preprocess_command(*argv):
    return [sys.executable, "-m", "preprocess", *argv]


def quiet_env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def half_written(out):
    return out.exists() and any(name.endswith(".h5.tmp") for name in os.listdir(out))


def test_resume_after_a_kill_mid_shard(photo_tree, tmp_path):
    # large enough images that a shard takes a visible time, so the kill lands inside one
    source = photo_tree
    argv = ["folder", "--train", str(source / "train"), "--image-size", "64", "--shard-size", "10", "--no-progress"]
    out = tmp_path / "killed"
    process = subprocess.Popen(preprocess_command(*argv, "--out", str(out)), env=quiet_env())
    deadline = time.time() + 60
    while time.time() < deadline and not (half_written(out) and any(n.endswith(".h5") for n in os.listdir(out))):
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    names = os.listdir(out)
    assert half_written(out) and "dataset.json" not in names, "the kill did not land inside a shard"
    # every shard under its final name is whole: it matches its receipt
    for name in names:
        if name.endswith(".h5"):
            receipt = json.loads((out / ".pack" / f"{name}.json").read_text())
            assert receipt["sha256"] == file_sha256(out / name)
    finished_before = [n for n in names if n.endswith(".h5")]
    for name in finished_before:
        os.utime(out / name, (1, 1))     # a mark that any rewrite would erase
    assert main([*argv, "--out", str(out)]) == 0
    # the re-run packed only what was missing: finished shards were not rewritten
    assert all(os.stat(out / n).st_mtime == 1 for n in finished_before)
    assert main(["verify", str(out)]) == 0
    reference = tmp_path / "uninterrupted"
    assert main([*argv, "--out", str(reference)]) == 0
    assert json.loads((out / "dataset.json").read_text()) == json.loads((reference / "dataset.json").read_text())
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    assert 0 < len(finished_before) < 8, "the kill should land after the first shard and before the last"


@pytest.mark.parametrize("signal_to", ["SIGINT to the group", "SIGTERM to the group", "SIGTERM to the parent"])
def test_ctrl_c_is_one_line_keeps_finished_shards_and_the_same_command_finishes(photo_tree, tmp_path, signal_to):
    source = photo_tree
    argv = ["folder", "--train", str(source / "train"), "--image-size", "64", "--shard-size", "10", "--no-progress",
            "--workers", "2"]
    out = tmp_path / "out"
    # its own process group, which a terminal's ctrl-c signals as a whole: parent and workers
    process = subprocess.Popen(preprocess_command(*argv, "--out", str(out)), env=quiet_env(), start_new_session=True,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out.exists() and any(n.endswith(".h5") for n in os.listdir(out))):
        time.sleep(0.002)
    if signal_to == "SIGINT to the group":   # a terminal's ctrl-c
        os.killpg(process.pid, signal.SIGINT)
    elif signal_to == "SIGTERM to the group":  # scancel, kill -TERM -PGID: a Pool's worker died holding its lock
        os.killpg(process.pid, signal.SIGTERM)
    else:                                     # kill PID, or a batch system's end of a job step
        os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    time.sleep(0.5)   # a worker left running would write a .tmp file by now
    assert process.returncode == 130, err
    assert err.strip() == ("preprocess: interrupted; finished shards are kept: run the same command again to pack the "
                           "rest"), err
    names = os.listdir(out)
    assert not half_written(out) and "dataset.json" not in names and any(n.endswith(".h5") for n in names)
    assert main([*argv, "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0


def hold_shard_lock(out, number):
    """Lock shard `number`'s byte as a running packer would (this process is not the packer)."""
    (out / ".pack").mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".pack" / "shards.lock", os.O_RDWR | os.O_CREAT)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, number, os.SEEK_SET)
    return fd


def test_a_shard_another_run_is_packing_is_refused_and_array_tasks_pack_side_by_side(tree, tmp_path):
    base = ["folder", "--train", str(tree / "train"), "--val", str(tree / "val")] + PACK
    out = tmp_path / "out"
    fd = hold_shard_lock(out, 0)   # shard 0 of the pack: train-00000.h5, array task 0's
    try:
        refused = subprocess.run(preprocess_command(*base, "--out", str(out)), env=quiet_env(),
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr == (f"preprocess: another preprocess run is packing train-00000.h5 into --out {out}; "
                                  f"let it finish (or stop it), then run this command again: finished shards are "
                                  f"kept\n")
        assert not any(name.endswith((".h5", ".tmp")) for name in os.listdir(out))
        # task 1 of an array packs other shards than the locked one: it goes on
        other = subprocess.run(preprocess_command(*base, "--out", str(out), "--rank", "1", "--size", "2"),
                               env=quiet_env(), capture_output=True, text=True, timeout=120)
        assert other.returncode == 0, other.stderr
        task0 = subprocess.run(preprocess_command(*base, "--out", str(out), "--rank", "0", "--size", "2"),
                               env=quiet_env(), capture_output=True, text=True, timeout=120)
        assert task0.returncode == 1 and "packing train-00000.h5" in task0.stderr, task0.stderr
    finally:
        os.close(fd)
    assert main([*base, "--out", str(out), "--rank", "0", "--size", "2"]) == 0
    assert main(["verify", str(out)]) == 0


def test_two_runs_started_at_once_into_one_folder_give_one_whole_data_set(tmp_path):
    # before shards were locked both runs wrote the same .tmp files: both failed, or one
    # published a shard its receipt disowned
    source = tmp_path / "src"
    assert main(["synth", "--out", str(source), "--classes", "4", "--per-class", "100", "--val-per-class", "2",
                 "--size", "300x200"]) == 0
    out = tmp_path / "out"
    argv = ["folder", "--train", str(source / "train"), "--val", str(source / "val"), "--out", str(out),
            "--image-size", "64", "--shard-size", "25", "--no-progress"]
    runs = [subprocess.Popen(preprocess_command(*argv, *extra), env=quiet_env(), stderr=subprocess.PIPE, text=True)
            for extra in ([], ["--workers", "2"])]
    results = [(run.wait(timeout=120), run.stderr.read()) for run in runs]
    for code, err in results:
        assert code == 0 or (code == 1 and "another preprocess run is packing" in err), err
    assert 0 in [code for code, _ in results]
    assert main(["verify", str(out)]) == 0
    assert not any(name.endswith(".tmp") for name in os.listdir(out))


def writing_a_shard(pid):
    try:
        return any(os.readlink(link).endswith(".h5.tmp") for link in glob.glob(f"/proc/{pid}/fd/*"))
    except OSError:   # a descriptor closed meanwhile
        return False


def test_workers_end_with_a_killed_packer(photo_tree, tmp_path):
    # a worker left packing after its parent's SIGKILL would write the .tmp file the next run
    # writes; a stopped one (as a hung read leaves it) would never end at all
    source = photo_tree
    process = subprocess.Popen(preprocess_command("folder", "--train", str(source / "train"), "--out",
                                                  str(tmp_path / "out"), "--image-size", "64", "--shard-size", "10",
                                                  "--no-progress", "--workers", "2"),
                               env=quiet_env(), start_new_session=True, stderr=subprocess.DEVNULL)
    stopped = set()
    deadline = time.time() + 60
    while time.time() < deadline and len(stopped) < 2:
        for pid in descendants(process.pid):
            if pid not in stopped and writing_a_shard(pid):   # so past its start-up, where it would set anything
                os.kill(pid, signal.SIGSTOP)
                stopped.add(pid)
        time.sleep(0.002)
    assert len(stopped) == 2, "both workers should have been caught writing a shard"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(process.pid, 0)   # anyone left in the packer's process group?
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("pool workers outlived their killed parent")


def test_a_worker_killed_mid_shard_is_one_line_and_the_same_command_then_finishes(photo_tree, tmp_path):
    # the OOM killer's SIGKILL: multiprocessing.Pool lost the task and the packer waited for ever
    source = photo_tree
    argv = ["folder", "--train", str(source / "train"), "--image-size", "64", "--shard-size", "10", "--no-progress",
            "--workers", "2"]
    out = tmp_path / "out"
    process = subprocess.Popen(preprocess_command(*argv, "--out", str(out)), env=quiet_env(), stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 60
    victim = None
    while time.time() < deadline and victim is None:
        victim = next((pid for pid in descendants(process.pid) if writing_a_shard(pid)), None)
        time.sleep(0.002)
    assert victim, "no worker was caught writing a shard"
    os.kill(victim, signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1, err
    assert err == ("preprocess: a worker process was killed by SIGKILL (out of memory? the kernel's OOM killer sends "
                   "it); finished shards are kept: run the same command again (with fewer --workers if memory ran "
                   "out)\n")
    assert not half_written(out) and not (out / "dataset.json").exists()
    assert main([*argv, "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0


def test_what_killed_runs_left_half_written_is_removed_before_the_re_run_packs(tree, tmp_path):
    base = ["folder", "--train", str(tree / "train"), "--val", str(tree / "val"), "--out", str(tmp_path)] + PACK
    assert main(base) == 0
    # as a kill inside publish() leaves it: the receipt's temporary file, the shard not yet renamed
    (tmp_path / "train-00001.h5").unlink()
    (tmp_path / "dataset.json").unlink()
    stale = tmp_path / ".pack" / "train-00001.h5.json.4242.tmp"
    stale.write_text('{"file": "train-0')
    # and a shard another MPI rank was writing when a rank's full disk aborted them all
    (tmp_path / "train-00002.h5").unlink()
    half = tmp_path / "train-00002.h5.tmp"
    half.write_bytes(b"\0" * 4096)
    removed = []
    with pytest.MonkeyPatch.context() as patch:   # gone before any shard is packed, where space is needed first
        patch.setattr("preprocess.pack.pack_shard", lambda task: removed.append(half.exists()) or pack_shard(task))
        assert main(base) == 0
    assert removed == [False, False]
    assert not stale.exists() and not half.exists()
    assert main(["verify", str(tmp_path)]) == 0


def test_two_workers_and_two_array_tasks_give_the_same_data_set(tree, tmp_path):
    base = ["folder", "--train", str(tree / "train"), "--val", str(tree / "val")] + PACK
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "array"), "--rank", "1", "--size", "2"]) == 0
    assert not (tmp_path / "array" / "dataset.json").exists()     # task 0 has not run yet
    assert main([*base, "--out", str(tmp_path / "array"), "--rank", "0", "--size", "2"]) == 0
    one = (tmp_path / "one" / "dataset.json").read_text()
    assert one == (tmp_path / "two" / "dataset.json").read_text()
    assert one == (tmp_path / "array" / "dataset.json").read_text()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_is_one_line_and_the_same_command_then_finishes(tree, tmp_path, monkeypatch, capsys, workers):
    base = ["folder", "--train", str(tree / "train"), "--val", str(tree / "val")] + PACK
    add = ShardWriter.add

    def disk_full_in_shard_2(writer, *args, **kwargs):
        if writer.shard_file == "train-00002.h5" and len(writer.labels) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return add(writer, *args, **kwargs)

    # worker processes are forked (not under MPI), so they inherit the patch
    monkeypatch.setattr(ShardWriter, "add", disk_full_in_shard_2)
    out = tmp_path / "out"
    assert main([*base, "--out", str(out), "--workers", workers]) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"preprocess: writing under --out {out} failed: No space left on device; free space or fix "
                     f"permissions there (or choose another --out), then run the same command again: finished "
                     f"shards are kept")
    names = os.listdir(out)
    assert not half_written(out) and "dataset.json" not in names
    for name in names:   # what was finished is whole, and kept
        if name.endswith(".h5"):
            assert json.loads((out / ".pack" / f"{name}.json").read_text())["sha256"] == file_sha256(out / name)
    if workers == "1":
        assert "train-00000.h5" in names and "train-00001.h5" in names
    monkeypatch.setattr(ShardWriter, "add", add)
    assert main([*base, "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    assert main([*base, "--out", str(tmp_path / "reference")]) == 0
    assert (out / "dataset.json").read_text() == (tmp_path / "reference" / "dataset.json").read_text()


@pytest.mark.mpi
def test_mpiexec_two_ranks_give_the_same_data_set(tree, tmp_path):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip(f"no mpiexec next to {sys.executable}; pip install mpich")
    base = ["folder", "--train", str(tree / "train"), "--val", str(tree / "val")] + PACK
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    run = subprocess.run([mpiexec, "-n", "2", *preprocess_command(*base, "--out", str(tmp_path / "mpi"))],
                         env=quiet_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "one" / "dataset.json").read_text() == (tmp_path / "mpi" / "dataset.json").read_text()
    assert run.stdout.count("preprocess: packed") == 1      # only rank 0 merges and reports


@pytest.mark.mpi
def test_a_rank_that_does_not_see_the_inputs_stops_every_rank(tree, tmp_path):
    # rank 1 started in another folder with a relative --train, as on a node where the
    # tree is not mounted: it skipped every image it was given and the pack ended with 0
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip(f"no mpiexec next to {sys.executable}; pip install mpich")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = preprocess_command("folder", "--train", "train", "--out", str(tmp_path / "out"), *PACK)
    run = subprocess.run([mpiexec, "-n", "1", "-wdir", str(tree), *command, ":",
                          "-n", "1", "-wdir", str(elsewhere), *command],
                         env=quiet_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("preprocess: rank 1: train/") and run.stderr.count("\n") == 1, run.stderr
    assert "is not there, though rank 0 listed it under --train" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.mpi
def test_a_rank_whose_node_refuses_the_flags_stops_every_rank(tree, tmp_path):
    # on rank 1's node --val is a link to --train (rank 1 starts in another folder): it
    # stopped before MPI, silently (only the launcher's rank 0 speaks), and rank 0 waited in
    # MPI_Init for ever
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip(f"no mpiexec next to {sys.executable}; pip install mpich")
    here, there = tmp_path / "here", tmp_path / "there"
    for folder in (here, there):
        folder.mkdir()
        (folder / "train").symlink_to(tree / "train")
    (here / "val").symlink_to(tree / "val")
    (there / "val").symlink_to(tree / "train")
    command = preprocess_command("folder", "--train", "train", "--val", "val", "--out", str(tmp_path / "out"), *PACK)
    proc = subprocess.Popen([mpiexec, "-n", "1", "-wdir", str(here), *command, ":",
                             "-n", "1", "-wdir", str(there), *command], env=quiet_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 2, err
    assert err == ("preprocess: rank 1: --val val is --train train: its images would be scored as unseen ones; "
                   "pass a held-out set as --val, or leave --val out\n"), err
    assert not (tmp_path / "out").exists()


def test_tasks_of_an_srun_that_mpi_does_not_join_refuse_to_pack(monkeypatch):
    # srun --mpi=none (or a plugin the MPI does not speak): each task would pack everything
    from preprocess.parallel import make_team
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")
    with pytest.raises(ValueError, match="srun started 3 tasks but MPI sees each as a world of 1"):
        make_team()
    assert make_team(1, 3).rank == 1     # array tasks (--rank/--size) are meant to be separate
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert make_team().size == 1


def train_sources(out):
    """The source names of every packed training image, read straight from the shards."""
    sources = []
    for name in sorted(os.listdir(out)):
        if name.startswith("train-"):
            with h5py.File(out / name, "r") as shard:
                sources += [s.decode() for s in shard["source"][()]]
    return sources


def test_a_symlink_up_the_tree_or_into_another_class_lists_no_image_twice(tree, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(tree / "train", train)
    first, second = sorted(os.listdir(train))[:2]
    (train / first / "up").symlink_to("..")                 # a loop: every class again, under `first`
    (train / first / "other").symlink_to(f"../{second}")    # another class's images, mislabelled
    outside = tmp_path / "elsewhere"                        # a folder kept on other storage: followed
    outside.mkdir()
    shutil.copy(next((train / second).iterdir()), outside / "extra.jpg")
    (train / first / "more").symlink_to(outside)
    out = tmp_path / "out"
    assert main(["folder", "--train", str(train), "--out", str(out)] + PACK) == 0
    sources = train_sources(out)
    assert len(sources) == 27 + 1 and f"{first}/more/extra.jpg" in sources
    assert not any("/up/" in s or "/other/" in s for s in sources), sources


def test_inputs_that_cannot_be_packed_are_refused_before_out_exists(tree, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(tree / "train", train)
    base = ["folder", "--train", str(train)] + PACK
    inside = train / "packed"
    assert main([*base, "--out", str(inside)]) == 2
    assert f"--out {inside} is inside --train {train}" in capsys.readouterr().err
    assert not inside.exists()
    out = tmp_path / "out"
    assert main([*base, "--out", str(out), "--seed", "-1"]) == 2
    assert "--seed -1: must be at least 0" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--val", str(tree / "val" / sorted(os.listdir(tree / "val"))[0])]) == 2
    assert "has no class subfolders" in capsys.readouterr().err
    assert not out.exists()


def test_val_given_as_the_train_folder_is_refused(tree, tmp_path, capsys):
    train = tree / "train"
    assert main(["folder", "--train", str(train), "--val", f"{train}/", "--out", str(tmp_path / "out")] + PACK) == 2
    assert capsys.readouterr().err == (f"preprocess: --val {train}/ is --train {train}: its images would be scored "
                                       f"as unseen ones; pass a held-out set as --val, or leave --val out\n")
    assert not (tmp_path / "out").exists()


def test_an_empty_class_folder_and_files_outside_the_class_folders_are_warned_of(tree, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(tree / "train", train)
    shutil.copy(next((train / sorted(os.listdir(train))[0]).iterdir()), train / "stray.jpg")
    (train / "zz-empty").mkdir()
    assert main(["folder", "--train", str(train), "--out", str(tmp_path / "out")] + PACK) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"preprocess: warning: {train} holds files outside any class folder, which are not packed: 1 "
        f"(e.g. 'stray.jpg')",
        f"preprocess: warning: --train {train}: classes without files, whose labels no training image will have: "
        f"1 of 4 (e.g. zz-empty)"]
    assert ShardedDataset(tmp_path / "out", "train").classes[-1] == "zz-empty"


def test_an_empty_tree_exits_1_and_leaves_nothing_that_blocks_the_fixed_command(tree, tmp_path, capsys):
    train = tmp_path / "train"
    for name in ("a", "b"):
        (train / name).mkdir(parents=True)
    argv = ["folder", "--train", str(train), "--out", str(tmp_path / "out")] + PACK
    assert main(argv) == 1
    assert "no train images found under --train" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    for name in ("a", "b"):
        for image in sorted((tree / "train").iterdir())[0].iterdir():
            shutil.copy(image, train / name / image.name)
    assert main(argv) == 0


def test_a_full_disk_while_merging_is_one_line_and_leaves_no_temporary_file(tree, tmp_path, monkeypatch, capsys):
    import preprocess.writer
    argv = ["folder", "--train", str(tree / "train"), "--out", str(tmp_path / "out")] + PACK
    replace = os.replace

    def full_at_the_mean_image(source, target):
        if target.endswith("mean_image.npy"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return replace(source, target)

    monkeypatch.setattr(preprocess.writer.os, "replace", full_at_the_mean_image)
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().endswith("No space left on device; free space or fix permissions there, "
                                                    "then run the same command again: the shards are kept")
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "out"))
    monkeypatch.setattr(preprocess.writer.os, "replace", replace)
    assert main(argv) == 0 and main(["verify", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("shard", ["train-00001.h5", "val-00000.h5"])
def test_a_shard_damaged_before_a_re_run_is_named(tree, tmp_path, capsys, shard):
    argv = ["folder", "--train", str(tree / "train"), "--val", str(tree / "val"), "--out", str(tmp_path / "out")] + PACK
    assert main(argv) == 0
    path = tmp_path / "out" / shard
    os.truncate(path, 1000)
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(path) in error[0] and "delete it and run the same command again" in error[0]


def test_a_file_name_that_is_not_utf8_is_packed_under_an_escaped_name(tree, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(tree / "train", train)
    folder = train / sorted(os.listdir(train))[0]
    shutil.copy(next(folder.iterdir()), os.path.join(os.fsencode(folder), b"latin-1 caf\xe9.jpg"))
    out = tmp_path / "out"
    assert main(["folder", "--train", str(train), "--out", str(out)] + PACK) == 0
    sources = train_sources(out)
    assert f"{folder.name}/latin-1 caf\\xe9.jpg" in sources and len(sources) == 28


def test_a_class_folder_name_that_is_not_utf8_is_packed_under_an_escaped_name(tree, tmp_path):
    # it was a traceback writing the first shard, after plan.json had locked --out to it
    root = tmp_path / "data"
    shutil.copytree(tree, root)
    for split in ("train", "val"):
        first = root / split / sorted(os.listdir(root / split))[0]
        os.rename(first, os.path.join(os.fsencode(root / split), b"caf\xe9"))
    out = tmp_path / "out"
    assert main(["folder", "--train", str(root / "train"), "--val", str(root / "val"), "--out", str(out)] + PACK) == 0
    index = json.loads((out / "dataset.json").read_text())
    assert index["classes"][0] == "caf\\xe9" and index["splits"]["train"]["num_images"] == 27
    assert sum(s.startswith("caf\\xe9/") for s in train_sources(out)) == 9
    assert ShardedDataset(out, "val").labels.tolist().count(0) == 2   # val's folder of that name: label 0 too


@pytest.mark.parametrize("name", ["two\nlines", "tab\there", "bell\a", "nel\x85here", "line\u2028separator"])
def test_a_class_folder_name_with_a_control_character_is_refused(tmp_path, capsys, name):
    # the class list written beside exported weights holds one name a line
    train = tmp_path / "train"
    for folder in ("fine", name):
        (train / folder).mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(train / folder / "a.png")
    out = tmp_path / "out"
    assert main(["folder", "--train", str(train), "--out", str(out)] + PACK) == 2
    assert capsys.readouterr().err == (f"preprocess: {train}: class folder {name!r} has a line break or another "
                                       f"control character in its name, which a class list cannot hold; rename it\n")
    assert not out.exists()


def test_a_skipped_name_with_a_tab_or_line_break_keeps_its_row(tmp_path):
    train = tmp_path / "train" / "a"
    train.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(train / "good.png")
    (train / "bad\tname\n.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["folder", "--train", str(tmp_path / "train"), "--out", str(out)] + PACK) == 0
    rows = (out / "skipped.tsv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split("\t")[:2] == ["train", "a/bad\\tname\\n.jpg"], rows


def skipped_rows(out):
    return [line.split("\t") for line in (out / "skipped.tsv").read_text().splitlines()[1:]]


def test_an_unreadable_folder_is_skipped_and_listed_and_an_unreadable_train_root_is_one_line(tree, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(tree / "train", train)
    first, second = sorted(os.listdir(train))[:2]
    (train / first / "sub").mkdir()
    shutil.copy(next((train / first).iterdir()), train / first / "sub" / "more.jpg")
    out, refused = tmp_path / "out", tmp_path / "refused"
    try:
        for folder in (train / first / "sub", train / second):
            folder.chmod(0)
        packed = subprocess.run(as_an_ordinary_user(preprocess_command("folder", "--train", str(train), "--out",
                                                                       str(out), *PACK)),
                                env=quiet_env(), capture_output=True, text=True, timeout=120)
        train.chmod(0)
        root = subprocess.run(as_an_ordinary_user(preprocess_command("folder", "--train", str(train), "--out",
                                                                     str(refused), *PACK)),
                              env=quiet_env(), capture_output=True, text=True, timeout=120)
    finally:
        for folder in (train, train / first / "sub", train / second):
            folder.chmod(0o755)
    # os.walk passed over both in silence: 9 images gone, exit 0, nothing in skipped.tsv
    assert packed.returncode == 0, packed.stderr
    why = "unreadable folder: Permission denied; its files were not listed"
    assert skipped_rows(out) == [["train", f"{first}/sub/", why], ["train", f"{second}/", why]]
    assert json.loads((out / "dataset.json").read_text())["splits"]["train"]["num_images"] == 18
    assert root.returncode == 2 and root.stderr == (f"preprocess: {train} cannot be listed (Permission denied); "
                                                    f"make it readable (chmod u+rx) or pass another folder\n")
    assert not refused.exists()


def test_a_fifo_named_like_an_image_is_skipped_and_listed_and_a_link_to_an_image_packed(tree, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(tree / "train", train)
    folder = train / sorted(os.listdir(train))[0]
    os.mkfifo(folder / "x.jpg")                           # opening it waited forever for a writer
    (folder / "link.jpg").symlink_to(next(folder.glob("*_00000.jpg")))
    out = tmp_path / "out"
    run = subprocess.run(preprocess_command("folder", "--train", str(train), "--out", str(out), *PACK),
                         env=quiet_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert skipped_rows(out) == [["train", f"{folder.name}/x.jpg", "not a regular file (a FIFO)"]]
    assert f"{folder.name}/link.jpg" in train_sources(out) and len(train_sources(out)) == 28
