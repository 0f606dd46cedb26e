"""jobs/*.sbatch without SLURM: every #SBATCH line explains itself, bash parses every script,
each refuses to run outside a job with a message naming the fix, and when asked to run
anyway (MPICONVNET_OUTSIDE_SLURM=1) the same script bodies train, stop on a signal and
evaluate. The submitted versions run in tests/test_slurm.py."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.data_fixtures import write_tiny_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["jobs/preprocess.sbatch", "jobs/train.sbatch", "jobs/evaluate.sbatch"]
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TINY = ["--backend", "numpy", "--model", "alexnet-mini", "--workers", "0", "--global-batch", "8", "--log-every", "1"]


def outside_slurm_env(**extra):
    """The environment of a login shell: no SLURM job variables, one BLAS thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MPICONVNET_PYTHON=sys.executable)
    env.update(extra)
    return env


def run_script(script, args, timeout=120, **env):
    return subprocess.run(["bash", script] + args, cwd=ROOT, env=outside_slurm_env(**env), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_sbatch_line_carries_a_comment(script):
    with open(os.path.join(ROOT, script)) as f:
        lines = [line.rstrip("\n") for line in f]
    options = [line for line in lines if re.match(r"#+SBATCH\b", line)]
    assert len(options) >= 6, f"{script}: expected the #SBATCH header, found {options}"
    for line in options:
        # sbatch stops reading a line at ' #', so the explanation sits after the option
        assert re.match(r"#+SBATCH +--?\S+( +\S+)? +# +\S", line), f"{script}: no comment on: {line}"
    # the header must come before the first command, or sbatch ignores the rest of it
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(lines.index(line) < first_command for line in options), f"{script}: #SBATCH after a command"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_requeued_job_appends_to_its_log(script):
    # SLURM requeues a job itself on a node failure (JobRequeue=1): by default it truncates
    # the log, losing the first attempt's lines
    with open(os.path.join(ROOT, script)) as f:
        assert re.search(r"^#SBATCH --open-mode=append ", f.read(), re.M), script


def test_gpu_requests_are_left_to_the_site():
    # a GPU request the cluster cannot meet is rejected at submission, so none is active
    for script in SCRIPTS:
        with open(os.path.join(ROOT, script)) as f:
            active = [line for line in f if line.startswith("#SBATCH") and re.search(r"--(gres|gpus)", line)]
        assert not active, f"{script}: active GPU request {active}"


@pytest.mark.parametrize("script", SCRIPTS + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "scripts", "*.sh"))))
def test_bash_parses_the_script(script):
    result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_outside_slurm_the_script_refuses_and_says_how_to_submit(script):
    result = run_script(script, ["--data", "/nonexistent"])
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert f"{script}: not inside a SLURM job" in message and f"sbatch {script}" in message
    assert "MPICONVNET_OUTSIDE_SLURM=1" in message
    assert result.stdout == ""   # nothing was launched


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("shards")), 64, 20, 5, 64, shard_size=16)


def test_asked_to_run_outside_slurm_train_and_evaluate_scripts_work(data, tmp_path):
    run = str(tmp_path / "run")
    trained = run_script("jobs/train.sbatch", ["--data", data, "--max-steps", "3"] + TINY,
                         MPICONVNET_OUTSIDE_SLURM="1", MPICONVNET_RUN_DIR=run)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "on 1 rank(s)" in trained.stdout and "training finished" in trained.stdout
    assert os.path.exists(os.path.join(run, "checkpoints", "ckpt-00000003.h5"))
    evaluated = run_script("jobs/evaluate.sbatch", ["--data", data, "--checkpoint", run, "--workers", "0", "--json"],
                           MPICONVNET_OUTSIDE_SLURM="1")
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["images"] == 20 and 0 <= result["top1"] <= result["top5"] <= 1


def test_an_out_flag_on_the_command_line_is_the_run_directory_the_script_reports(data, tmp_path):
    run = str(tmp_path / "mine")
    trained = run_script("jobs/train.sbatch", ["--data", data, "--max-steps", "1", "--out", run] + TINY,
                         MPICONVNET_OUTSIDE_SLURM="1", MPICONVNET_RUN_DIR=str(tmp_path / "default"))
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert f"training finished; run directory {run}\n" in trained.stdout
    assert os.path.isdir(os.path.join(run, "checkpoints")) and not os.path.exists(tmp_path / "default")


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason=f"no mpiexec next to {sys.executable}")
def test_the_launcher_override_starts_that_many_ranks(data, tmp_path):
    trained = run_script("jobs/train.sbatch", ["--data", data, "--max-steps", "2"] + TINY,
                         MPICONVNET_OUTSIDE_SLURM="1", MPICONVNET_RUN_DIR=str(tmp_path / "run"),
                         MPICONVNET_LAUNCH=f"{MPIEXEC} -n 2")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "on 2 rank(s)" in trained.stdout


def test_usr1_to_the_script_reaches_the_trainer_which_stops_with_a_checkpoint(data, tmp_path):
    # the path of --signal=B:USR1@120: the batch shell gets the signal and must forward it
    run = str(tmp_path / "run")
    proc = subprocess.Popen(["bash", "jobs/train.sbatch", "--data", data, "--epochs", "500", "--checkpoint-every", "2"]
                            + TINY, cwd=ROOT, env=outside_slurm_env(MPICONVNET_OUTSIDE_SLURM="1",
                                                                    MPICONVNET_RUN_DIR=run),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = os.path.join(run, "checkpoints")
    deadline = time.monotonic() + 60
    while not (os.path.isdir(folder) and os.listdir(folder)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, out + err
    assert "stopped by SIGUSR1" in out
    assert f"run the same command again to continue {run}" in err
    resumed = run_script("jobs/train.sbatch", ["--data", data, "--epochs", "500", "--checkpoint-every", "2",
                                               "--max-steps", "40"] + TINY,
                         MPICONVNET_OUTSIDE_SLURM="1", MPICONVNET_RUN_DIR=run)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming at step" in resumed.stdout


def test_gpu_check_only_runs_the_named_steps_and_always_the_set_up():
    # gpu-check's step filter, sourced alone (the script itself needs a GPU node)
    text = open(os.path.join(ROOT, "scripts/gpu-check.sh")).read()
    functions = text[text.index("SETUP_STEPS="):text.index("\nstep() {")]
    names = ["machine", "shards", "cuda-tests", "cuda-tests-legacy", "bench-input-owt-tf32",
             "bench-alexnet-owt-tf32-legacy", "train-1gpu"]
    probe = functions + "\nfor n in " + " ".join(names) + "; do selected $n && echo $n; done; true\n"

    def chosen(only):
        result = subprocess.run(["bash", "-c", probe], env={**os.environ, "ONLY": only}, capture_output=True,
                                text=True, check=True, cwd=ROOT)
        return result.stdout.split()

    assert chosen("") == names
    assert chosen("cuda-tests,bench-input-*") == ["machine", "shards", "cuda-tests", "bench-input-owt-tf32"]
    assert chosen("*-legacy") == ["machine", "shards", "cuda-tests-legacy", "bench-alexnet-owt-tf32-legacy"]


def test_gpu_check_on_a_node_without_a_gpu_stops_before_installing_anything(tmp_path):
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("a CUDA driver loads here: gpu-check would run for real")
    except OSError:
        pass
    venv = tmp_path / "venv-gpu"
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts/gpu-check.sh"), str(tmp_path / "out")],
                            env={**os.environ, "VENV": str(venv), "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "gpu-check: no CUDA driver (libcuda.so.1 does not load" in result.stderr and "run it on a GPU node" in result.stderr
    assert not venv.exists()
    assert "| gpu | **FAIL**: no CUDA driver" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("stop, code, said", [
    (signal.SIGUSR1, 75, "USR1 arrived before the trainer could take it"),
    (signal.SIGTERM, 143, "(TERM) while the trainer was starting (killed by it in its set-up); nothing is lost")])
def test_a_stop_before_the_trainer_takes_it_is_not_a_failure(data, tmp_path, stop, code, said):
    # the signal lands while the trainer is still starting, which kills it: nothing is lost
    # since the last checkpoint, so the script stops (USR1: and would requeue) as after one,
    # instead of reporting exit 10 or 15 as "2 bad input, 3 ...". The trainer's python is one
    # that sleeps instead (its signals' actions the default: what the trainer's are until it
    # sets its own), so the signal always lands before a handler could take it
    run = str(tmp_path / "run")
    slow_python = tmp_path / "slow-python"
    slow_python.write_text(f'#!/bin/sh\nexec {sys.executable} -c "import time; time.sleep(30)" "$@"\n')
    slow_python.chmod(0o755)
    proc = subprocess.Popen(["bash", "jobs/train.sbatch", "--data", data, "--epochs", "500"] + TINY, cwd=ROOT,
                            env=outside_slurm_env(MPICONVNET_OUTSIDE_SLURM="1", MPICONVNET_RUN_DIR=run,
                                                  MPICONVNET_PYTHON=str(slow_python)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "python.*mpiconvnet.train"],
                                 capture_output=True).stdout:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.002)
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # the script and the trainer it started
            proc.communicate()
    assert proc.returncode == code, out + err
    assert said in out + err
    assert "bad input" not in err and (f"run the same command again to continue {run}" in err
                                       or f"MPICONVNET_RUN_DIR={run} sbatch" in err), out + err


def test_evaluate_script_without_arguments_is_one_line(tmp_path):
    result = run_script("jobs/evaluate.sbatch", [], MPICONVNET_OUTSIDE_SLURM="1")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("jobs/evaluate.sbatch: no arguments; use 'sbatch jobs/evaluate.sbatch --data DIR "
                                     "--checkpoint RUN_DIR' (see python -m mpiconvnet.evaluate --help)")


@pytest.mark.parametrize("script, args, option", [
    ("jobs/train.sbatch", ["--data", "/data/x", "--time=5"], "--time=5"),
    # an option whose value is the next argument is moved with it: "sbatch -p jobs/..." would
    # take the script's name for the partition
    ("jobs/evaluate.sbatch", ["--data", "/data/x", "--checkpoint", "runs/a", "-p", "short"], "-p short"),
    ("jobs/train.sbatch", ["--time", "2:00:00", "--data", "/data/x"], "--time 2:00:00"),
    ("jobs/train.sbatch", ["--data", "/data/x", "-t5"], "-t5"),
    ("jobs/preprocess.sbatch", ["folder", "--requeue", "--train", "t"], "--requeue"),
    ("jobs/preprocess.sbatch", ["--array=0-3", "folder", "--train", "t", "--out", "o"], "--array=0-3"),
])
def test_an_sbatch_option_after_the_script_name_is_refused_saying_where_it_goes(script, args, option):
    # sbatch reads options only before the script; after it they went to the entry point,
    # which said "unknown flag --time", and preprocess ran '--array=0-3' as a subcommand
    result = run_script(script, args, MPICONVNET_OUTSIDE_SLURM="1")
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{script}: {option} is an sbatch option, but after the script name it would go to "
                              "python -m "), message
    assert message.endswith(f"put it before: sbatch {option} {script} ..."), message


def test_entry_point_flags_are_not_taken_for_sbatch_options(data, tmp_path):
    # the check must not catch a flag of the trainer whose name starts like sbatch's
    run = str(tmp_path / "run")
    trained = run_script("jobs/train.sbatch", ["--data", data, "--max-steps", "1", "--resume", "auto", "--mean",
                                               "image", "--parallel", "data", "--out", run] + TINY,
                         MPICONVNET_OUTSIDE_SLURM="1")
    assert trained.returncode == 0, trained.stdout + trained.stderr


def sbatch_option_refusal(script, args):
    """The script's refusal of sbatch options after its name, run alone on `args`."""
    with open(os.path.join(ROOT, script)) as f:
        text = f.read()
    loop = text[text.index("given=("):]
    loop = loop[:loop.index("\ndone\n") + len("\ndone\n")]
    return subprocess.run(["bash", "-c", f"script={script}\n{loop}", script, *args], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("script, helps", [
    ("jobs/train.sbatch", [["mpiconvnet.train"]]),
    ("jobs/evaluate.sbatch", [["mpiconvnet.evaluate"]]),
    ("jobs/preprocess.sbatch", [["preprocess", command] for command in ("imagenet", "folder", "synth", "verify")])])
def test_no_flag_of_the_entry_point_is_taken_for_an_sbatch_option(script, helps):
    # every flag its --help lists, and values that start with '-' (a negative number)
    flags = set()
    for command in helps:
        shown = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, timeout=60)
        flags |= set(re.findall(r"^  (-{1,2}[a-z][a-z0-9-]*)", shown.stdout, re.M))
    assert len(flags) > 5, flags
    for arg in sorted(flags) + ["-1", "-0.5", "-1e-3"]:
        result = sbatch_option_refusal(script, [arg])
        assert result.returncode == 0 and result.stderr == "", f"{arg}: {result.stderr}"
    assert sbatch_option_refusal(script, ["--time=5"]).returncode == 2   # the check does run here


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_sbatch_option_the_readme_says_a_site_edits_is_marked_site(script):
    # jobs/README.md says every line a cluster may need to change is marked SITE; a site with
    # 8 GPUs or 2 cores per node changes --ntasks-per-node and --cpus-per-task, which were not
    with open(os.path.join(ROOT, "jobs/README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## What a site edits"):]
    section = section[:section.index("\n## ")]
    named = {option for quoted in re.findall(r"`([^`]*)`", section) for option in re.findall(r"--[a-z-]+", quoted)}
    with open(os.path.join(ROOT, script)) as f:
        options = [line for line in f if re.match(r"#+SBATCH\b", line)]
    edited = [line for line in options if re.match(r"#+SBATCH +(--[a-z-]+)", line).group(1) in named]
    assert {"--partition", "--account", "--ntasks-per-node", "--cpus-per-task", "--time"} <= named
    assert len(edited) >= 5, edited
    for line in edited:
        assert "# SITE:" in line, f"{script}: jobs/README.md names this option under 'What a site edits': {line}"
