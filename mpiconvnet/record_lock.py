"""Exclusive POSIX record locks that tell one run of a command from a second one at once.

Record locks belong to the process, and the kernel drops them when it ends, however it
ends: a killed run never blocks the next. Two rules follow. No other code of the process
may open a lock file it holds, since closing any descriptor of the file drops every lock
on it; and child processes do not inherit the locks. Record locks reach across nodes on
NFSv4, and on Lustre mounted with `flock`; where a file system refuses them, callers warn
and go on unprotected.
"""
import errno
import fcntl
import os

BUSY_ERRNOS = (errno.EACCES, errno.EAGAIN)


def open_lock_file(path):
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def try_lock(fd, start=0, length=0):
    """Lock bytes [start, start + length) of the file (length 0: to its end, whatever it
    grows to) without waiting. Returns None when held, "busy" when another process holds
    them, or why the file system cannot lock."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start, os.SEEK_SET)
    except OSError as error:
        return "busy" if error.errno in BUSY_ERRNOS else os.strerror(error.errno)
    return None
