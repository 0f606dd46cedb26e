"""One training run per run directory: a second one into the same --out is refused.

Two trainers writing one --out (a job submitted twice, a requeued job while its first
instance still runs, a copied command line) would interleave their checkpoints and
metrics.jsonl and remove each other's checkpoint files in progress. Rank 0 holds a record
lock (record_lock.py) on OUT/.lock from the end of the input checks until the run ends,
so a killed or requeued run is never blocked by its own past.
"""
import os
import sys

from mpiconvnet.record_lock import open_lock_file, try_lock

LOCK_FILE = ".lock"


def topmost_missing(path):
    """The highest folder of `path` (absolute) that does not exist yet, or None."""
    missing, folder = None, os.path.abspath(path)
    while not os.path.exists(folder):
        missing, folder = folder, os.path.dirname(folder)
    return missing


class RunLock:
    """Rank 0's lock of a run directory; release() (or the process's end) drops it."""

    def __init__(self):
        self.fd, self.run_dir = None, None
        self.made = None   # the topmost folder take() created, if it created any

    def take(self, run_dir):
        """Lock run_dir; the one-line reason it is busy, or None. A directory that cannot be
        made or written is left to the first write, which says so with its own exit code."""
        path = os.path.join(run_dir, LOCK_FILE)
        try:
            self.run_dir, self.made = run_dir, topmost_missing(run_dir)
            os.makedirs(run_dir, exist_ok=True)
            self.fd = open_lock_file(path)
        except OSError:
            return None
        problem = try_lock(self.fd)
        if problem == "busy":
            self.release()
            return (f"another training run is using --out {run_dir} (it holds {path}); let it finish or stop it, "
                    f"or choose another --out")
        if problem:
            print(f"mpiconvnet.train: warning: {path} cannot be locked ({problem}); nothing stops a second run "
                  f"writing into the same --out meanwhile", file=sys.stderr)
        return None

    def abandon(self):
        """Release, and remove the directory take() made for a run that then never started
        (a refused --resume): a refused command leaves nothing behind."""
        self.release()
        if self.made:
            try:
                os.remove(os.path.join(self.run_dir, LOCK_FILE))
                folder = os.path.abspath(self.run_dir)
                while True:   # up through the folders take() made, no further
                    os.rmdir(folder)
                    if folder == self.made:
                        break
                    folder = os.path.dirname(folder)
            except OSError:   # something else was put there meanwhile: leave it
                pass

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
