"""jobs/*.sbatch submitted to a real SLURM cluster, as users submit them, with the overrides
a 2-core node needs on the sbatch command line (partition, -N1 -n2, --time, no GPU) and
the CPU backend on a tiny data set.

    bash scripts/local-slurm.sh start          # one-node cluster on localhost (root, Debian)
    eval "$(bash scripts/local-slurm.sh env)"  # SLURM_CONF, the only way to reach it
    MPICONVNET_REQUIRE_SLURM=1 python -m pytest -m slurm tests/test_slurm.py
    bash scripts/local-slurm.sh stop

Without a cluster every test here is skipped with the reason; with MPICONVNET_REQUIRE_SLURM=1
(CI) that is a failure instead. Each job's world size is checked from what the ranks print,
because srun with the wrong --mpi starts N singletons of size 1 (which training,
evaluation and preprocess now refuse, each with one line).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from tests.data_fixtures import write_tiny_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a 2-core CI node can give: one node, two ranks of one core each, no GPU
NODE = ["-N1", "-n2", "--ntasks-per-node=2", "-c1"]
TRAIN = ["--backend", "numpy", "--model", "alexnet-mini", "--workers", "0", "--global-batch", "8",
         "--eval-every", "0", "--log-every", "10"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}

pytestmark = pytest.mark.slurm


def _cluster_problem():
    """None when a SLURM cluster answers and has a usable node, else why not."""
    for tool in ("sbatch", "scontrol", "sinfo", "scancel"):
        if not shutil.which(tool):
            return f"{tool} not found"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "scontrol ping / sinfo hung"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines() or ["nothing"]
        return f"scontrol ping: no slurmctld answers (last words: {said[-1][:100]})"
    if not re.search(r"^(idle|mixed|allocated)", nodes.stdout, re.M):
        return f"sinfo: no node is up (states: {' '.join(nodes.stdout.split()) or 'none'})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = _cluster_problem()
    if problem:
        message = (f"no SLURM cluster: {problem}; start one with: bash scripts/local-slurm.sh start; "
                   'eval "$(bash scripts/local-slurm.sh env)"')
        if os.environ.get("MPICONVNET_REQUIRE_SLURM") == "1":
            pytest.fail(message + " (MPICONVNET_REQUIRE_SLURM=1)")
        pytest.skip(message)
    partition = os.environ.get("MPICONVNET_SLURM_PARTITION")
    if not partition:
        names = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
        partition = next((p.rstrip("*") for p in names if p.endswith("*")), names[0].rstrip("*"))
    return partition


class Job:
    """One submitted batch job: its id, its log, and scontrol's view of it."""

    def __init__(self, partition, script, script_args, log, sbatch_args=(), **env):
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_JOB", "SBATCH_"))}
        environment.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MPICONVNET_PYTHON=sys.executable, **env)
        command = (["sbatch", "--parsable", "-p", partition, "--time=5", "--output", str(log)] + NODE
                   + list(sbatch_args) + [os.path.join(ROOT, script)] + list(script_args))
        # submitted from the checkout, so `python -m mpiconvnet` resolves even when not installed
        result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
        self.id = result.stdout.strip().split(";")[0]
        self.log = str(log)

    def info(self):
        shown = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))

    def wait(self, timeout, until=FINISHED, after_restarts=0):
        """scontrol's view once the job is in a state of `until` with at least that many restarts."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if info.get("JobState") in until and (info.get("JobState") in FINISHED
                                                  or int(info.get("Restarts", 0)) >= after_restarts):
                return info
            if time.monotonic() > deadline:
                subprocess.run(["scancel", self.id], timeout=30)
                raise AssertionError(f"job {self.id} still {info.get('JobState')} after {timeout} s\n{self.output()}")
            time.sleep(0.5)

    def output(self):
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return f"(no log at {self.log})"

    def cancel(self):
        subprocess.run(["scancel", "--quiet", self.id], timeout=30)

    def wait_for_first_metrics(self, run, timeout=120):
        """Until training is under way: the run's first metrics.jsonl line is written."""
        first_line = os.path.join(run, "metrics.jsonl")
        deadline = time.monotonic() + timeout
        while not (os.path.exists(first_line) and os.path.getsize(first_line)):
            assert time.monotonic() < deadline and self.info()["JobState"] not in FINISHED, self.output()
            time.sleep(0.1)


def assert_completed(job, info):
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"job {job.id} {info['JobState']} exit {info['ExitCode']}\n{job.output()}"


def final_params(run, step):
    with h5py.File(os.path.join(run, "checkpoints", f"ckpt-{step:08d}.h5"), "r") as f:
        return {name: f["params"][name][()] for name in f["params"]}


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def logged_steps(total, every=10):
    return sorted(set(range(every, total + 1, every)) | {total})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 32 steps per epoch at global batch 8
    return write_tiny_dataset(str(tmp_path_factory.mktemp("shards")), 256, 20, 5, 64, shard_size=64)


# checkpoints only at epoch ends, as in the time-limit test, whose work is sized by this run's speed
UNINTERRUPTED = ["--epochs", "3"]
UNINTERRUPTED_STEPS = 96


@pytest.fixture(scope="module")
def uninterrupted(cluster, data, tmp_path_factory):
    """A training job that nothing stops: the reference for the requeue tests."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    run = str(folder / "run")
    job = Job(cluster, "jobs/train.sbatch", ["--data", data] + TRAIN + UNINTERRUPTED, folder / "train.out",
              MPICONVNET_RUN_DIR=run)
    try:
        info = job.wait(180)
    finally:
        job.cancel()
    return job, info, run


def test_the_local_cluster_is_reached_only_through_slurm_conf(cluster):
    # scripts/local-slurm.sh used to link /etc/slurm/slurm.conf to its config, which made it
    # every shell's cluster: a test run in another checkout, which should have skipped these
    # tests, submitted its jobs to it, and this cluster's stop cancelled them
    ours = os.environ.get("SLURM_CONF")
    if not ours or "mpiconvnet-ci" not in open(ours).read():
        pytest.skip("not a cluster of scripts/local-slurm.sh (SLURM_CONF does not name its config)")
    environment = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    shown = subprocess.run(["scontrol", "show", "config"], env=environment, capture_output=True, text=True,
                           timeout=30)
    reached = re.search(r"^SLURM_CONF\s*=\s*(\S+)", shown.stdout, re.M) if shown.returncode == 0 else None
    assert not (reached and os.path.realpath(reached.group(1)) == os.path.realpath(ours)), \
        f"a shell without SLURM_CONF reaches {ours} (through /etc/slurm/slurm.conf?)"
    assert os.path.realpath("/etc/slurm/slurm.conf") != os.path.realpath(ours)


def test_preprocess_packs_disjoint_shards_on_two_mpi_ranks_and_as_an_array(cluster, tmp_path):
    images = str(tmp_path / "images")
    subprocess.run([sys.executable, "-m", "preprocess", "synth", "--out", images, "--classes", "4", "--per-class", "12",
                    "--val-per-class", "3", "--size", "96x72"], cwd=ROOT, check=True, capture_output=True)
    args = ["folder", "--train", f"{images}/train", "--val", f"{images}/val", "--image-size", "64",
            "--shard-size", "8"]
    ranks = Job(cluster, "jobs/preprocess.sbatch", args + ["--out", str(tmp_path / "ranks")], tmp_path / "ranks.out")
    array = Job(cluster, "jobs/preprocess.sbatch", args + ["--out", str(tmp_path / "array")], tmp_path / "array_%a.out",
                sbatch_args=["--array=0-1", "-n1", "--ntasks-per-node=1"])
    try:
        assert_completed(ranks, ranks.wait(120))
        for _ in range(240):
            tasks = [subprocess.run(["scontrol", "show", "job", "-o", f"{array.id}_{i}"], capture_output=True,
                                    text=True).stdout for i in (0, 1)]
            if all(re.search(r"JobState=(\w+)", t).group(1) in FINISHED for t in tasks):
                break
            time.sleep(0.5)
    finally:
        ranks.cancel()
        array.cancel()
    logs = [open(tmp_path / f"array_{i}.out").read() for i in (0, 1)]
    for task, log in zip(tasks, logs):
        assert "JobState=COMPLETED" in task and "ExitCode=0:0" in task, log
    assert "array task 0 of 2" in logs[0] and "array task 1 of 2" in logs[1]

    log = ranks.output()
    assert "2 rank(s) on 1 node(s)" in log
    # only rank 0 of a real 2-rank world reports; singletons would each pack everything and report
    assert log.count("preprocess: packed 48 train, 12 val images") == 1, log
    with open(tmp_path / "ranks" / "dataset.json") as f:
        by_ranks = json.load(f)
    with open(tmp_path / "array" / "dataset.json") as f:
        by_array = json.load(f)
    assert by_ranks["splits"]["train"]["num_images"] == 48 and by_ranks["splits"]["val"]["num_images"] == 12
    # the plan is deterministic, so MPI ranks and array tasks pack the very same shards
    for split in ("train", "val"):
        assert [s["sha256"] for s in by_ranks["splits"][split]["shards"]] == \
               [s["sha256"] for s in by_array["splits"][split]["shards"]]
        for shard in by_ranks["splits"][split]["shards"]:
            assert os.path.exists(tmp_path / "ranks" / shard["file"])


def test_training_runs_two_ranks_to_the_end(uninterrupted):
    job, info, run = uninterrupted
    assert_completed(job, info)
    log = job.output()
    assert "mpiconvnet: alexnet-mini" in log and "on 2 rank(s), backend numpy" in log, log
    assert "attempt 1," in log and "training finished" in log and info["Restarts"] == "0"
    assert os.path.exists(os.path.join(run, "checkpoints", f"ckpt-{UNINTERRUPTED_STEPS:08d}.h5"))
    records = metrics(run)
    assert [r["step"] for r in records if r["kind"] == "train"] == logged_steps(UNINTERRUPTED_STEPS)
    assert [r["images"] for r in records if r["kind"] == "eval"] == [20]


def test_evaluate_prints_top1_and_top5_once_for_two_ranks(cluster, data, uninterrupted, tmp_path):
    _, _, run = uninterrupted
    job = Job(cluster, "jobs/evaluate.sbatch", ["--data", data, "--checkpoint", run, "--workers", "0"],
              tmp_path / "evaluate.out")
    try:
        assert_completed(job, job.wait(120))
    finally:
        job.cancel()
    log = job.output()
    assert "2 rank(s) on 1 node(s)" in log
    results = re.findall(rf"alexnet-mini at step {UNINTERRUPTED_STEPS} on val \(20 images, 1 crop\): "
                         r"top-1 ([\d.]+)\s+top-5 ([\d.]+)", log)
    assert len(results) == 1, log   # rank 0 alone prints; two lines would mean two worlds of one
    top1, top5 = map(float, results[0])
    final = [r for r in metrics(run) if r["kind"] == "eval"][-1]
    assert (top1, top5) == (round(final["top1"], 4), round(final["top5"], 4))


def test_srun_with_the_wrong_mpi_stops_every_task_with_one_line(cluster, data, uninterrupted, tmp_path):
    # a plugin MPICH does not speak starts each task as a world of one, which left alone
    # would give N singleton runs writing into the same place: each task says so and stops
    _, _, run = uninterrupted
    job = Job(cluster, "jobs/evaluate.sbatch", ["--data", data, "--checkpoint", run, "--workers", "0"],
              tmp_path / "evaluate.out", MPICONVNET_SRUN_MPI="none")
    try:
        info = job.wait(120)
    finally:
        job.cancel()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", job.output()
    assert len(re.findall(r"srun started 2 tasks but MPI sees each as a world of 1: srun's --mpi plugin does not "
                          r"match this MPI", job.output())) == 2, job.output()
    assert "top-1" not in job.output()


def test_usr1_to_the_batch_shell_checkpoints_requeues_and_matches_the_uninterrupted_run(cluster, data, uninterrupted,
                                                                                        tmp_path):
    # scancel --batch --signal=USR1 is what --signal=B:USR1@120 does at the time limit, and
    # what a user does to move a job off a node now: the script forwards it through srun
    run = str(tmp_path / "run")
    job = Job(cluster, "jobs/train.sbatch", ["--data", data] + TRAIN + UNINTERRUPTED, tmp_path / "train.out",
              MPICONVNET_RUN_DIR=run)
    try:
        # signal once training is under way: the first metrics line comes at step 10 of 96
        job.wait_for_first_metrics(run)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], check=True, timeout=30)
        info = job.wait(180)
    finally:
        job.cancel()
    assert_completed(job, info)
    log = job.output()
    stopped = re.search(r"stopped by SIGUSR1 after step (\d+); checkpoint written", log)
    assert stopped and int(stopped.group(1)) < UNINTERRUPTED_STEPS, log
    assert f"requeueing job {job.id} (next attempt 2)" in log
    assert "attempt 2," in log and f"resuming at step {stopped.group(1)}" in log
    assert info["Restarts"] == "1" and log.count("on 2 rank(s)") == 2
    whole = final_params(uninterrupted[2], UNINTERRUPTED_STEPS)
    split = final_params(run, UNINTERRUPTED_STEPS)
    for name in whole:
        np.testing.assert_array_equal(split[name], whole[name], err_msg=name)
    records = metrics(run)
    assert [r["step"] for r in records if r["kind"] == "train"] == logged_steps(UNINTERRUPTED_STEPS)
    reference = [r for r in metrics(uninterrupted[2]) if r["kind"] == "eval"]
    assert [(r["top1"], r["top5"], r["loss"]) for r in records if r["kind"] == "eval"] == \
           [(r["top1"], r["top5"], r["loss"]) for r in reference]


def test_requeueing_stops_at_the_limit_and_says_how_to_continue(cluster, data, tmp_path):
    run = str(tmp_path / "run")
    job = Job(cluster, "jobs/train.sbatch", ["--data", data] + TRAIN + UNINTERRUPTED, tmp_path / "train.out",
              MPICONVNET_RUN_DIR=run, MPICONVNET_MAX_REQUEUES="0")
    try:
        job.wait_for_first_metrics(run)
        subprocess.run(["scancel", "--signal=USR1", job.id], check=True, timeout=30)
        info = job.wait(120)
    finally:
        job.cancel()
    log = job.output()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "0", log
    assert "MPICONVNET_MAX_REQUEUES=0 requeues are used up; not requeueing; continue with " \
           f"MPICONVNET_RUN_DIR={run} sbatch jobs/train.sbatch (same flags)" in log
    assert any(name.startswith("ckpt-") for name in os.listdir(os.path.join(run, "checkpoints")))


def test_scancel_ends_the_job_for_good_after_a_checkpoint(cluster, data, tmp_path):
    # scancel sends TERM to the ranks and the batch shell; the ranks checkpoint and exit 75
    # as for a time limit, but a job that requeued itself now could never be cancelled
    run = str(tmp_path / "run")
    job = Job(cluster, "jobs/train.sbatch", ["--data", data] + TRAIN + ["--epochs", "500"], tmp_path / "train.out",
              MPICONVNET_RUN_DIR=run)
    try:
        job.wait_for_first_metrics(run)
        subprocess.run(["scancel", job.id], check=True, timeout=30)
        job.wait(60)
        time.sleep(3)   # a requeue would show by now as PENDING with Restarts=1
        info = job.info()
    finally:
        job.cancel()
    log = job.output()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log
    assert re.search(r"stopped by SIGTERM after step \d+; checkpoint written", log), log
    assert f"not requeueing; continue with MPICONVNET_RUN_DIR={run} sbatch jobs/train.sbatch (same flags)" in log
    assert "attempt 2" not in log


def test_scontrol_requeue_mid_run_resumes_without_asking_for_a_second_job(cluster, data, uninterrupted, tmp_path):
    # scontrol requeue (and preemption with PreemptMode=REQUEUE) ends the attempt with TERM to
    # the ranks and the batch shell, as scancel does, but SLURM queues the job again itself;
    # the script said "not requeueing; continue with MPICONVNET_RUN_DIR=... sbatch", which
    # followed would put a second job on the same run directory
    run = str(tmp_path / "run")
    job = Job(cluster, "jobs/train.sbatch", ["--data", data] + TRAIN + UNINTERRUPTED, tmp_path / "train.out",
              MPICONVNET_RUN_DIR=run)
    try:
        job.wait_for_first_metrics(run)
        subprocess.run(["scontrol", "requeue", job.id], check=True, timeout=30)
        info = job.wait(180)
    finally:
        job.cancel()
    assert_completed(job, info)
    log = job.output()
    stopped = re.search(r"stopped by SIGTERM after step (\d+); checkpoint written", log)
    assert stopped and int(stopped.group(1)) < UNINTERRUPTED_STEPS, log
    assert (f"SLURM requeued job {job.id} itself (scontrol requeue, or preemption); checkpoint written; attempt 2 "
            f"resumes from the newest checkpoint in {run} when the job starts again; nothing to submit") in log, log
    assert "not requeueing" not in log and "sbatch jobs/train.sbatch (same flags)" not in log, log
    assert info["Restarts"] == "1" and f"resuming at step {stopped.group(1)}" in log
    whole = final_params(uninterrupted[2], UNINTERRUPTED_STEPS)
    split = final_params(run, UNINTERRUPTED_STEPS)
    for name in whole:
        np.testing.assert_array_equal(split[name], whole[name], err_msg=name)
    assert [r["step"] for r in metrics(run) if r["kind"] == "train"] == logged_steps(UNINTERRUPTED_STEPS)


def median_steps_per_second(run):
    return float(np.median([r["images_per_s"] / 8 for r in metrics(run) if r["kind"] == "train"]))


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_the_time_limit_signal_requeues_the_job_until_training_finishes(cluster, data, uninterrupted, tmp_path):
    # The real path: --time=1 with --signal=USR1@20. slurmctld checks limits every 30 s and
    # signals at the first check within 20 + 30 s of the end, so USR1 reaches the ranks 10 to
    # 40 s into each attempt, and later attempts may be stopped again. The work is sized to
    # about 75 s at the speed of the uninterrupted run, so the first attempt cannot finish
    # before its signal. On a shared machine the speed can change several-fold within
    # minutes: a job that still finished inside its first minute was sized wrongly, not
    # wrong, so it is sized again from its own speed and submitted once more. After two
    # requeues the test raises the pending job's limit to 5 minutes (as a user may), so a
    # slow machine does not add a requeue every 30 s.
    rate = median_steps_per_second(uninterrupted[2])
    for sizing in (1, 2):
        steps = int(min(max(75 * rate, 300), 20000))
        run = str(tmp_path / f"run{sizing}")
        job = Job(cluster, "jobs/train.sbatch",
                  ["--data", data] + TRAIN + ["--epochs", str(steps // 32 + 1), "--max-steps", str(steps)],
                  tmp_path / f"train{sizing}.out", sbatch_args=["--time=1", "--signal=USR1@20"],
                  MPICONVNET_RUN_DIR=run)
        try:
            info = job.wait(420, until=FINISHED | {"PENDING"}, after_restarts=2)
            if info["JobState"] == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={job.id}", "TimeLimit=5"], check=True, timeout=30)
                info = job.wait(420)
        finally:
            job.cancel()
        if not (info["JobState"] == "COMPLETED" and info["Restarts"] == "0"):
            break
        rate = median_steps_per_second(run)
    assert_completed(job, info)
    log = job.output()
    restarts = int(info["Restarts"])
    assert restarts >= 1, f"the job finished before its time-limit signal twice; {steps} steps were too few\n{log}"
    stops = [int(s) for s in re.findall(r"stopped by SIGUSR1 after step (\d+)", log)]
    resumes = [int(s) for s in re.findall(r"resuming at step (\d+)", log)]
    assert len(stops) == restarts and resumes == stops and stops == sorted(stops), log
    assert log.count("on 2 rank(s)") == restarts + 1 and f"attempt {restarts + 1}," in log
    assert os.path.exists(os.path.join(run, "checkpoints", f"ckpt-{steps:08d}.h5"))
    records = metrics(run)
    assert [r["step"] for r in records if r["kind"] == "train"] == logged_steps(steps)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [steps]


def test_preprocess_synth_runs_once_in_a_job_of_two_tasks(cluster, tmp_path):
    # under srun both tasks wrote the same tars, one crashed on the other's rename
    out = tmp_path / "synth"
    job = Job(cluster, "jobs/preprocess.sbatch", ["synth", "--out", str(out), "--classes", "3", "--per-class", "4",
                                                  "--val-per-class", "2", "--size", "64x48", "--layout", "imagenet"],
              tmp_path / "synth.out")
    try:
        assert_completed(job, job.wait(120))
    finally:
        job.cancel()
    assert "synth runs as one process" in job.output()
    assert sorted(os.listdir(out)) == ["ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar",
                                       "ILSVRC2012_img_val.tar"]
