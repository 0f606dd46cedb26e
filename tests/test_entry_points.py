"""The small entry points as users run them: models, evaluate, plot, bench."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mpiconvnet import checkpoint
from tests.data_fixtures import write_tiny_dataset
from tests.test_bench_stops import kill_group
from tests.test_train import MPIEXEC, needs_mpiexec

ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = write_tiny_dataset(str(root / "shards"), 48, 20, 4, 64, shard_size=16)
    result = run("mpiconvnet.train", "--data", data, "--out", str(root / "run"), "--model", "alexnet-mini",
                 "--global-batch", "16", "--epochs", "2", "--workers", "0", "--progress", "false", "--log-every", "1")
    assert result.returncode == 0, result.stderr
    return data, str(root / "run")


def test_models_lists_every_model_with_its_parameter_count():
    result = run("mpiconvnet.models")
    assert result.returncode == 0
    assert "alexnet-owt" in result.stdout and "61,100,840" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["mpiconvnet.evaluate", "--data", "x"], "python -m mpiconvnet.evaluate: the following arguments are required: "
                                             "--checkpoint (see --help)"),
    (["mpiconvnet.plot"], "python -m mpiconvnet.plot: the following arguments are required: run_dir (see --help)"),
    (["mpiconvnet.export", "--checkpoint", "x", "--out", "y.npz", "--names", "tv"],
     "python -m mpiconvnet.export: argument --names: invalid choice: 'tv'"),
    (["preprocess", "folder", "--train"], "python -m preprocess folder: argument --train: expected one argument"),
    (["mpiconvnet.bench", "step", "--batch", "0"], "python -m mpiconvnet.bench step: argument --batch: must be at "
                                                   "least 1, got 0 (see --help)"),
])
def test_a_bad_flag_of_any_entry_point_is_one_line_and_exit_2(args, message):
    # argparse printed its whole usage block (5-10 lines) before the line that matters
    result = run(*args)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and not result.stdout


def test_evaluate_prints_json_for_a_run_directory(trained):
    data, run_dir = trained
    result = run("mpiconvnet.evaluate", "--data", data, "--checkpoint", run_dir, "--json", "--crops", "10")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["images"] == 20 and scores["crops"] == 10 and 0 <= scores["top1"] <= scores["top5"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/nonexistent.h5"], "--checkpoint /nonexistent.h5: no such file or directory"),
    (["--data", "SMALL"], "images are 48px, model alexnet-mini crops 56px"),
    (["--batch", "0"], "--batch 0 must be at least 1"),
    (["--workers", "-1"], "--workers -1 must be at least 0"),
    (["--threads", "0"], "--threads 0 must be at least 1"),
    (["--checkpoint", "NPZ"], "NPZ is not a checkpoint (an HDF5 file written by python -m mpiconvnet.train); give a "
                              "checkpoint file or a run directory (an .npz of weights starts a new run with train "
                              "--init-weights)"),
])
def test_evaluate_bad_input_is_one_line_and_exit_2(trained, tmp_path, args, message):
    data, run_dir = trained
    if "SMALL" in args:
        args = [write_tiny_dataset(str(tmp_path / "small"), 8, 8, 4, 48) if a == "SMALL" else a for a in args]
    if "NPZ" in args:
        np.savez(tmp_path / "w.npz", **checkpoint.load(checkpoint.find_checkpoint(run_dir))[0])
        args, message = [str(tmp_path / "w.npz") if a == "NPZ" else a for a in args], \
            message.replace("NPZ", f"--checkpoint {tmp_path / 'w.npz'}")
    result = run("mpiconvnet.evaluate", "--data", data, "--checkpoint", run_dir, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_names_a_shard_truncated_after_packing(trained, tmp_path):
    _, run_dir = trained
    data = write_tiny_dataset(str(tmp_path / "shards"), 48, 20, 4, 64, shard_size=16)
    path = os.path.join(data, "val-00001.h5")
    os.truncate(path, os.path.getsize(path) // 2)
    result = run("mpiconvnet.evaluate", "--data", data, "--checkpoint", run_dir)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mpiconvnet.evaluate: rank 0: {path} is not a readable"), \
        result.stderr


def test_evaluate_refuses_a_data_set_with_other_classes(trained, tmp_path):
    _, run_dir = trained
    other = write_tiny_dataset(str(tmp_path / "other"), 16, 8, 7, 64)
    result = run("mpiconvnet.evaluate", "--data", other, "--checkpoint", run_dir)
    assert result.returncode == 2 and "has 7 classes" in result.stderr and "trained on 4" in result.stderr


def copy_checkpoint(run_dir, out, change):
    """A copy of run_dir's newest checkpoint in a new run directory `out`, its meta changed
    by `change` (as a checkpoint of another version or another run would hold it)."""
    params, velocity, meta = checkpoint.load(checkpoint.find_checkpoint(run_dir))
    change(meta)
    return checkpoint.save(out, meta["step"], params, velocity, meta, keep=1)


def test_evaluate_refuses_the_classes_in_another_order_unless_the_checkpoint_predates_the_list(trained, tmp_path):
    data, run_dir = trained
    classes = [f"n{c:08d}" for c in range(4)]
    other = write_tiny_dataset(str(tmp_path / "other"), 48, 20, 4, 64, shard_size=16, classes=classes[::-1])
    result = run("mpiconvnet.evaluate", "--data", other, "--checkpoint", run_dir)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"mpiconvnet.evaluate: {other} has other classes than checkpoint {checkpoint.find_checkpoint(run_dir)} was "
        f"trained on: label 0 is n00000003 there, n00000000 in the checkpoint; evaluate on the data set it was "
        f"trained on")
    # written before checkpoints recorded the list: loads, and is not checked
    copy_checkpoint(run_dir, tmp_path / "old", lambda meta: meta.pop("classes"))
    result = run("mpiconvnet.evaluate", "--data", other, "--checkpoint", str(tmp_path / "old"))
    assert result.returncode == 0, result.stderr


def test_evaluate_takes_the_run_s_crops_and_its_checkpoints_folder(trained, tmp_path):
    data, run_dir = trained
    path = copy_checkpoint(run_dir, tmp_path / "ten", lambda meta: meta["config"].update(eval_crops=10))
    result = run("mpiconvnet.evaluate", "--data", data, "--checkpoint", os.path.dirname(path), "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["crops"] == 10 and scores["checkpoint"] == path
    result = run("mpiconvnet.evaluate", "--data", data, "--checkpoint", run_dir)
    assert result.returncode == 0 and "1 crop)" in result.stdout, result.stderr
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:   # the run's own number
        last = [json.loads(line) for line in f if '"eval"' in line][-1]
    assert f"top-1 {last['top1']:.4f}" in result.stdout


@needs_mpiexec
@pytest.mark.mpi
def test_evaluate_set_up_errors_under_mpi_are_said_once(trained, tmp_path):
    data, run_dir = trained
    no_val = write_tiny_dataset(str(tmp_path / "noval"), 16, 0, 4, 64)
    other = write_tiny_dataset(str(tmp_path / "other"), 16, 8, 7, 64)
    np.savez(tmp_path / "w.npz", a=np.zeros(2))
    for args in (["--data", other, "--checkpoint", run_dir], ["--data", no_val, "--checkpoint", run_dir],
                 ["--data", data, "--checkpoint", str(tmp_path / "w.npz")]):
        result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpiconvnet.evaluate", *args], env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mpiconvnet.evaluate: ") and \
            lines[0].count("mpiconvnet.evaluate:") == 1, result.stderr


@needs_mpiexec
@pytest.mark.mpi
@pytest.mark.parametrize("command, said", [
    (["mpiconvnet.evaluate", "--data", "d", "--checkpoint", "c", "--batch", "0"], "--batch 0"),
    (["mpiconvnet.evaluate", "--data", "d", "--checkpoint", "c", "--no-such-flag"], "--no-such-flag"),
    (["preprocess", "folder", "--train", "t", "--out", "o", "--image-size", "0"], "--image-size 0"),
    (["preprocess", "folder", "--train", "t", "--out", "o", "--no-such-flag"], "--no-such-flag"),
    (["mpiconvnet.train", "--data", "d", "--no-such-flag"], "--no-such-flag")])
def test_a_bad_flag_under_mpiexec_is_said_once_by_every_entry_point(command, said, tmp_path):
    # every rank has the same flags: each said the same line
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", *command], env=ENV, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and said in result.stderr, result.stderr


@needs_mpiexec
@pytest.mark.mpi
def test_evaluate_names_the_one_rank_that_cannot_read_the_data(trained, tmp_path):
    # rank 1's node without the data (MPMD: each rank its own --data): its line was lost
    data, run_dir = trained
    rank = [sys.executable, "-m", "mpiconvnet.evaluate", "--checkpoint", run_dir, "--workers", "0", "--data"]
    result = subprocess.run([MPIEXEC, "-n", "1", *rank, data, ":", "-n", "1", *rank, str(tmp_path / "missing")],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"mpiconvnet.evaluate: rank 1: {tmp_path / 'missing'}/dataset.json not found")
    assert result.stderr.count("\n") == 1, result.stderr


@needs_mpiexec
@pytest.mark.mpi
def test_evaluate_names_the_one_rank_that_cannot_read_the_checkpoint(trained, tmp_path):
    # read before MPI starts; rank 1's node without the checkpoint: only the launcher's
    # rank 0 spoke, and it had nothing to say
    data, run_dir = trained
    rank = [sys.executable, "-m", "mpiconvnet.evaluate", "--data", data, "--workers", "0", "--checkpoint"]
    missing = tmp_path / "missing"
    result = subprocess.run([MPIEXEC, "-n", "1", *rank, run_dir, ":", "-n", "1", *rank, str(missing)],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"mpiconvnet.evaluate: rank 1: --checkpoint {missing}: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_evaluate_stopped_by_sigterm_says_so_in_one_line_and_exits_130(trained):
    data, run_dir = trained
    # the SIGTERM arrives while it evaluates, as scancel's or a time limit's would
    stop = ("import os, signal, sys, time\nfrom mpiconvnet import evaluate\n"
            "def scancel(*args, **kwargs):\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(60)\n"
            "evaluate.evaluate = scancel\nsys.exit(evaluate.main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", stop, "--data", data, "--checkpoint", run_dir], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and result.stderr.strip() == "mpiconvnet.evaluate: interrupted", result.stderr


def test_plot_writes_a_png(trained, tmp_path):
    _, run_dir = trained
    out = tmp_path / "plot.png"
    result = run("mpiconvnet.plot", run_dir, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_on_a_full_disk_is_one_line_and_leaves_nothing(trained, tmp_path):
    _, run_dir = trained
    out = tmp_path / "plot.png"
    (tmp_path / "plot.png.tmp.png").symlink_to("/dev/full")   # the kernel's real ENOSPC
    result = run("mpiconvnet.plot", run_dir, "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"mpiconvnet.plot: cannot write {out}: No space left on device; free space or "
                                     f"fix permissions there, or give another --out")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, start", [("a.pdf", b"%PDF"), ("a.SVG", b"<?xml"), ("a.jpg", b"\xff\xd8\xff")])
def test_plot_writes_the_format_its_suffix_names(trained, tmp_path, name, start):
    _, run_dir = trained
    result = run("mpiconvnet.plot", run_dir, "--out", str(tmp_path / name))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / name).read_bytes().startswith(start) and os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("out, message", [
    ("", "--out is empty; give an image path (.png, .pdf, .svg or .jpg), or leave --out out for "
         "RUN_DIR/training.png"),
    ("METRICS", "metrics.jsonl: .jsonl is not a format plot writes; give a path ending in .png, .pdf, .svg or .jpg"),
    ("a.gif", "a.gif: .gif is not a format plot writes"),
    ("FIFO", "fifo.png exists and is not a regular file (a link, a device, a pipe, a folder); give a file name"),
    ("LINK", "link.png exists and is not a regular file"),
    ("nodir/a.png", "a.png: No such file or directory; create the folder TMP/nodir first (mkdir -p), or give "
                    "another --out"),
])
def test_plot_refuses_an_out_it_must_not_write_in_one_line(trained, tmp_path, out, message):
    _, run_dir = trained
    metrics = os.path.join(run_dir, "metrics.jsonl")
    before = open(metrics, "rb").read()
    if out == "FIFO":
        os.mkfifo(tmp_path / "fifo.png")
    if out == "LINK":   # replacing the link would not write where it points
        (tmp_path / "link.png").symlink_to(tmp_path / "target.png")
    out = {"METRICS": metrics, "FIFO": str(tmp_path / "fifo.png"), "LINK": str(tmp_path / "link.png"),
           "": ""}.get(out, str(tmp_path / out))
    result = run("mpiconvnet.plot", run_dir, "--out", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message.replace("TMP", str(tmp_path)) in lines[0], result.stderr
    assert sorted(os.listdir(tmp_path)) == sorted({"FIFO": ["fifo.png"], "LINK": ["link.png"]}.get(
        os.path.basename(out).split(".")[0].upper(), []))
    assert open(metrics, "rb").read() == before and not os.path.exists(os.path.join(run_dir, "training.png"))


def test_plot_as_several_mpi_ranks_refuses_without_starting_mpi(trained, tmp_path):
    _, run_dir = trained
    out = str(tmp_path / "a.png")
    for rank, said in (("0", "mpiconvnet.plot: started as 2 MPI ranks, which would all write the same --out; run "
                             "it as one process, without mpiexec/srun -n 2"), ("1", "")):
        result = subprocess.run([sys.executable, "-m", "mpiconvnet.plot", run_dir, "--out", out],
                                env=dict(ENV, PMI_SIZE="2", PMI_RANK=rank), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.strip() == said
    assert os.listdir(tmp_path) == []


def test_plot_names_a_directory_without_metrics(tmp_path):
    result = run("mpiconvnet.plot", str(tmp_path))
    assert result.returncode == 2 and f"{tmp_path}/metrics.jsonl not found" in result.stderr
    (tmp_path / "metrics.jsonl").write_text("")
    result = run("mpiconvnet.plot", str(tmp_path))
    assert result.returncode == 2 and "metrics.jsonl holds no records yet" in result.stderr
    assert not (tmp_path / "training.png").exists()


def test_bench_lists_the_benchmarks_and_refuses_an_unknown_one():
    listing = run("mpiconvnet.bench", "--help")
    assert listing.returncode == 0
    for name in ("step", "allreduce", "scaling", "loader", "preprocess", "ops"):
        assert name in listing.stdout
    unknown = run("mpiconvnet.bench", "nope")
    assert unknown.returncode == 2 and "unknown benchmark 'nope'" in unknown.stderr


def test_bench_loader_divides_each_row_by_the_copy_into_the_same_destination():
    result = run("mpiconvnet.bench", "loader", "--images", "256", "--shard-size", "128", "--batch", "16",
                 "--batches", "12", "--workers", "0,1", "--pool", "64", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    rows = {line[:28].strip(): line.split() for line in result.stdout.splitlines()}
    assert rows["loader workers=0"][-3:-1] == ["one", "buffer"]   # in-process: one private slot
    assert rows["loader workers=1"][-2] == "ring"              # a worker: the shared ring
    for name in ("loader workers=0", "loader workers=1", "copy bound, ring of 3", "copy bound, one buffer"):
        assert float(rows[name][-1]) > 0, result.stdout
    assert "ratio (best loader images/s per worker process / copy bound into its ring of 3)" in result.stdout


def test_bench_input_times_the_three_loops_against_the_resident_batch():
    result = run("mpiconvnet.bench", "input", "--model", "alexnet-mini", "--batch", "4", "--size", "72",
                 "--images", "40", "--workers", "1", "--skip", "1", "--rounds", "1", "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.startswith(("resident ", "model_input ", "device_batches "))}
    assert sorted(rows) == ["device_batches", "model_input", "resident"], result.stdout
    assert rows["resident"][-1] == "1.00" and all(float(row[0]) > 0 and len(row) == 4 for row in rows.values())
    assert "ratio device_batches / resident:" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1])["device_batches_images_per_s"] > 0
    too_few = run("mpiconvnet.bench", "input", "--model", "alexnet-mini", "--batch", "4", "--size", "72",
                  "--images", "16", "--workers", "0", "--rounds", "1")
    assert too_few.returncode == 2 and "--images 16 at --batch 4 make 4 full batches; --skip 4, 3 timed steps and " \
                                       "an untimed last one need 8: raise --images to 32" in too_few.stderr
    assert too_few.stdout == ""   # refused before the set is written


def test_bench_input_does_not_time_the_loaders_close_at_the_epochs_end(monkeypatch):
    # device_batches reads a batch ahead, so the loader closes (joining its workers, ~20 ms
    # with 8 on an H200 node) before it hands out the last batch: that close was charged to
    # its steps alone, and the step fed by the loader read 0.79-0.87 of a resident one
    import types
    import time
    from mpiconvnet.bench import input as bench_input
    from mpiconvnet.data import loader as loader_module
    closing_s, steps, skip, batch_size = 0.3, 8, 2, 4

    class SlowClosingLoader:
        time_waiting = 0.0

        def __init__(self, root, **kwargs):
            self.closed = False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __len__(self):
            return steps

        def __iter__(self):
            for step in range(steps):
                yield types.SimpleNamespace(labels=np.zeros(batch_size, np.int64), step=step)
            time.sleep(closing_s)   # the loader's close, when asked for a batch past the last

        def model_input(self, batch, ops):
            return batch.step

        def device_batches(self, ops):
            ahead = None
            for batch in self:
                if ahead is not None:
                    yield ahead, ahead.step
                ahead = batch
            yield ahead, ahead.step

    monkeypatch.setattr(loader_module, "BatchLoader", SlowClosingLoader)
    net = types.SimpleNamespace(ops=types.SimpleNamespace(synchronize=lambda: None), input_size=8)
    args = types.SimpleNamespace(batch=batch_size, skip=skip, workers=0)
    for kind in ("resident", "model_input", "device_batches"):
        images, seconds, _ = bench_input.run_loop(kind, "unused", net, lambda x, labels: None, args)
        assert images == (steps - 1 - skip) * batch_size, kind
        assert seconds < closing_s, f"{kind}: the loader's close was timed ({seconds:.2f} s)"


def test_bench_step_on_cuda_without_pycuda_is_one_line_and_exit_2():
    try:
        import pycuda  # noqa: F401
        pytest.skip("pycuda is installed here: the missing-pycuda message cannot show")
    except ImportError:
        pass
    result = run("mpiconvnet.bench", "step", "--model", "alexnet-mini", "--batch", "4", "--backend", "cuda",
                 "--steps", "1", "--no-torch")
    assert result.returncode == 2 and result.stderr.strip().startswith("bench step: --backend cuda needs pycuda")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bench_preprocess_reports_both_pipelines_and_the_scaling():
    result = run("mpiconvnet.bench", "preprocess", "--images", "40", "--repeats", "1", "--shard-size", "10")
    assert result.returncode == 0, result.stderr
    rows = {line[:22].strip(): line[22:].split() for line in result.stdout.splitlines()
            if line.startswith(("naive Pillow", "ours, "))}
    assert sorted(rows) == ["naive Pillow, 1 core", "ours, 1 worker(s)", "ours, 2 worker(s)"], result.stdout
    assert rows["naive Pillow, 1 core"][3] == "1.00" and all(len(row) == 7 for row in rows.values())
    assert "speed-up 1 -> 2 workers (wall):" in result.stdout and "cores were busy" in result.stdout
    assert "target ours/naive per core >= 1.5 (wall, 1 worker):" in result.stdout


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")),
                    reason="no mpiexec next to this Python")
def test_bench_scaling_reports_the_ratio_and_the_control_without_communication():
    result = run("mpiconvnet.bench", "scaling", "--batch", "4", "--steps", "2", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2", "2"] and rows[2][-3:] == ["control:", "no", "communication"]
    assert "per-rank throughput at 2 ranks / 1 rank:" in result.stdout
    assert "the machine's own bound (2 ranks without communication / 1 rank):" in result.stdout


def test_bench_step_runs_a_tiny_model():
    result = run("mpiconvnet.bench", "step", "--model", "alexnet-mini", "--batch", "4", "--threads", "1",
                 "--steps", "1", "--warmup", "0", "--no-torch", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["ours_images_per_s"] > 0


def test_bench_step_host_profile_names_our_functions_and_profile_needs_cuda():
    result = run("mpiconvnet.bench", "step", "--model", "alexnet-mini", "--batch", "2", "--threads", "1",
                 "--steps", "1", "--warmup", "0", "--no-torch", "--host-profile")
    assert result.returncode == 0, result.stderr
    assert "host time of our step by function" in result.stdout and "mpiconvnet/backends/numpy_ops" in result.stdout
    refused = run("mpiconvnet.bench", "step", "--profile", "--no-torch")
    assert refused.returncode == 2 and "use it with --backend cuda" in refused.stderr


def test_bench_checkpoint_compares_ours_with_hdf5_writing_itself(tmp_path):
    result = run("mpiconvnet.bench", "checkpoint", "--model", "alexnet-mini", "--repeats", "1", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "HDF5 writes itself" in result.stdout and "ratio ours / HDF5:" in result.stdout
    assert os.listdir(tmp_path) == []   # its files are removed


@pytest.mark.parametrize("args, message", [
    (["step", "--model", "nope"], "argument --model: invalid choice: 'nope'"),
    (["step", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["step", "--steps", "-1"], "argument --steps: must be at least 1, got -1"),
    (["input", "--rounds", "0"], "argument --rounds: must be at least 1"),
    (["input", "--data", "/nonexistent"], "argument --data: /nonexistent is not an existing directory"),
    (["loader", "--workers", "1,x"], "argument --workers: expects comma-separated whole numbers of at least 0"),
    (["checkpoint", "--dir", "/nonexistent"], "argument --dir: /nonexistent is not an existing directory"),
    (["ops", "--repeat", "0"], "argument --repeat: must be at least 1"),
    (["scaling", "--ranks", "1"], "argument --ranks: must be at least 2"),
    (["allreduce", "--bucket-mb", "nan"], "argument --bucket-mb: must be at least"),
    (["allreduce", "--backward-ms", "inf"], "argument --backward-ms: must be a finite number"),
    (["scaling", "--average-every", "4"], "--average-every 4 applies to --sync params only"),
    (["preprocess", "--workers", "0"], "argument --workers: expects comma-separated whole numbers of at least 1"),
    # values that pass argparse but not each other: refused before a set is written
    (["loader", "--images", "256", "--size", "64", "--crop", "100"], "--crop 100 is larger than the 64px images of --size"),
    (["loader", "--images", "256", "--size", "64", "--crop", "56", "--batch", "8", "--pool", "4"],
     "--batch 8 is more than the 4 images of --pool"),
    (["loader", "--images", "4", "--size", "64", "--crop", "56", "--batch", "8"], "--batch 8 is more than the 4 images of --images"),
    (["loader", "--images", "8192", "--size", "64", "--crop", "56"], "--images 8192: the synthetic set holds at most 4096"),
    (["loader", "--images", "256", "--size", "64", "--crop", "56", "--batch", "8", "--batches", "8", "--workers", "0,1"],
     "--batches 8: the loader with --workers 1 has 3 batch slots (max(--prefetch, workers) + 1), and times at least "
     "4 batches per slot after one untimed per slot: raise --batches to 12"),
    (["loader", "--images", "256", "--size", "64", "--crop", "56", "--batch", "32", "--workers", "0,1"],
     "256 images make 8 batches of --batch 32; the loader with --workers 1 skips 3 (one per batch slot) and times "
     "at least 12: raise --images to 480"),
    (["input", "--model", "alexnet-mini", "--size", "32", "--batch", "8", "--images", "96"],
     "--size 32: model alexnet-mini crops 56px; raise --size to 56 or more"),
    (["input", "--model", "alexnet-mini", "--size", "64", "--batch", "100000000", "--images", "10"],
     "--images 10 at --batch 100000000 make 0 full batches; --skip 4, 3 timed steps and an untimed last one need 8: "
     "lower --batch to 1"),
    (["input", "--skip", "0"], "argument --skip: must be at least 1, got 0"),
    (["input", "--tf32"], "--tf32 is a mode of the GPU's tensor cores: use it with --backend cuda"),
    (["step", "--tf32"], "--tf32 is a mode of the GPU's tensor cores: use it with --backend cuda"),
    (["step", "--threads", "100000"], "argument --threads: must be at most"),
    (["ops", "--clock", "cpu", "--threads", "2"], "--clock cpu adds up the CPU time of all 2 threads"),
    (["checkpoint", "--model", "alexnet-mini", "--dir", "/proc"], "cannot make a folder in --dir /proc"),
])
def test_bench_bad_values_are_refused_before_anything_runs(args, message):
    result = run("mpiconvnet.bench", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_bench_data_that_is_no_packed_set_is_one_line(tmp_path):
    result = run("mpiconvnet.bench", "loader", "--data", str(tmp_path), "--repeats", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"mpiconvnet.bench loader: {tmp_path}/dataset.json not found; pack the data " \
                                    f"first with python -m preprocess folder|imagenet (synth makes images to pack)"


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")),
                    reason="no mpiexec next to this Python")
def test_bench_killed_by_sigterm_takes_its_mpi_ranks_with_it():
    # a job's time limit or kill: mpiexec and its ranks must not run on, orphaned. The
    # repeat count marks this test's processes (another test run may share the machine),
    # and they run in a process group of their own, which the test kills whatever happens
    import signal
    import time
    marker = f"--repeats {10**6 + os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-m", "mpiconvnet.bench", "allreduce", "--model", "alexnet-mini",
                             *marker.split()], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _ranks_running(marker):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while _ranks_running(marker, at_least=1) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _ranks_running(marker, at_least=1)
    finally:
        kill_group(proc)


def _ranks_running(marker, at_least=3):
    """Whether at_least processes of the run are up (3: the driver, mpiexec and a rank, or more)."""
    found = subprocess.run(["pgrep", "-f", f"mpiconvnet.bench allreduce .*{marker}"], capture_output=True, text=True)
    return len(found.stdout.split()) >= at_least


def test_bench_tells_an_mpi_rank_from_a_shell_inside_an_allocation():
    # sbatch and salloc shells have SLURM_NTASKS: there the benchmarks still start mpiexec
    from mpiconvnet.bench._launch import is_mpi_rank
    assert not is_mpi_rank({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) and not is_mpi_rank({})
    assert is_mpi_rank({"PMI_RANK": "1", "PMI_SIZE": "2"}) and is_mpi_rank({"OMPI_COMM_WORLD_SIZE": "2"})


@pytest.mark.parametrize("bench", ["allreduce", "scaling"])
def test_bench_in_a_task_of_an_srun_that_mpi_does_not_join_is_refused(bench):
    # srun --mpi=none -n 2: each task, a plain process, would start its own mpiexec and its own runs
    env = {key: value for key, value in ENV.items() if key not in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1")
    result = subprocess.run([sys.executable, "-m", "mpiconvnet.bench", bench, "--model", "alexnet-mini"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpiconvnet.bench: srun started 2 tasks but MPI sees each as a "
                                                   "world of 1") and "run the benchmark as one task" in lines[0]
    assert "running:" not in result.stdout   # no mpiexec was started


@pytest.mark.parametrize("command, said", [
    (["mpiconvnet.train", "--data", "d", "--no-such-flag"], "mpiconvnet.train: unknown flag --no-such-flag"),
    (["mpiconvnet.evaluate", "--data", "d", "--checkpoint", "/nonexistent"], "mpiconvnet.evaluate: --checkpoint "
                                                                             "/nonexistent: no such file")])
def test_a_failure_before_mpi_in_tasks_of_an_srun_that_mpi_does_not_join_is_said_once(command, said):
    # srun --mpi=none -n 2 with a bad flag (or a checkpoint no node has): each task, a world of
    # one, said the srun line instead, N times, and the flag was never named; task 0 says it
    env = {key: value for key, value in ENV.items() if key not in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    said_by = []
    for task in ("0", "1"):
        env.update(SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_PROCID=task)
        result = subprocess.run([sys.executable, "-m", *command], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        said_by.append(result.stderr)
    assert said_by[0].startswith(said) and said_by[0].count("\n") == 1 and said_by[1] == "", said_by


def test_bench_allreduce_hidden_share_stays_between_none_and_all():
    from mpiconvnet.bench.allreduce import hidden_share
    assert hidden_share(10.0, 10.5, 2.0) == pytest.approx(0.75)
    assert hidden_share(10.0, 9.0, 2.0) == 1.0          # faster with the reduction: noise, all hidden
    assert hidden_share(1.5e-3, 2.2e-3, 2e-5) == 0.0   # printed as -3027 % before
