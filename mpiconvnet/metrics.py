"""metrics.jsonl: one JSON object per logged step ("kind": "train") and per evaluation
("kind": "eval"), written by rank 0 and read by plot.

A write that fails (a full disk) is taken back to the last whole line, and a reader skips
a last line without its newline (a write cut short by a crash), so a run that resumed after
either still has a file every reader takes.
"""
import json
import os

from mpiconvnet.checkpoint import OutputError, cannot_write


def read_records(path):
    """The records of a metrics file in order; ValueError naming the line for a damaged one."""
    with open(path, "rb") as f:   # bytes: a line that is not UTF-8 is named like any damaged one
        lines = f.readlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode())
        except ValueError as error:   # UnicodeDecodeError is one
            if number == len(lines) and not line.endswith(b"\n"):
                break   # cut short while being written
            what = "UTF-8 text" if isinstance(error, UnicodeDecodeError) else "JSON"
            raise ValueError(f"{path}:{number} is not {what}; the file is damaged") from None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            raise ValueError(f"{path}:{number} is not a metrics record (an object with a step); the file is damaged")
        records.append(record)
    return records


class MetricsLog:
    """Rank 0's metrics.jsonl for a run. A resumed run redoes the steps after its
    checkpoint, and the evaluation at it unless the checkpoint says it was done
    (`evaluated_at`), so their old lines go; a run from scratch starts the file anew."""

    def __init__(self, run_dir, enabled, resume_step=0, evaluated_at=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        if enabled and os.path.exists(self.path):
            try:
                records = read_records(self.path)
            except ValueError as error:   # edited by hand, or another tool's
                raise OutputError(f"{error}; move {self.path} aside (or delete that line) and run the same command "
                                  f"again") from None
            except OSError as error:      # a directory of that name, a file this user may not read
                raise OutputError(f"cannot read {self.path}: {os.strerror(error.errno) if error.errno else error}; "
                                  f"move it aside and run the same command again") from None
            kept = [json.dumps(r) + "\n" for r in records
                    if r["step"] < resume_step or r["step"] == resume_step and (
                        r.get("kind") != "eval" or evaluated_at == resume_step)]
            tmp = self.path + ".tmp"
            try:
                with open(tmp, "w") as f:
                    f.writelines(kept)
                os.replace(tmp, self.path)
            except OSError as error:
                if os.path.lexists(tmp):
                    os.remove(tmp)   # a partial copy would hold the space the user must free
                raise self._cannot_write(error) from None

    def write(self, record):
        if not self.enabled:
            return
        data = memoryview((json.dumps(record) + "\n").encode())
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise self._cannot_write(error) from None
        start = os.fstat(fd).st_size
        try:
            while data:   # unbuffered: a failed write leaves nothing queued to fail again
                data = data[os.write(fd, data):]
        except OSError as error:
            os.ftruncate(fd, start)   # no half line; shrinking needs no space
            raise self._cannot_write(error) from None
        finally:
            os.close(fd)

    def _cannot_write(self, error):
        return OutputError(cannot_write(self.path, error, os.path.dirname(self.path)))
