"""Worker processes for packing and indexing: one pipe each, nothing shared between them.

multiprocessing.Pool shares one task queue and one result queue among its workers, each
guarded by a lock that a worker holds while it waits for a task or sends a result. A
worker killed there (by the OOM killer, or by the SIGTERM to the whole process group that
scancel and `kill -TERM -PGID` send) takes the lock with it, and the parent then waits
for ever: for the lost task, or inside Pool.terminate() (seen: a hang after every kill -9
of a packing worker, and 2 hangs in 11 group SIGTERMs). Here each worker has a pipe of
its own; it ignores SIGINT and SIGTERM, so the parent alone decides to stop, and then
kills it, which no shared state survives to mind; it dies with the parent; and a worker
that dies is noticed at once and named.
"""
import collections
import os
import signal
import traceback
from multiprocessing.connection import wait

from mpiconvnet.parent_death import die_with_parent

POLL_S = 0.5   # how often imap_unordered yields None while nothing finishes (progress bars)
ITEMS_IN_FLIGHT = 2   # per worker: the one it works on and the next


class WorkerDied(Exception):
    """A worker process ended while the pool still needed it."""


class RemoteTraceback(Exception):
    """The worker's traceback, chained to the exception it raised (raise ... from)."""


class WorkerPool:
    """`count` processes, each calling initializer(slot, *initargs) once, then running
    function(item) for the items imap_unordered hands it. Use it as a context manager:
    leaving normally stops the workers, leaving by an exception (ctrl-c included) kills them."""

    def __init__(self, count, context, initializer=None, initargs=()):
        self.processes, self.connections, self.process_of = [], [], {}
        # blocked until a worker has set them to be ignored (_serve): a spawned one takes
        # a second to get there, and a ctrl-c meanwhile printed its start-up's tracebacks.
        # The mask is inherited through fork and exec alike.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for slot in range(count):
                ours, theirs = context.Pipe()
                process = context.Process(target=_serve, args=(theirs, os.getpid(), initializer, (slot, *initargs)),
                                          daemon=True)
                process.start()
                theirs.close()
                self.processes.append(process)
                self.connections.append(ours)
                self.process_of[ours] = process
            signal.pthread_sigmask(signal.SIG_SETMASK, held)   # a signal held meanwhile is taken here
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            self.kill()
            raise

    def imap_unordered(self, function, items):
        """Yield (position in items, function(item)) as the workers finish them, and None
        every POLL_S seconds without one. A worker's exception is raised here; a worker
        that dies raises WorkerDied."""
        todo = list(enumerate(items))[::-1]   # popped from the end: items go out in order
        sent = {connection: collections.deque() for connection in self.connections}   # positions, in order
        sentinels = {process.sentinel: process for process in self.processes}
        while todo or any(sent.values()):
            self._hand_out(function, todo, sent)
            ready = wait([c for c, positions in sent.items() if positions] + list(sentinels), POLL_S)
            if not ready:
                yield None
            for connection in [c for c in ready if c in sent]:
                try:
                    status, value, remote = connection.recv()
                except (EOFError, OSError):   # the worker died: its sentinel tells how, below
                    continue
                if status == "error":
                    raise value from RemoteTraceback(remote)
                yield sent[connection].popleft(), value
            for sentinel in [s for s in ready if s in sentinels]:
                raise WorkerDied(f"a worker process {describe_end(sentinels[sentinel])}")

    def _hand_out(self, function, todo, sent):
        """Send items from the end of `todo` until each worker holds ITEMS_IN_FLIGHT: its
        next item reaches it before it finishes the one in hand, so it never waits for this
        process (busy publishing) to notice and send one. Dealt in rounds, so that no worker
        holds two items while another has none."""
        for depth in range(1, ITEMS_IN_FLIGHT + 1):
            for connection, positions in sent.items():
                if todo and len(positions) < depth:
                    position, item = todo.pop()
                    try:
                        connection.send((function, item))
                    except OSError:   # a broken pipe: the worker died
                        raise WorkerDied(f"a worker process {describe_end(self.process_of[connection])}") from None
                    positions.append(position)

    def close(self):
        """Stop idle workers and wait for them."""
        for connection in self.connections:
            try:
                connection.send(None)
            except OSError:   # that one ended already
                pass
        for process in self.processes:
            process.join()
        self._close_pipes()

    def kill(self):
        """End every worker now, whatever it is doing (it holds nothing another needs)."""
        for process in self.processes:
            if process.exitcode is None:
                process.kill()
        for process in self.processes:
            process.join()
        self._close_pipes()

    def _close_pipes(self):
        for connection in self.connections:
            connection.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, trace):
        if kind is None:
            self.close()
        else:
            self.kill()


def describe_end(process):
    """'was killed by SIGKILL (out of memory?)' or 'exited with code 1'."""
    process.join()
    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory? the kernel's OOM killer sends it)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def _serve(connection, parent_pid, initializer, initargs):
    """A worker's life: set up, then run what the parent sends until None or its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a terminal's ctrl-c reaches the whole group,
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # as scancel's SIGTERM may: the parent decides
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})   # blocked by the parent
    die_with_parent()
    if os.getppid() != parent_pid:
        return   # the parent ended before the line above took effect
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        function, item = message
        try:
            reply = ("ok", function(item), None)
        except Exception as error:
            reply = ("error", error, traceback.format_exc())
        try:
            connection.send(reply)
        except Exception as error:   # an exception that does not pickle: say what it was
            connection.send(("error", RuntimeError(f"{reply[1]!r} (unpicklable: {error})"), reply[2]))
