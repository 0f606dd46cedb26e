"""--sync async (async_sgd.py): a parameter server on rank 0, workers on the others, run
as users run it (mpiexec subprocesses)."""
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.test_train import (ENV, MPIEXEC, PYTHON, TINY, _is_descendant, _wait_for_checkpoint_then,
                              assert_same_state, hung, evaluations, needs_mpiexec, note_sampled_images, params_at, train,
                              visible_gpus)
from tests.data_fixtures import write_tiny_dataset

pytestmark = [pytest.mark.mpi, needs_mpiexec]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("shards")), 96, 61, 5, 64, shard_size=20)


def train_records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def test_one_worker_pushing_every_batch_is_synchronous_sgd_and_resumes_exactly(data, tmp_path):
    # the server applies each gradient as it comes, and with one worker they come in order:
    # the same updates as one rank alone, in float64 to rounding
    args = ["--data", data, "--global-batch", "8", "--dtype", "float64", "--lr", "0.05", "--checkpoint-every", "3",
            "--log-every", "2"]
    train(args + ["--out", str(tmp_path / "one"), "--max-steps", "6"])
    train(args + ["--out", str(tmp_path / "async"), "--max-steps", "6", "--sync", "async"], ranks=2)
    assert_same_state(tmp_path / "async", tmp_path / "one", 6)
    assert [r["step"] for r in train_records(tmp_path / "async")] == [2, 4, 6]
    assert evaluations(tmp_path / "async")[-1]["images"] == 61   # the final evaluation, by both ranks
    # stopped at step 3 and resumed: the same weights as the straight run, and the same
    # metrics lines: the line at step 4 averages steps 3 and 4, step 3's loss carried over
    # in the checkpoint (3: the first part's own last line)
    train(args + ["--out", str(tmp_path / "parts"), "--max-steps", "3", "--sync", "async"], ranks=2)
    result = train(args + ["--out", str(tmp_path / "parts"), "--max-steps", "6", "--sync", "async",
                           "--resume", "auto"], ranks=2)
    assert "resuming at step 3" in result.stdout
    assert_same_state(tmp_path / "parts", tmp_path / "async", 6, rtol=0, atol=0)
    assert [(r["step"], r["loss"], r["lr"]) for r in train_records(tmp_path / "parts") if r["step"] != 3] == \
        [(r["step"], r["loss"], r["lr"]) for r in train_records(tmp_path / "async")]
    # a finished run resumed once more: its last checkpoint says it was evaluated
    train(args + ["--out", str(tmp_path / "parts"), "--max-steps", "6", "--sync", "async", "--resume", "auto"],
          ranks=2)
    assert [r["step"] for r in evaluations(tmp_path / "parts")] == [3, 6]


@pytest.mark.cuda
def test_one_worker_on_a_gpu_equals_one_rank_on_the_gpu(data, tmp_path):
    """The exchange through host buffers (FlatParameters) on the CUDA backend: server and
    worker share one GPU; float64, so only the order of cuDNN's and cuBLAS's sums differs."""
    if visible_gpus() < 1:
        pytest.skip("no GPU visible to pycuda (needs pycuda and a CUDA driver); on a GPU node run scripts/gpu-check.sh")
    args = ["--data", data, "--global-batch", "8", "--dtype", "float64", "--max-steps", "3", "--lr", "0.05",
            "--backend", "cuda"]
    env = dict(ENV, MPICONVNET_ALLOW_GPU_SHARING="1",
               CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    train(args + ["--out", str(tmp_path / "one")], env=env)
    train(args + ["--out", str(tmp_path / "async"), "--sync", "async"], ranks=2, env=env)
    assert_same_state(tmp_path / "async", tmp_path / "one", 3, rtol=1e-9, atol=1e-12)


def test_two_workers_train_every_batch_of_every_epoch(data, tmp_path):
    run = tmp_path / "run"
    # 96 images, global batch 16: each worker gets 8 images a batch, 6 batches an epoch;
    # the server counts 2 pushed batches as one step
    result = train(["--data", data, "--global-batch", "16", "--epochs", "2", "--lr", "0.02", "--sync", "async",
                    "--async-every", "2", "--out", str(run)], ranks=3)
    assert "asynchronous: rank 0 serves the weights to 2 worker(s)" in result.stdout
    assert sorted(int(f[5:13]) for f in os.listdir(run / "checkpoints")) == [6, 12]
    records = train_records(run)
    assert records[-1]["step"] == 12 and all(np.isfinite(r["loss"]) for r in records)
    assert all(r["time_compute"] > 0 for r in records)
    # the largest peak resident set of the three processes: tens of MB for this small net
    assert all(20 < r["memory_mb"] < 4000 for r in records)
    first, last = params_at(run, 6)[0], params_at(run, 12)[0]
    assert max(np.abs(first[n] - last[n]).max() for n in first) > 0
    assert evaluations(run)[-1]["images"] == 61


def test_each_worker_reads_its_own_share_and_an_epoch_every_image_once(data, tmp_path):
    # each rank notes the images its sampler hands out and the dropout masks it draws: the
    # two workers' shares of an epoch together hold each of the 96 images once, as one
    # rank's epoch does, and their masks are the global batch's rows, not one mask twice
    note_images = note_sampled_images(tmp_path) + f"""
import hashlib
from mpiconvnet import layers
dropout = layers.Dropout.forward
def masked(self, x, ctx):
    y = dropout(self, x, ctx)
    if self.mask is not None:
        with open(os.path.join({str(tmp_path)!r}, "masks-" + rank), "a") as f:
            f.write(f"{{ctx.step}} {{self.index}} {{hashlib.sha1(self.mask.tobytes()).hexdigest()}}\\n")
    return y
layers.Dropout.forward = masked
"""
    train(["--data", data, "--global-batch", "16", "--epochs", "2", "--sync", "async", "--out", str(tmp_path / "run")],
          ranks=3, patch=note_images)
    assert not os.path.exists(tmp_path / "images-0")     # the server reads no training images
    per_epoch = {0: [], 1: []}
    for worker in (1, 2):
        with open(tmp_path / f"images-{worker}") as f:
            for line in f:
                epoch, *indices = map(int, line.split())
                per_epoch[epoch] += indices
    for epoch, indices in per_epoch.items():
        assert sorted(indices) == list(range(96)), epoch
    masks = []
    for worker in (1, 2):
        with open(tmp_path / f"masks-{worker}") as f:
            masks.append(dict(((step, layer), digest) for step, layer, digest in map(str.split, f)))
    assert len(masks[0]) == len(masks[1]) == 12 * 2          # 12 batches, 2 dropout layers
    assert all(masks[0][key] != masks[1][key] for key in masks[0])


def test_the_server_applies_the_mean_of_a_push_at_the_lr_of_the_global_step():
    # a push of k batches brings their summed gradients: the server applies their mean once,
    # at the lr of the global step it has reached, `workers` pushed batches making a step
    from types import SimpleNamespace

    from mpiconvnet.async_sgd import ParameterServer
    from mpiconvnet.config import resolve
    from mpiconvnet.models import build_model
    from mpiconvnet.optim import SGD, LearningRate
    net = build_model("alexnet-mini", num_classes=5, dtype="float64", seed=0)
    cfg = resolve(["--lr", "0.1", "--schedule", "step", "--lr-step-epochs", "1", "--lr-gamma", "0.5"])
    trainer = SimpleNamespace(world=SimpleNamespace(comm=None), net=net, step=0, workers=2, restored_window={},
                              optimizer=SGD(net.ops, net.params, momentum=0.0, weight_decay=0.0, bias_lr_mult=1.0),
                              schedule=LearningRate(cfg, steps_per_epoch=1))
    server = ParameterServer(trainer)
    rng = np.random.default_rng(0)
    # global steps before each push: 0, 2 // 2, 3 // 2, 4 // 2; one step an epoch, lr halved each
    for batches, lr in zip([2, 1, 1, 2], [0.1, 0.05, 0.05, 0.025]):
        grads = [{n: rng.standard_normal(s) for n, s in net.param_shapes.items()} for _ in range(batches)]
        before = {n: p.copy() for n, p in net.params.items()}
        for name, view in server.received.views.items():
            view[...] = sum(g[name] for g in grads)
        server._apply(batches)
        for name in net.params:
            mean = sum(g[name] for g in grads) / batches
            np.testing.assert_allclose(net.params[name], before[name] - lr * mean, rtol=1e-12, atol=1e-15,
                                       err_msg=name)


def start_long_run(run, args):
    """3 ranks training far longer than any test, in the background; returns once the
    first checkpoint exists."""
    proc = subprocess.Popen([MPIEXEC, "-n", "3", PYTHON, "-m", "mpiconvnet.train"] + TINY + args + ["--out", run],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint_then(proc, os.path.join(run, "checkpoints"), lambda: None)
    return proc


def test_sigterm_stops_every_rank_with_a_checkpoint_and_the_run_resumes(data, tmp_path):
    run = str(tmp_path / "run")
    args = ["--data", data, "--global-batch", "16", "--epochs", "400", "--checkpoint-every", "2", "--sync", "async"]
    proc = start_long_run(run, args)
    folder = os.path.join(run, "checkpoints")
    proc.send_signal(signal.SIGTERM)   # mpiexec passes it on to every rank, as SLURM does
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "checkpoint written, continue with --resume auto" in out
    stopped_at = max(int(f[5:13]) for f in os.listdir(folder))
    result = train(args + ["--out", run, "--resume", "auto", "--max-steps", str(stopped_at + 2)], ranks=3)
    assert f"resuming at step {stopped_at}" in result.stdout
    params_at(run, stopped_at + 2)


def mpi_rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"PMI_RANK"])


@pytest.mark.parametrize("stopped, message", [
    # while worker 1 keeps pushing; the second: worker 2 was stopped between its push and
    # taking the weights sent back, which the server waits for before serving worker 1
    (2, r"rank 0: (workers \[2\] sent nothing|worker 2 took nothing|worker 2 sent a header but not its "
        r"gradients) for 3 s"),
    (0, r"rank [12]: no answer from the parameter server \(rank 0\) for 6 s"),
])
def test_a_hung_rank_is_named_after_the_stall_timeout(data, tmp_path, stopped, message):
    run = str(tmp_path / "run")
    proc = start_long_run(run, ["--data", data, "--global-batch", "16", "--epochs", "400", "--checkpoint-every", "2",
                                "--sync", "async", "--stall-timeout", "3"])
    out = subprocess.run(["pgrep", "-f", "mpiconvnet.train"], capture_output=True, text=True).stdout.split()
    ranks = {mpi_rank_of(int(p)): int(p) for p in out if int(p) != proc.pid and _is_descendant(int(p), proc.pid)}
    assert sorted(ranks) == [0, 1, 2], ranks
    with hung(ranks[stopped]):
        _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert re.search(message, err), err


def _ranks_of(proc):
    out = subprocess.run(["pgrep", "-f", "mpiconvnet.train"], capture_output=True, text=True).stdout.split()
    return {mpi_rank_of(int(p)): int(p) for p in out if int(p) != proc.pid and _is_descendant(int(p), proc.pid)}


def test_a_server_pause_shorter_than_the_workers_limit_blames_no_one(data, tmp_path):
    # the server stopped for 1.5x --stall-timeout (a slow checkpoint): the workers' headers
    # wait in its queue meanwhile, and a header waiting there is not a silent worker
    run = str(tmp_path / "run")
    proc = start_long_run(run, ["--data", data, "--global-batch", "16", "--epochs", "400", "--checkpoint-every", "2",
                                "--sync", "async", "--stall-timeout", "3"])
    server = _ranks_of(proc)[0]
    os.kill(server, signal.SIGSTOP)
    time.sleep(4.5)
    os.kill(server, signal.SIGCONT)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err


def test_a_worker_that_finishes_long_before_another_waits_for_it(data, tmp_path):
    # worker 2 runs at a quarter of worker 1's speed (stopped 0.3 s of every 0.4 s: a push
    # takes it ~0.5 s, far from --stall-timeout), so worker 1 is done seconds before it, more
    # than the 2x --stall-timeout a finished worker waits: the run still ends well, the
    # server telling the finished worker it still serves
    run = str(tmp_path / "run")
    proc = subprocess.Popen([MPIEXEC, "-n", "3", PYTHON, "-m", "mpiconvnet.train"] + TINY +
                            ["--data", data, "--global-batch", "16", "--epochs", "12", "--sync", "async",
                             "--stall-timeout", "3", "--checkpoint-every", "0", "--out", run],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while sorted(ranks := _ranks_of(proc)) != [0, 1, 2]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    slow = ranks[2]
    try:
        while proc.poll() is None:
            os.kill(slow, signal.SIGSTOP)
            time.sleep(0.3)
            os.kill(slow, signal.SIGCONT)
            time.sleep(0.1)
    except ProcessLookupError:
        pass
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert evaluations(run)[-1]["step"] == 12 * 6


def test_a_nonfinite_loss_ends_every_rank_with_exit_4(data, tmp_path):
    result = train(["--data", data, "--global-batch", "16", "--epochs", "3", "--lr", "1e6", "--sync", "async",
                    "--out", str(tmp_path / "run")], ranks=3, check=False)
    assert result.returncode == 4, result.stderr
    assert "loss became" in result.stderr


@pytest.mark.parametrize("ranks, extra, message", [
    (1, [], "--sync async needs at least 2 ranks"),
    (3, ["--global-batch", "15"], "--global-batch 15 does not divide by 2 workers"),
    (2, ["--parallel", "hybrid"], "--parallel hybrid needs --sync grads"),
    (2, ["--async-every", "0"], "--async-every must be at least 1"),
])
def test_refusals_are_one_line_and_exit_2(data, tmp_path, ranks, extra, message):
    result = train(["--data", data, "--out", str(tmp_path / "run"), "--global-batch", "16", "--sync", "async"] + extra,
                   ranks=ranks, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(set(result.stderr.strip().splitlines())) == 1, result.stderr


def test_the_server_logs_the_largest_memory_high_water_of_any_rank():
    from types import SimpleNamespace
    from mpiconvnet.async_sgd import HEADER_SIZE, PUSH, _Window

    class Log(list):
        write = list.append

    def logged(server_mb, workers_mb):
        ops = SimpleNamespace(memory_high_water=lambda: server_mb * 2**20)
        server = SimpleNamespace(step=4, steps_per_epoch=2, schedule=SimpleNamespace(at=lambda step: 0.1),
                                 net=SimpleNamespace(ops=ops))
        window, log = _Window(), Log()
        for mb in workers_mb:
            header = np.array([PUSH, 1, 2.0, 0.1, 0.2, 0.3, mb * 2**20])
            assert header.size == HEADER_SIZE
            window.add(header, 8)
        window.write(server, log, None)
        return log[-1]["memory_mb"]

    assert logged(300, [200, 500, 100]) == 500
    assert logged(300, [200, 100]) == 300
