"""One packer per shard: a second run packing the same shards into one --out is refused.

Two runs packing one shard write the same NAME.h5.tmp at once, rename each other's file
away and publish a shard made of both (seen: both runs failing on a vanished .tmp, and a
shard whose size disagreed with its receipt). So a run holds, until it ends, a record
lock (mpiconvnet/record_lock.py) on byte i of OUT/.pack/shards.lock for every shard i it
packs; array tasks and MPI ranks lock disjoint bytes and pack side by side.
"""
import os
import sys

from mpiconvnet.record_lock import open_lock_file, try_lock

LOCK_FILE = "shards.lock"


class ShardBusy(Exception):
    """Another live process holds the lock of a shard this run was to pack."""


class ShardLocks:
    """The locks of one run's shards; release() (or the process's end) drops them all.
    Worker processes do not inherit them, which is right: the parent decides what is packed."""

    def __init__(self, work_dir):
        self.path = os.path.join(work_dir, LOCK_FILE)
        self.fd = open_lock_file(self.path)

    def hold(self, numbered_names):
        """Lock byte `number` for each (number, shard file name); ShardBusy names the first
        shard another process holds. Returns False where the file system has no locks."""
        for number, name in numbered_names:
            problem = try_lock(self.fd, number, 1)
            if problem == "busy":
                raise ShardBusy(name)
            if problem:
                print(f"preprocess: warning: {self.path} cannot be locked ({problem}); nothing stops a second run "
                      f"packing into the same --out meanwhile", file=sys.stderr)
                return False
        return True

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
