"""What MPI leaves on a node however the ranks end: MPICH's shared-memory segment in
/dev/shm, which is RAM that nothing frees once the job is gone (distributed.py,
unlink_mpi_segments)."""
import os
import signal
import subprocess

import pytest

from mpiconvnet.distributed import MPICH_SEGMENT, unlink_mpi_segments
from tests.test_train import ENV, MPIEXEC, PYTHON, needs_mpiexec

# each rank says its pid and the MPICH segments it maps once set up (as the trainer and
# evaluate do, or as preprocess does); then rank 0 aborts, as exit 3, 5 and evaluate's 130
# end a run and a failed pack ends, or every rank waits to be killed
RANK = r"""
import os, re, sys, time
if sys.argv[2] == "train":
    from mpiconvnet import distributed
    world = distributed.init("numpy")
else:
    from preprocess.parallel import make_team
    world = make_team()
with open("/proc/self/maps") as maps:
    segments = sorted(set(re.findall(r"/dev/shm/mpich_shm_\S+", maps.read())))
sys.stdout.write(" ".join(["segments", str(os.getpid()), *segments]) + "\n")   # one write: the ranks share the pipe
sys.stdout.flush()
world.barrier()
if sys.argv[1] == "abort" and world.rank == 0:
    world.abort(3)
time.sleep(60)
"""


@needs_mpiexec
@pytest.mark.parametrize("setup", ["train", "preprocess"])
@pytest.mark.parametrize("end", ["abort", "kill"])
def test_no_mpich_segment_is_left_in_dev_shm_however_the_ranks_end(end, setup):
    proc = subprocess.Popen([MPIEXEC, "-n", "2", PYTHON, "-c", RANK, end, setup], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        if end == "kill":   # the ranks, not mpiexec: a killed mpiexec leaves its own file in /tmp
            for line in lines:
                os.kill(int(line.split()[1]), signal.SIGKILL)   # the OOM killer, Slurm after KillWait
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert all(line.startswith("segments") for line in lines), f"{lines}\n{proc.stderr.read()}"
    segments = {name for line in lines for name in line.split()[2:]}
    assert segments, "this MPICH maps no segment in /dev/shm: nothing to check"
    assert sorted(s for s in segments if os.path.exists(s)) == []


def test_unlink_removes_only_the_mpich_segments_still_named(tmp_path):
    ours = f"{MPICH_SEGMENT}test_{os.getpid()}_0"
    other = f"/dev/shm/not_mpich_{os.getpid()}"
    for path in (ours, other):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
    maps = tmp_path / "maps"
    maps.write_text(f"7f00-7f01 rw-s 00000000 00:1a 11 {ours}\n"
                    f"7f01-7f02 rw-s 00000000 00:1a 12 {other}\n"
                    f"7f02-7f03 rw-s 00000000 00:1a 13 {MPICH_SEGMENT}gone_0 (deleted)\n"
                    f"7f03-7f04 rw-p 00000000 00:00 0 \n")
    try:
        assert unlink_mpi_segments(str(maps)) == [ours]
        assert not os.path.exists(ours) and os.path.exists(other)
        assert unlink_mpi_segments(str(maps)) == []   # another rank of the node was first
    finally:
        for path in (ours, other):
            if os.path.exists(path):
                os.remove(path)
