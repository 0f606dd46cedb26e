"""One packer per shard: a second run packing the same shards into one --out is refused.

Two runs packing one shard write the same NAME.h5.tmp at once, rename each other's file
away and publish a shard made of both (seen: both runs failing on a vanished .tmp, and a
shard whose size disagreed with its receipt). So a run holds, until it ends, a POSIX
record lock on byte i of OUT/.pack/shards.lock for every shard i it packs. The kernel
drops the locks when the process ends, however it ends, so a killed run never blocks the
next one; array tasks and MPI ranks lock disjoint bytes and pack side by side. Record
locks reach across nodes on NFSv4, and on Lustre mounted with `flock`; where the file
system refuses locks the run goes on with a warning.
"""
import errno
import fcntl
import os
import sys

LOCK_FILE = "shards.lock"
BUSY_ERRNOS = (errno.EACCES, errno.EAGAIN)


class ShardBusy(Exception):
    """Another live process holds the lock of a shard this run was to pack."""


class ShardLocks:
    """The locks of one run's shards; release() (or the process's end) drops them all.

    Record locks belong to the process, not to the file descriptor: no other code of this
    process may open the lock file, since closing any descriptor of it drops every lock.
    Worker processes do not inherit them, which is right: the parent decides what is packed.
    """

    def __init__(self, work_dir):
        self.path = os.path.join(work_dir, LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def hold(self, numbered_names):
        """Lock byte `number` for each (number, shard file name); ShardBusy names the first
        shard another process holds. Returns False where the file system has no locks."""
        for number, name in numbered_names:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, number, os.SEEK_SET)
            except OSError as error:
                if error.errno in BUSY_ERRNOS:
                    raise ShardBusy(name) from None
                print(f"preprocess: warning: {self.path} cannot be locked ({os.strerror(error.errno)}); "
                      f"nothing stops a second run packing into the same --out meanwhile", file=sys.stderr)
                return False
        return True

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
