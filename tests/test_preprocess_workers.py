"""The packers' worker pool: results in any order but each in its place, a worker's
exception raised in the parent as itself, a dead worker named, nothing left running."""
import multiprocessing
import os
import signal

import pytest

from preprocess.workers import RemoteTraceback, WorkerDied, WorkerPool

FORK = multiprocessing.get_context("fork")


def square(x):
    return x * x


def fail_on_three(x):
    if x == 3:
        raise OSError(28, "No space left on device", "/full/disk")
    return x


def die_on_two(x):
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def slot_of(_):
    return _slot[0]


_slot = [None]


def remember_slot(slot):
    _slot[0] = slot


def results_of(pool, function, items):
    return {position: value for position, value in filter(None, pool.imap_unordered(function, items))}


@pytest.mark.parametrize("context", ["fork", "spawn"])   # spawn: what packing under MPI uses
def test_every_item_is_done_once_and_answered_in_its_place(context):
    with WorkerPool(3, multiprocessing.get_context(context)) as pool:
        assert results_of(pool, square, list(range(20))) == {i: i * i for i in range(20)}
        assert results_of(pool, square, [5]) == {0: 25}   # a pool serves many maps
    assert all(process.exitcode == 0 for process in pool.processes)


def test_each_worker_is_set_up_with_its_own_slot():
    with WorkerPool(2, FORK, remember_slot) as pool:
        assert set(results_of(pool, slot_of, list(range(8))).values()) == {0, 1}   # dealt to both
    with WorkerPool(1, FORK, remember_slot) as pool:
        assert set(results_of(pool, slot_of, list(range(3))).values()) == {0}


def test_a_worker_s_exception_is_raised_as_itself_with_its_traceback():
    with pytest.raises(OSError) as caught:
        with WorkerPool(2, FORK) as pool:
            results_of(pool, fail_on_three, list(range(6)))
    assert caught.value.errno == 28 and caught.value.filename == "/full/disk"
    assert isinstance(caught.value.__cause__, RemoteTraceback) and "fail_on_three" in str(caught.value.__cause__)
    assert all(process.exitcode is not None for process in pool.processes)   # killed on the way out


def test_a_worker_that_dies_is_named_and_the_others_are_ended():
    with pytest.raises(WorkerDied, match="^a worker process was killed by SIGKILL"):
        with WorkerPool(2, FORK) as pool:
            results_of(pool, die_on_two, list(range(6)))
    assert all(process.exitcode is not None for process in pool.processes)


def test_workers_leave_sigint_and_sigterm_to_the_parent():
    with WorkerPool(1, FORK) as pool:
        assert results_of(pool, square, [2]) == {0: 4}   # serving: past its start-up
        worker = pool.processes[0].pid
        os.kill(worker, signal.SIGTERM)
        os.kill(worker, signal.SIGINT)
        assert results_of(pool, square, [3]) == {0: 9}


def pid_after_a_nap(_):
    import time
    time.sleep(0.05)
    return os.getpid()


def test_items_are_dealt_to_every_worker_before_any_gets_a_second():
    # 4 items, 4 workers: each does one (two to a worker left another idle)
    with WorkerPool(4, FORK) as pool:
        assert len(set(results_of(pool, pid_after_a_nap, list(range(4))).values())) == 4
