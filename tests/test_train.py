"""python -m mpiconvnet.train as users run it: one process and mpiexec -n 2, resume,
signals, failures, bad input. Every run is a subprocess, so MPI starts fresh each time."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from mpiconvnet.data.shards import ShardedDataset
from mpiconvnet.models import build_model
from tests.data_fixtures import decode_index, write_tiny_dataset
from tests.test_metrics_checkpoint import overwrite, rewrite_meta

PYTHON = sys.executable
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason=f"no mpiexec next to {sys.executable}")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TINY = ["--model", "alexnet-mini", "--workers", "0", "--progress", "false", "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 61 validation images: divides by neither 2 nor 3 ranks
    return write_tiny_dataset(str(tmp_path_factory.mktemp("shards")), 96, 61, 5, 64, shard_size=20)


def note_sampled_images(folder):
    """Patch source for train(patch=...): each rank appends to FOLDER/images-RANK a line for
    every batch its sampler hands out, the epoch and then the image indices; `rank` is set."""
    return f"""
import os
from mpiconvnet.data import sampler
rank = os.environ["PMI_RANK"]
indices_for_step = sampler.DistributedSampler.indices_for_step
def noted(self, step):
    indices = indices_for_step(self, step)
    with open(os.path.join({str(folder)!r}, "images-" + rank), "a") as f:
        f.write(" ".join(map(str, [self.epoch, *indices])) + "\\n")
    return indices
sampler.DistributedSampler.indices_for_step = noted
"""


def train(args, ranks=1, timeout=120, check=True, env=None, patch=None):
    """patch: Python source each rank runs before the trainer, to make something happen at
    a chosen moment of the run."""
    entry = ["-m", "mpiconvnet.train"] if patch is None else [
        "-c", patch + "\nimport sys\nfrom mpiconvnet import train\nsys.exit(train.main(sys.argv[1:]))\n"]
    command = ([MPIEXEC, "-n", str(ranks)] if ranks > 1 else []) + [PYTHON] + entry + TINY + args
    result = subprocess.run(command, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def params_at(run, step):
    with h5py.File(os.path.join(run, "checkpoints", f"ckpt-{step:08d}.h5"), "r") as f:
        return {k: f["params"][k][()] for k in f["params"]}, {k: f["velocity"][k][()] for k in f["velocity"]}


def assert_same_state(run, expected_run, step, rtol=1e-12, atol=1e-14):
    """The weights and momentum in two runs' checkpoints of `step` agree to the tolerance."""
    (params, velocity), (expected, expected_velocity) = params_at(run, step), params_at(expected_run, step)
    for name in expected:
        np.testing.assert_allclose(params[name], expected[name], rtol=rtol, atol=atol, err_msg=name)
        np.testing.assert_allclose(velocity[name], expected_velocity[name], rtol=rtol, atol=atol, err_msg=name)


def evaluations(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval"]


@pytest.mark.mpi
@needs_mpiexec
def test_two_ranks_equal_one_rank_with_the_same_global_batch(data, tmp_path):
    # synchronous SGD is the same maths: same samples, same dropout masks, averaged gradients
    args = ["--data", data, "--global-batch", "8", "--dtype", "float64", "--lr", "0.05", "--checkpoint-every", "1"]
    train(args + ["--out", str(tmp_path / "one"), "--max-steps", "4"])
    train(args + ["--out", str(tmp_path / "two"), "--max-steps", "4"], ranks=2)
    one, _ = params_at(tmp_path / "one", 4)
    two, _ = params_at(tmp_path / "two", 4)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-12, atol=1e-14, err_msg=name)
    earlier, _ = params_at(tmp_path / "one", 2)   # the steps moved the weights: not a comparison of inits
    assert any(np.abs(one[name] - earlier[name]).max() > 0 for name in one)
    # the logged loss is the global batch's mean either way, and images/s counts the global
    # batch: a line's images over the wall time since the line before it
    lines = {}
    for run in ("one", "two"):
        with open(tmp_path / run / "metrics.jsonl") as f:
            lines[run] = [r for r in map(json.loads, f) if r["kind"] == "train"]
    np.testing.assert_allclose([r["loss"] for r in lines["two"]], [r["loss"] for r in lines["one"]], rtol=1e-12)
    for before, line in zip(lines["two"], lines["two"][1:]):
        # 1.00-1.08 measured: the two clocks differ by the line's own write (2 ranks' 4 images: 0.5)
        assert 0.7 < line["images_per_s"] * (line["time"] - before["time"]) / 8 < 1.5, line


def visible_gpus():
    """How many GPUs a fresh process sees through pycuda (0 without pycuda or a driver)."""
    probe = "import pycuda.driver as d; d.init(); print(d.Device.count())"
    result = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip().isdigit() else 0


@pytest.mark.cuda
@pytest.mark.mpi
@needs_mpiexec
def test_two_ranks_sharing_one_gpu_equal_one_rank_and_numpy(data, tmp_path):
    """The CUDA backend under the trainer: 1 rank on the GPU against the NumPy reference,
    and 2 ranks sharing that GPU against 1 rank, after a few float64 steps."""
    if visible_gpus() < 1:
        pytest.skip("no GPU visible to pycuda (needs pycuda and a CUDA driver); on a GPU node run scripts/gpu-check.sh")
    args = ["--data", data, "--global-batch", "8", "--dtype", "float64", "--max-steps", "3", "--lr", "0.05"]
    env = dict(ENV, MPICONVNET_ALLOW_GPU_SHARING="1", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    train(args + ["--out", str(tmp_path / "numpy")])
    train(args + ["--out", str(tmp_path / "gpu1"), "--backend", "cuda"], env=env)
    train(args + ["--out", str(tmp_path / "gpu2"), "--backend", "cuda"], ranks=2, env=env)
    reference, _ = params_at(tmp_path / "numpy", 3)
    one, one_velocity = params_at(tmp_path / "gpu1", 3)
    two, two_velocity = params_at(tmp_path / "gpu2", 3)
    for name in reference:
        # float64 throughout: only the order of cuDNN's / cuBLAS's sums differs
        np.testing.assert_allclose(one[name], reference[name], rtol=1e-9, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(two[name], one[name], rtol=1e-9, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(two_velocity[name], one_velocity[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.cuda
@pytest.mark.mpi
@needs_mpiexec
def test_two_ranks_on_one_gpu_without_sharing_allowed_stop_with_one_line(data, tmp_path):
    # the ranks compare their GPUs' UUIDs (cuDeviceGetUuid_v2 on the real driver) once MPI runs
    if visible_gpus() < 1:
        pytest.skip("no GPU visible to pycuda (needs pycuda and a CUDA driver); on a GPU node run scripts/gpu-check.sh")
    env = dict(ENV, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    env.pop("MPICONVNET_ALLOW_GPU_SHARING", None)
    result = train(["--data", data, "--global-batch", "8", "--max-steps", "1", "--backend", "cuda",
                    "--out", str(tmp_path / "run")], ranks=2, env=env, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len([line for line in lines if "all compute on GPU GPU-" in line]) == 1, \
        result.stderr
    assert "ranks 0, 1 all compute on GPU GPU-" in result.stderr and "--allow-gpu-sharing" in result.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.mpi
@needs_mpiexec
def test_averaging_parameters_every_step_equals_averaging_gradients(data, tmp_path):
    # the update is linear in the gradient: the mean of updated replicas is the update
    # with the mean gradient (theano_alexnet's parameter averaging is synchronous SGD)
    args = ["--data", data, "--global-batch", "8", "--dtype", "float64", "--max-steps", "4", "--lr", "0.05"]
    train(args + ["--out", str(tmp_path / "grads")], ranks=2)
    train(args + ["--out", str(tmp_path / "params"), "--sync", "params", "--average-every", "1"], ranks=2)
    assert_same_state(tmp_path / "params", tmp_path / "grads", 4)


@pytest.mark.mpi
@needs_mpiexec
def test_modes_without_a_communication_thread_run_on_an_mpi_without_thread_support(data, tmp_path):
    # parameter averaging overlaps nothing: it asked for MPI_THREAD_SERIALIZED all the same
    # (--overlap's default) and told the user to give --overlap false, which does nothing there
    env = dict(ENV, MPI4PY_RC_THREAD_LEVEL="single")
    result = train(["--data", data, "--global-batch", "16", "--max-steps", "2", "--out", str(tmp_path / "params"),
                    "--sync", "params", "--eval-every", "0"], ranks=2, env=env)
    assert "run directory" in result.stdout


@pytest.mark.mpi
@needs_mpiexec
def test_local_sgd_resumes_exactly_and_differs_from_synchronous_sgd(data, tmp_path):
    # averaging every 2 steps, checkpoints every 3: the checkpoint at step 3 averages the
    # replicas early, in the uninterrupted run and in the one that stops there alike
    common = ["--data", data, "--global-batch", "8", "--lr", "0.05", "--checkpoint-every", "3"]
    args = common + ["--sync", "params", "--average-every", "2"]
    train(args + ["--out", str(tmp_path / "whole"), "--max-steps", "6"], ranks=2)
    train(args + ["--out", str(tmp_path / "parts"), "--max-steps", "3"], ranks=2)
    train(args + ["--out", str(tmp_path / "parts"), "--max-steps", "6", "--resume", "auto"], ranks=2)
    whole, whole_velocity = params_at(tmp_path / "whole", 6)
    parts, parts_velocity = params_at(tmp_path / "parts", 6)
    for name in whole:
        np.testing.assert_array_equal(parts[name], whole[name], err_msg=name)
        np.testing.assert_array_equal(parts_velocity[name], whole_velocity[name], err_msg=name)
    train(common + ["--out", str(tmp_path / "sync"), "--max-steps", "6"], ranks=2)
    synchronous, _ = params_at(tmp_path / "sync", 6)
    assert max(np.abs(synchronous[n] - whole[n]).max() for n in whole) > 1e-6


@pytest.mark.mpi
@needs_mpiexec
def test_local_sgd_averages_the_replicas_after_every_kth_step(data, tmp_path):
    # averaging every 2 steps: after step 4 every rank holds the same replica, which each
    # rank writes out as the run ends (the checkpoint holds rank 0's only)
    write_replicas = """
import os, numpy as np
from mpiconvnet import trainer
run = trainer.Trainer.run
def run_and_write_the_replica(self, *args, **kwargs):
    code = run(self, *args, **kwargs)
    np.savez(os.path.join(self.cfg.out, f"replica-{self.world.rank}.npz"), **self.net.state_dict())
    return code
trainer.Trainer.run = run_and_write_the_replica
"""
    run = tmp_path / "run"
    train(["--data", data, "--global-batch", "8", "--dtype", "float64", "--lr", "0.05", "--max-steps", "4",
           "--sync", "params", "--average-every", "2", "--out", str(run)], ranks=2, patch=write_replicas)
    with np.load(run / "replica-0.npz") as zero, np.load(run / "replica-1.npz") as one:
        for name in zero.files:
            np.testing.assert_allclose(one[name], zero[name], rtol=1e-14, atol=0, err_msg=name)
    start = build_model("alexnet-mini", num_classes=5, dtype="float64", seed=0).state_dict()
    with np.load(run / "replica-0.npz") as zero:
        assert max(np.abs(zero[n] - start[n]).max() for n in start) > 0   # the steps moved the weights


@pytest.mark.mpi
@needs_mpiexec
def test_each_rank_trains_on_its_own_share_of_every_epoch_in_the_epoch_s_order(data, tmp_path):
    # each rank notes the images its sampler hands out and the centre pixel of each image the
    # model is given: the ranks' shares of an epoch hold each of the 96 images once, a new
    # epoch comes in a new order, and the model sees those images as (pixel - mean) / std
    # (alexnet-mini standardises its input, as torchvision's models do)
    note_images = note_sampled_images(tmp_path) + f"""
import numpy as np
from mpiconvnet import models
loss_and_grads = models.Net.loss_and_grads
def seen(self, x, *args, **kwargs):
    with open(os.path.join({str(tmp_path)!r}, "inputs-" + rank), "a") as f:
        f.write(" ".join(map(repr, np.asarray(x)[:, :, 28, 28].ravel().tolist())) + "\\n")
    return loss_and_grads(self, x, *args, **kwargs)
models.Net.loss_and_grads = seen
"""
    train(["--data", data, "--global-batch", "16", "--epochs", "2", "--out", str(tmp_path / "run")], ranks=2,
          patch=note_images)
    stats = ShardedDataset(data, "train")
    per_epoch = {0: {}, 1: {}}
    for rank in ("0", "1"):
        with open(tmp_path / f"images-{rank}") as f, open(tmp_path / f"inputs-{rank}") as g:
            lines = [list(map(int, line.split())) for line in f]
            inputs = [np.array(line.split(), dtype=np.float64).reshape(-1, 3) for line in g]
        assert len(lines) == len(inputs) == 12
        for (epoch, *indices), centre in zip(lines, inputs):
            per_epoch[epoch].setdefault(rank, []).extend(indices)
            np.testing.assert_array_equal(decode_index(centre * stats.std + stats.mean), indices)
    for epoch, shares in per_epoch.items():
        assert sorted(shares["0"] + shares["1"]) == list(range(96)), epoch
    assert per_epoch[0]["0"] != per_epoch[1]["0"]


@pytest.mark.mpi
@needs_mpiexec
def test_evaluation_counts_every_image_once_on_three_ranks(data, tmp_path):
    train(["--data", data, "--global-batch", "6", "--max-steps", "2", "--out", str(tmp_path / "run")], ranks=3)
    one = subprocess.run([PYTHON, "-m", "mpiconvnet.evaluate", "--data", data, "--checkpoint", str(tmp_path / "run"),
                          "--json", "--batch", "7"], env=ENV, capture_output=True, text=True, check=True)
    three = subprocess.run([MPIEXEC, "-n", "3", PYTHON, "-m", "mpiconvnet.evaluate", "--data", data, "--checkpoint",
                            str(tmp_path / "run"), "--json", "--batch", "7"],
                           env=ENV, capture_output=True, text=True, check=True)
    a, b = json.loads(one.stdout), json.loads(three.stdout)
    assert a["images"] == b["images"] == 61
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert evaluations(tmp_path / "run")[-1]["images"] == 61


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=[pytest.mark.mpi, needs_mpiexec])])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(data, tmp_path, ranks):
    # 6 steps per epoch at global batch 16 with 96 images: step 7 is inside the second epoch
    args = ["--data", data, "--global-batch", "16", "--epochs", "2", "--checkpoint-every", "7"]
    train(args + ["--out", str(tmp_path / "whole")], ranks)
    train(args + ["--out", str(tmp_path / "split"), "--max-steps", "7"], ranks)
    train(args + ["--out", str(tmp_path / "split"), "--resume", "auto"], ranks)
    for whole, split in zip(params_at(tmp_path / "whole", 12), params_at(tmp_path / "split", 12)):
        for name in whole:
            np.testing.assert_array_equal(split[name], whole[name], err_msg=name)
    with open(tmp_path / "split" / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 13))   # the resumed run's lines continue, none repeated
    # the largest peak resident set over the ranks: tens of MB for this small net, and a
    # high water never falls within one process (the resumed run is a new process)
    memory = [r["memory_mb"] for r in records]
    assert all(20 < m < 4000 for m in memory)
    assert memory[:7] == sorted(memory[:7]) and memory[7:] == sorted(memory[7:])


def test_a_resume_inside_a_metrics_window_logs_the_lines_of_the_uninterrupted_run(data, tmp_path):
    # lines every 5 steps, the run split at step 7: the checkpoint carries the loss summed
    # over steps 6-7, so the line at step 10 averages 6-10 as the uninterrupted run's does
    args = ["--data", data, "--global-batch", "16", "--epochs", "2", "--log-every", "5"]
    train(args + ["--out", str(tmp_path / "whole")])
    train(args + ["--out", str(tmp_path / "split"), "--max-steps", "7"])
    train(args + ["--out", str(tmp_path / "split"), "--resume", "auto"])
    lines = {}
    for run in ("whole", "split"):
        with open(tmp_path / run / "metrics.jsonl") as f:
            lines[run] = [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, f) if r["kind"] == "train"]
    assert [line for line in lines["split"] if line[0] != 7] == lines["whole"]   # 7: the first part's last line


def start_long_run(data, run, ranks=2, extra=()):
    """A training run far longer than any test, started in the background."""
    launcher = [MPIEXEC, "-n", str(ranks)] if ranks > 1 else []
    return subprocess.Popen(launcher + [PYTHON, "-m", "mpiconvnet.train"] + TINY +
                            ["--data", data, "--global-batch", "16", "--epochs", "400", "--checkpoint-every", "2",
                             "--out", run] + list(extra),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pids(proc):
    """The training processes below mpiexec `proc` (hydra puts a proxy in between), by pid."""
    out = subprocess.run(["pgrep", "-f", "mpiconvnet.train"], capture_output=True, text=True).stdout.split()
    ranks = sorted(int(p) for p in out if int(p) != proc.pid and _is_descendant(int(p), proc.pid))
    assert len(ranks) == 2, ranks
    return ranks


def _wait_for_checkpoint_then(proc, folder, action, timeout=120):
    """action() once the run has written a checkpoint. A run that writes none in time is
    stopped (mpiexec passes SIGTERM on to its ranks) rather than left training after the
    test, where it would slow every test after it."""
    deadline = time.monotonic() + timeout
    while not (os.path.isdir(folder) and os.listdir(folder)):
        assert proc.poll() is None, proc.communicate()
        if time.monotonic() > deadline:
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            pytest.fail(f"no checkpoint appeared in {folder} within {timeout} s")
        time.sleep(0.1)
    action()


@needs_mpiexec
def test_a_second_run_into_the_same_out_is_refused_while_the_first_trains(data, tmp_path):
    # a job submitted twice: the two would mix checkpoints and metrics and remove each other's .tmp files
    run = str(tmp_path / "run")
    first = start_long_run(data, run, ranks=2)
    try:
        _wait_for_checkpoint_then(first, os.path.join(run, "checkpoints"), lambda: None)
        metrics_before = open(os.path.join(run, "metrics.jsonl")).read()
        for ranks, resume in ((1, "auto"), (2, "auto"), (1, "")):
            second = train(["--data", data, "--global-batch", "16", "--epochs", "400", "--out", run]
                           + (["--resume", resume] if resume else []), ranks=ranks, check=False)
            assert second.returncode == 2, second.stderr
            assert second.stderr == (f"mpiconvnet.train: another training run is using --out {run} (it holds "
                                     f"{run}/.lock); let it finish or stop it, or choose another --out\n")
        assert first.poll() is None   # the first one trains on, its files untouched
        assert open(os.path.join(run, "metrics.jsonl")).read().startswith(metrics_before)
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert first.returncode == 75
    # the lock ends with its run: the same command continues
    result = train(["--data", data, "--global-batch", "16", "--out", run, "--resume", "auto", "--max-steps", "40"])
    assert "resuming at step" in result.stdout


def test_a_refused_resume_leaves_no_out_behind(data, tmp_path):
    # the run's lock is taken before --resume is read: a refusal must not leave a folder holding only .lock
    bad = tmp_path / "bad.h5"
    bad.write_text("not a checkpoint")
    result = train(["--data", data, "--global-batch", "16", "--out", str(tmp_path / "runs" / "a" / "run"),
                    "--resume", str(bad)], check=False)
    assert result.returncode == 2 and f"--resume {bad} is not a checkpoint (an HDF5 file" in result.stderr, \
        result.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.h5"]   # nor the folders above it that the run made


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])   # SIGINT: ctrl-c at an interactive run
def test_sigterm_checkpoints_and_the_run_resumes(data, tmp_path, sig):
    run = str(tmp_path / "run")
    args = ["--data", data, "--global-batch", "16", "--epochs", "400", "--checkpoint-every", "2", "--out", run]
    proc = start_long_run(data, run, ranks=1)
    _wait_for_checkpoint_then(proc, os.path.join(run, "checkpoints"), lambda: proc.send_signal(sig))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert f"stopped by {sig.name} after step" in out and "checkpoint written, continue with --resume auto" in out
    assert "Traceback" not in err
    stopped_at = max(int(f[5:13]) for f in os.listdir(os.path.join(run, "checkpoints")))
    result = train(args[:-1] + [run, "--resume", "auto", "--max-steps", str(stopped_at + 3)])
    assert f"resuming at step {stopped_at}" in result.stdout
    params_at(run, stopped_at + 3)


@pytest.mark.mpi
@needs_mpiexec
def test_sigkill_of_one_rank_ends_all_ranks_promptly(data, tmp_path):
    run = str(tmp_path / "run")
    proc = start_long_run(data, run)

    def kill_rank_one():
        os.kill(rank_pids(proc)[-1], signal.SIGKILL)

    _wait_for_checkpoint_then(proc, os.path.join(run, "checkpoints"), kill_rank_one)
    start = time.monotonic()
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - start < 30


@pytest.mark.mpi
@needs_mpiexec
def test_a_stopped_rank_is_named_after_the_stall_timeout(data, tmp_path):
    run = str(tmp_path / "run")
    proc = start_long_run(data, run, extra=["--stall-timeout", "3"])
    _wait_for_checkpoint_then(proc, os.path.join(run, "checkpoints"), lambda: None)
    with hung(rank_pids(proc)[-1]):
        _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    # stopped inside a checkpoint's collectives, the watchdog speaks instead of the heartbeat
    assert ("rank 0: ranks [1] sent nothing for 3 s at step" in err   # it stopped before the step's beat
            or "rank 0: ranks [1] sent nothing for 1.5 s after the gradient allreduce made no progress for 3 s" in err
            or "no progress for" in err and "another rank is dead or hung" in err), err


@pytest.mark.mpi
@needs_mpiexec
def test_a_rank_stopped_inside_the_blocking_gathers_of_hybrid_ends_the_run(data, tmp_path):
    # the fc layers' gathers are blocking MPI calls the heartbeat cannot poll: the watchdog
    # ends the run after twice --stall-timeout instead of letting it wait forever
    run = str(tmp_path / "run")
    proc = start_long_run(data, run, extra=["--stall-timeout", "3", "--parallel", "hybrid"])
    _wait_for_checkpoint_then(proc, os.path.join(run, "checkpoints"), lambda: None)
    started = time.monotonic()
    with hung(rank_pids(proc)[-1]):
        _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.monotonic() - started < 30
    assert ("rank 0: no progress for" in err and "another rank is dead or hung" in err
            or "rank 0: ranks [1] sent nothing for 3 s at step" in err   # stopped before a step's beat
            # stopped before the reduction of the convolutions' gradients
            or "rank 0: ranks [1] sent nothing for 1.5 s after the gradient allreduce" in err), err


@pytest.mark.mpi
@needs_mpiexec
def test_a_rank_missing_from_the_step_s_loss_allreduce_is_reported():
    # the window the heartbeat cannot see: a rank hangs after the gradients were reduced
    # and before the per-step sum of losses and stop votes (here: never calls it)
    script = ("import time, numpy as np; from mpiconvnet import distributed\n"
              "world = distributed.init('numpy', 1, need_threads=False)\n"
              "if world.rank == 1: time.sleep(60)\n"
              "distributed.Heartbeat(world, timeout=2).allreduce_sum(np.ones(2), step=7)\n")
    started = time.monotonic()
    result = subprocess.run([MPIEXEC, "-n", "2", PYTHON, "-c", script], env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and time.monotonic() - started < 50
    # rank 0 names the silent rank (or, without MPI_THREAD_MULTIPLE, says which sum stalled)
    assert ("rank 0: ranks [1] sent nothing for 2 s at step 7" in result.stderr
            or "the step's loss allreduce made no progress for 2 s at step 7" in result.stderr), result.stderr


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("call, named", [
    ("beat(step=7)", "rank 0: ranks [2] sent nothing for 2 s at step 7"),
    ("report_stall(step=7)", "rank 0: ranks [2] sent nothing for 1 s after the gradient allreduce made no "
                             "progress for 2 s at step 7")])
def test_a_silent_rank_is_named_by_rank_0_not_blamed_on_rank_0_by_the_others(call, named):
    # 3 ranks: while rank 0 waits for the silent rank 2 it cannot answer rank 1, which
    # (with the same deadline) aborted the job first in 3 of 5 tries, naming rank 0
    script = ("import time; from mpi4py import MPI; from mpiconvnet import distributed\n"
              "world = distributed.init('numpy', 1, need_threads=False)\n"
              "if world.rank == 2: time.sleep(60)\n"
              f"distributed.Heartbeat(world, timeout=2).{call}\n")
    for _ in range(3):
        started = time.monotonic()
        result = subprocess.run([MPIEXEC, "-n", "3", PYTHON, "-c", script], env=ENV, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode != 0 and time.monotonic() - started < 50
        if "another rank is dead or hung" not in result.stderr:   # without MPI_THREAD_MULTIPLE none is named
            assert named in result.stderr and "no word from rank 0" not in result.stderr, result.stderr


@contextlib.contextmanager
def hung(pid):
    """Process `pid` stopped (SIGSTOP) for the block, as a hung rank is; killed after it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_descendant(pid, ancestor):
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except FileNotFoundError:
            return False
        if pid == ancestor:
            return True
    return False


def test_the_advice_after_a_nonfinite_loss_names_checkpoints_only_where_there_are(tmp_path):
    from mpiconvnet.trainer import what_to_do_after_a_nonfinite_loss
    assert "no checkpoint was written before it" in what_to_do_after_a_nonfinite_loss(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-00000004.h5").write_bytes(b"")
    assert "resume from one well before the loss grew (--resume PATH) with a lower --lr" in \
        what_to_do_after_a_nonfinite_loss(str(tmp_path))


def test_a_nonfinite_loss_stops_at_once_and_keeps_the_last_checkpoint(data, tmp_path):
    run = str(tmp_path / "run")
    result = train(["--data", data, "--global-batch", "16", "--epochs", "3", "--lr", "1e6", "--out", run], check=False)
    assert result.returncode == 4, result.stderr
    # one line, without NumPy's overflow warnings, and no checkpoint to resume from was written
    assert result.stderr.count("\n") == 1 and "loss became" in result.stderr and "at step" in result.stderr
    assert "no checkpoint was written before it: run the same command again with a lower --lr" in result.stderr
    assert not os.path.isdir(os.path.join(run, "checkpoints")) or all(
        not f.endswith(".tmp") for f in os.listdir(os.path.join(run, "checkpoints")))



@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=[pytest.mark.mpi, needs_mpiexec])])
def test_a_full_disk_at_a_checkpoint_is_one_line_exit_5_and_the_run_resumes(data, tmp_path, ranks):
    run = tmp_path / "run"
    # the second checkpoint's file is written into /dev/full: the kernel's real ENOSPC (made
    # as the file is written: a run removes files like it that it finds as it starts)
    full_disk_at_step_12 = """
import os
from mpiconvnet import checkpoint
write = checkpoint._write
def write_into_a_full_disk(tmp, *args):
    if tmp.endswith("ckpt-00000012.h5.tmp"):
        os.symlink("/dev/full", tmp)
    write(tmp, *args)
checkpoint._write = write_into_a_full_disk
"""
    args = ["--data", data, "--global-batch", "16", "--epochs", "2", "--out", str(run)]
    result = train(args, ranks=ranks, check=False, patch=full_disk_at_step_12)
    assert result.returncode == 5, result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("mpiconvnet.train:")]
    assert ours == [f"mpiconvnet.train: cannot write {run}/checkpoints/ckpt-00000012.h5: No space left on device; "
                    f"free space or fix permissions under --out {run}, then run the same command with --resume "
                    f"auto (the last checkpoint, ckpt-00000006.h5, is kept)"], result.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt-00000006.h5"]   # the partial file is gone
    result = train(args + ["--resume", "auto"], ranks=ranks)
    assert "resuming at step 6" in result.stdout
    params_at(str(run), 12)


def test_checkpoint_files_a_killed_run_left_are_removed_when_the_next_run_starts(data, tmp_path):
    run = tmp_path / "run"
    args = ["--data", data, "--global-batch", "16", "--epochs", "1", "--checkpoint-every", "2", "--out", str(run)]
    train(args + ["--max-steps", "2"])
    folder = run / "checkpoints"
    (folder / "ckpt-00000005.h5.tmp").write_bytes(bytes(1000))   # a run killed while writing step 5's
    (folder / "notes.tmp").write_text("not a checkpoint's")
    result = train(args + ["--max-steps", "4", "--resume", "auto"])
    assert f"mpiconvnet: removed ckpt-00000005.h5.tmp from {folder}" in result.stderr
    assert sorted(os.listdir(folder)) == ["ckpt-00000002.h5", "ckpt-00000004.h5", "notes.tmp"]


def test_a_shard_broken_after_packing_is_one_line_and_exit_2(tmp_path):
    """A truncated raw shard (found when the loader opens it) and a JPEG that no longer
    decodes (found by a loader worker process mid-epoch): one line naming the shard."""
    raw = write_tiny_dataset(str(tmp_path / "raw"), 32, 0, 4, 64, shard_size=16)
    path = os.path.join(raw, "train-00001.h5")
    os.truncate(path, os.path.getsize(path) // 2)
    result = train(["--data", raw, "--global-batch", "16", "--epochs", "1", "--out", str(tmp_path / "a")],
                   check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mpiconvnet.train: rank 0: {path} is not a readable HDF5 shard"), \
        result.stderr
    jpeg = write_tiny_dataset(str(tmp_path / "jpeg"), 32, 0, 4, 64, format="jpeg", shard_size=16)
    path = os.path.join(jpeg, "train-00001.h5")
    with h5py.File(path, "r+") as shard:
        start, stop = shard["jpeg_offsets"][3:5]
        shard["jpeg"][start:stop] = 0     # image 3's bytes: no longer a JPEG
    result = train(["--data", jpeg, "--global-batch", "16", "--epochs", "1", "--workers", "1",
                    "--out", str(tmp_path / "b")], check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mpiconvnet.train: rank 0: {path}: image 3 does not decode"), \
        result.stderr


@pytest.mark.parametrize("args, message", [
    (["--global-batch", "16", "--bogus", "1"], "unknown flag --bogus"),
    (["--global-batch", "sixteen"], "--global-batch expects int, got 'sixteen'"),
    (["--model", "vgg"], "--model 'vgg' is not one of"),
    (["--data", "/nonexistent/shards"], "/nonexistent/shards/dataset.json not found"),
    (["--model", "alexnet"], "images are 64px, model alexnet crops 227px"),
    (["--resume", "/nonexistent.h5"], "--resume /nonexistent.h5: no such checkpoint"),
    (["--global-batch", "16", "--resume", "/proc"], "--resume /proc: holds no checkpoints/ckpt-*.h5"),
    (["--out", "/dev/null"], "--out /dev/null is a file; give the run directory"),
    (["--global-batch", "128"], "--global-batch 128 is larger than the 96 training images"),
])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, args, message):
    base = ["--data", data, "--out", str(tmp_path / "run")]
    result = train(base + args, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_backend_cuda_without_pycuda_is_one_line_and_exit_2(data, tmp_path):
    try:
        import pycuda  # noqa: F401
        pytest.skip("pycuda is installed here: the missing-pycuda message cannot show")
    except ImportError:
        pass
    result = train(["--data", data, "--out", str(tmp_path / "run"), "--backend", "cuda"], check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--backend cuda needs pycuda" in lines[0] and "--backend numpy" in lines[0]
    assert not os.path.exists(tmp_path / "run")


def test_a_gpu_set_up_failure_becomes_a_setup_error_with_its_first_line(monkeypatch):
    from mpiconvnet import distributed
    from mpiconvnet.backends import cuda
    from mpiconvnet.backends.cuda import device

    def no_gpu_left(local_rank, local_size):
        raise device.DeviceChoiceError("no CUDA device visible (CUDA_VISIBLE_DEVICES=''); run on a GPU node\n"
                                       "(details)")
    monkeypatch.setattr(cuda, "initialize", no_gpu_left)
    for launcher in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(launcher, raising=False)   # one process, no MPI
    monkeypatch.setattr(distributed, "set_blas_threads", lambda n: None)   # leave this process's BLAS alone
    with pytest.raises(distributed.SetupError) as e:
        distributed.init("cuda")
    assert str(e.value) == "no CUDA device visible (CUDA_VISIBLE_DEVICES=''); run on a GPU node" and e.value.echo


@pytest.mark.mpi
@needs_mpiexec
def test_a_global_batch_that_does_not_divide_by_the_ranks_is_refused(data, tmp_path):
    result = train(["--data", data, "--out", str(tmp_path / "run"), "--global-batch", "15"], ranks=2, check=False)
    assert result.returncode == 2
    assert "--global-batch 15 does not divide by 2 ranks" in result.stderr


@pytest.mark.mpi
@needs_mpiexec
def test_a_rank_that_cannot_read_the_data_is_named(data, tmp_path):
    # MPMD: rank 1 is given a --data that is not there, as on a node that lacks it
    args = [PYTHON, "-m", "mpiconvnet.train", *TINY, "--global-batch", "16", "--out", str(tmp_path / "run"), "--data"]
    result = subprocess.run([MPIEXEC, "-n", "1", *args, data, ":", "-n", "1", *args, str(tmp_path / "missing")],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"mpiconvnet.train: rank 1: {tmp_path / 'missing'}/dataset.json not found")
    assert result.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "run"), result.stderr


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("thread_level", ["multiple", "single"])
def test_a_rank_that_cannot_read_its_config_file_is_named(data, tmp_path, thread_level):
    # flags are read before MPI starts: rank 0 went on into MPI and waited there for ever.
    # On an MPI without thread support the rank that met the failure does not look at the
    # thread level: the others' refusal of it came out as "rank 0: MPI gives thread level 0",
    # blaming rank 0 for what every rank has and hiding rank 1's missing file
    config = tmp_path / "run.toml"
    config.write_text("lr = 0.01\n")
    args = [PYTHON, "-m", "mpiconvnet.train", *TINY, "--data", data, "--out", str(tmp_path / "run"), "--config"]
    result = subprocess.run([MPIEXEC, "-n", "1", *args, str(config), ":", "-n", "1", *args, str(tmp_path / "no.toml")],
                            env=dict(ENV, MPI4PY_RC_THREAD_LEVEL=thread_level), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"mpiconvnet.train: rank 1: --config {tmp_path / 'no.toml'}: file not found\n"
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.mpi
@needs_mpiexec
def test_an_mpi_without_thread_support_is_refused_once(data, tmp_path):
    result = train(["--data", data, "--out", str(tmp_path / "run")], ranks=2, check=False,
                   env=dict(ENV, MPI4PY_RC_THREAD_LEVEL="single"))
    assert result.returncode == 2
    assert result.stderr == ("mpiconvnet.train: MPI gives thread level 0, the overlapped allreduce needs "
                             "MPI_THREAD_SERIALIZED or better; run with --overlap false\n"), result.stderr


def test_a_refused_flag_is_one_line_without_the_notes_of_settings_it_ignores(data, tmp_path):
    # --bucket-mb is noted as ignored under --sync async before --init-skip is refused: the
    # note came out too, ahead of the error, since a refused flag no longer returns at once
    result = train(["--data", data, "--out", str(tmp_path / "run"), "--sync", "async", "--bucket-mb", "10",
                    "--init-skip", "fc8"], check=False)
    assert result.returncode == 2
    assert result.stderr == ("mpiconvnet.train: --init-skip fc8 needs --init-weights: the file the other layers "
                             "start from\n"), result.stderr


@pytest.mark.mpi
@needs_mpiexec
def test_a_bad_flag_under_mpiexec_is_said_once(data, tmp_path):
    result = train(["--data", data, "--out", str(tmp_path / "run"), "--momentum", "2"], ranks=2, check=False)
    assert result.returncode == 2
    assert result.stderr.count("--momentum must be in [0, 1)") == 1, result.stderr


@pytest.mark.mpi
@needs_mpiexec
def test_sigusr1_to_one_rank_stops_every_rank_after_the_same_step(data, tmp_path):
    # SLURM signals every task, but not at the same instant: the stop is voted on in the
    # per-step allreduce, so all ranks checkpoint after the same step and exit 75
    run = str(tmp_path / "run")
    proc = start_long_run(data, run)

    def signal_one_rank():
        os.kill(rank_pids(proc)[-1], signal.SIGUSR1)

    _wait_for_checkpoint_then(proc, os.path.join(run, "checkpoints"), signal_one_rank)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "checkpoint written, continue with --resume auto" in out


@pytest.mark.mpi
@needs_mpiexec
def test_a_signal_during_an_evaluation_stops_every_rank_right_after_it(data, tmp_path):
    # the last rank is signalled as the first evaluation (step 6, the first epoch's end)
    # starts: every rank stops after it, with the epoch's checkpoint, not one step later
    signal_in_evaluation = """
import os, signal
from mpiconvnet import trainer
evaluate = trainer.evaluate
def signalled_evaluate(net, world, *args, **kwargs):
    if world.rank == world.size - 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    return evaluate(net, world, *args, **kwargs)
trainer.evaluate = signalled_evaluate
"""
    run = tmp_path / "run"
    args = ["--data", data, "--global-batch", "16", "--epochs", "2", "--out", str(run)]
    result = train(args, ranks=2, patch=signal_in_evaluation, check=False)
    assert result.returncode == 75, result.stderr
    assert "stopped by a signal on another rank after step 6 and its evaluation; checkpoint written" in result.stdout
    assert os.listdir(run / "checkpoints") == ["ckpt-00000006.h5"]
    # the checkpoint says its evaluation is done: the resumed run goes on with step 7
    result = train(args + ["--resume", "auto"], ranks=2)
    assert "resuming at step 6" in result.stdout and "evaluation after step 6" not in result.stdout
    with open(run / "metrics.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in evaluations(run)] == [6, 12]
    # signalled in the last evaluation, the run is done: exit 0, nothing to requeue
    result = train(args[:-1] + [str(tmp_path / "short"), "--epochs", "1"], ranks=2, patch=signal_in_evaluation)
    assert "stopped" not in result.stdout and evaluations(tmp_path / "short")[-1]["step"] == 6


def test_a_signal_in_the_evaluation_a_resumed_run_owes_keeps_the_checkpoint_s_loss_sums(data, tmp_path):
    # the checkpoint of step 6 holds the loss of steps 5-6 (lines every 4 steps); a stop in
    # the evaluation the resumed run does first rewrote it without them, and the step-8 line
    # then differed from the uninterrupted run's
    args = ["--data", data, "--global-batch", "16", "--epochs", "2", "--log-every", "4"]
    train(args + ["--out", str(tmp_path / "whole")])
    run = str(tmp_path / "run")
    die_in_evaluation = "import os\nfrom mpiconvnet import trainer\ntrainer.evaluate = lambda *a, **k: os._exit(9)\n"
    assert train(args + ["--out", run], patch=die_in_evaluation, check=False).returncode == 9
    signal_in_evaluation = """
import os, signal
from mpiconvnet import trainer
evaluate = trainer.evaluate
def signalled_evaluate(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGUSR1)
    return evaluate(*args, **kwargs)
trainer.evaluate = signalled_evaluate
"""
    stopped = train(args + ["--out", run, "--resume", "auto"], patch=signal_in_evaluation, check=False)
    assert stopped.returncode == 75, stopped.stderr
    train(args + ["--out", run, "--resume", "auto"])

    def losses(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["kind"] == "train"]
    assert losses(run) == losses(str(tmp_path / "whole"))


@pytest.mark.parametrize("split_at", [12, 9])   # an epoch end (6 steps an epoch), and mid-epoch
def test_the_plateau_schedule_resumes_exactly(data, tmp_path, split_at):
    # the evaluation at an epoch end comes after its checkpoint, and a run resumed from that
    # checkpoint evaluates first; a --max-steps run's last, mid-epoch evaluation leaves the
    # schedule alone, as the longer run never made it
    args = ["--data", data, "--global-batch", "16", "--epochs", "4", "--schedule", "plateau",
            "--plateau-patience", "1", "--lr", "0.05"]
    train(args + ["--out", str(tmp_path / "whole")])
    train(args + ["--out", str(tmp_path / "split"), "--max-steps", str(split_at)])
    train(args + ["--out", str(tmp_path / "split"), "--resume", "auto"])
    runs = {}
    for run in ("whole", "split"):
        with open(tmp_path / run / "metrics.jsonl") as f:
            runs[run] = [{k: v for k, v in r.items() if k not in ("time", "images_per_s", "time_data", "time_compute",
                                                                     "time_comm", "memory_mb")}
                         for r in map(json.loads, f)]
    extra = [r for r in runs["split"] if r["kind"] == "eval" and r["step"] == split_at and split_at % 6]
    assert [r for r in runs["split"] if r not in extra] == runs["whole"]
    assert len(extra) == (1 if split_at % 6 else 0)   # the first part's own last evaluation
    lrs = [r["lr"] for r in runs["whole"] if r["kind"] == "train"]
    assert lrs[12] < lrs[11], "the test needs the lr to drop after the evaluation at step 12"


@pytest.mark.mpi
@needs_mpiexec
def test_parameter_averaging_evaluates_the_averaged_replicas(data, tmp_path):
    # epoch ends (step 6) fall between averagings (every 4): the checkpoint averages, and the
    # evaluation after it must score that one model, not each rank's own replica
    run = tmp_path / "run"
    train(["--data", data, "--out", str(run), "--global-batch", "16", "--epochs", "1", "--sync", "params",
           "--average-every", "4"], ranks=2)
    during = evaluations(run)[0]
    result = subprocess.run([PYTHON, "-m", "mpiconvnet.evaluate", "--data", data, "--checkpoint", str(run), "--json",
                             "--workers", "0"], env=ENV, capture_output=True, text=True, timeout=120)
    after = json.loads(result.stdout)
    assert (during["step"], after["step"]) == (6, 6)
    assert during["top1"] == after["top1"] and during["loss"] == pytest.approx(after["loss"], rel=1e-6)


def test_a_stop_at_an_epoch_end_evaluates_when_resumed(tmp_path):
    # one step an epoch: every stop lands on an epoch end, after its checkpoint and before
    # its evaluation; the resumed run evaluates first, so no epoch goes unevaluated
    data = write_tiny_dataset(str(tmp_path / "shards"), 16, 10, 4, 64, shard_size=16)
    run = str(tmp_path / "run")
    args = ["--data", data, "--global-batch", "16", "--out", run]
    proc = subprocess.Popen([PYTHON, "-m", "mpiconvnet.train"] + TINY + args + ["--epochs", "400"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint_then(proc, os.path.join(run, "checkpoints"), lambda: proc.send_signal(signal.SIGTERM))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    stopped_at = max(int(f[5:13]) for f in os.listdir(os.path.join(run, "checkpoints")))
    train(TINY + args + ["--epochs", str(stopped_at + 2), "--resume", "auto"])
    assert [r["step"] for r in evaluations(run)] == list(range(1, stopped_at + 3))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        finished = f.read()
    train(TINY + args + ["--epochs", str(stopped_at + 2), "--resume", "auto"])   # a finished run: nothing again
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert f.read() == finished   # not even the last evaluation redone (its time would differ)


def test_a_run_directory_with_checkpoints_is_resumed_never_overwritten(data, tmp_path):
    run = tmp_path / "run"
    args = ["--data", data, "--global-batch", "16", "--out", str(run)]
    train(args + ["--epochs", "2", "--checkpoint-every", "4", "--keep-checkpoints", "5"])
    assert sorted(os.listdir(run / "checkpoints")) == [f"ckpt-{s:08d}.h5" for s in (4, 6, 8, 12)]
    result = train(args + ["--epochs", "2"], check=False)
    assert result.returncode == 2
    assert f"--out {run} holds the checkpoints of an earlier run (newest ckpt-00000012.h5)" in result.stderr
    # back to step 4 (say with a lower lr after a NaN): the later checkpoints step aside, so
    # neither pruning nor --resume auto picks the abandoned ones
    result = train(args + ["--epochs", "2", "--lr", "0.001", "--max-steps", "6", "--keep-checkpoints", "1",
                           "--resume", str(run / "checkpoints" / "ckpt-00000004.h5")])
    assert "ckpt-00000006.h5, ckpt-00000008.h5, ckpt-00000012.h5 moved to" in result.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt-00000006.h5", "superseded"]
    assert sorted(os.listdir(run / "checkpoints" / "superseded" / "1")) == [f"ckpt-{s:08d}.h5" for s in (6, 8, 12)]
    assert "resuming at step 6" in train(args + ["--epochs", "2", "--lr", "0.001", "--resume", "auto"]).stdout
    # a run directory for --resume is its newest checkpoint: here a branch into a new --out
    result = train(args[:-1] + [str(tmp_path / "branch"), "--epochs", "2", "--resume", str(run)])
    assert f"resuming at step 12 from {run}/checkpoints/ckpt-00000012.h5" in result.stdout
    # already at its end: said so, and the closing line lists only what the run wrote
    assert "resumed at step 12, and this run ends at step 12 (--epochs 2): nothing to train; raise --epochs to" \
        in result.stdout
    assert f"run directory: {tmp_path / 'branch'} (config.json)\n" in result.stdout, result.stdout
    result = train(args + ["--epochs", "3", "--max-steps", "12", "--resume", "auto"])
    assert "resumed at step 12, and this run ends at step 12 (--max-steps 12): nothing to train; raise --max-steps " \
           "to train on" in result.stdout
    result = train(args + ["--epochs", "1", "--max-steps", "5", "--resume", "auto"])   # both end it before 12
    assert "this run ends at step 5 (--epochs 1, --max-steps 5): nothing to train; raise --epochs and --max-steps" \
        in result.stdout
    assert "(config.json, metrics.jsonl, checkpoints/); plot with" in result.stdout


def test_a_damaged_newest_checkpoint_is_one_line_naming_the_older_one_to_resume_from(data, tmp_path):
    run = tmp_path / "run"
    args = ["--data", data, "--global-batch", "16", "--epochs", "1", "--checkpoint-every", "2", "--out", str(run)]
    train(args + ["--max-steps", "4"])
    older, newest = (run / "checkpoints" / f"ckpt-{step:08d}.h5" for step in (2, 4))
    # finite numbers, as a bad disk may leave: the run would train on from them unawares
    overwrite(newest, "params/fc8.weight", np.float32(0.5).tobytes() * 16)
    result = train(args + ["--resume", "auto"], check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"mpiconvnet.train: checkpoint {newest} is damaged (params/fc8.weight does not match its checksum); use the "
        f"older one instead: --resume {older}"]
    assert "resuming at step 2" in train(args + ["--resume", str(older)]).stdout


def test_a_checkpoint_with_a_part_missing_is_one_line_and_exit_2(data, tmp_path):
    # each crashed every rank with a traceback: the optimizer's, the schedule's
    run = tmp_path / "run"
    args = ["--data", data, "--global-batch", "16", "--epochs", "1", "--checkpoint-every", "1", "--out", str(run)]
    train(args + ["--max-steps", "2"])
    older, newest = (run / "checkpoints" / f"ckpt-{step:08d}.h5" for step in (1, 2))
    with h5py.File(newest, "r+") as f:
        del f["velocity/fc8.bias"]
    result = train(args + ["--resume", "auto"], check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"mpiconvnet.train: checkpoint {newest} is incomplete (velocity/fc8.bias is missing); use the older one "
        f"instead: --resume {older}"]
    rewrite_meta(older, lambda meta: meta["schedule"].pop("best_top1"))
    result = train(args + ["--resume", str(older)], check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"mpiconvnet.train: checkpoint {older} is incomplete (its meta's schedule lacks 'best_top1'); no older "
        f"checkpoint is beside it in {run / 'checkpoints'} to give --resume instead"]


def test_a_missing_validation_shard_stops_the_run_before_its_first_step(tmp_path):
    data = write_tiny_dataset(str(tmp_path / "shards"), 32, 20, 4, 64, shard_size=16)
    os.remove(os.path.join(data, "val-00001.h5"))
    result = train(["--data", data, "--global-batch", "16", "--out", str(tmp_path / "run")], check=False)
    assert result.returncode == 2 and "val-00001.h5 not found" in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "run")


def test_a_killed_loader_process_ends_the_run_with_one_line_and_exit_3(data, tmp_path):
    run = str(tmp_path / "run")
    proc = start_long_run(data, run, ranks=1, extra=["--workers", "1"])
    _wait_for_checkpoint_then(proc, os.path.join(run, "checkpoints"), lambda: None)
    # a loader lives one epoch here (a few steps): kill what runs until the run notices
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(child), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "mpiconvnet.train: rank 0: loader worker 0" in err and "died with exit code -9" in err
    assert "Traceback" not in err
