"""Run one benchmark: `python -m mpiconvnet.bench NAME [options]`.

    python -m mpiconvnet.bench step --model alexnet --batch 64 --threads 2
    python -m mpiconvnet.bench input --backend cuda --model alexnet-owt --batch 128 --tf32
    python -m mpiconvnet.bench preprocess
    python -m mpiconvnet.bench loader
    mpirun -np 2 python -m mpiconvnet.bench allreduce
    python -m mpiconvnet.bench scaling

Each benchmark is a module `mpiconvnet.bench.NAME` with `main(argv) -> int`; it prints a
table and the ratio against a baseline measured in the same run. allreduce runs on the
ranks of an mpiexec (and starts one itself); scaling starts its own; the others measure
one process and refuse to run as several copies (mpiexec -n 2, srun -n 2).

Exit codes: 0 measured; 1 a failure; 2 a bad flag, or values that do not fit together
or the data (one line naming the flag), or memory ran out (lower --batch); 130 ctrl-c;
143 SIGTERM (a job's time limit, kill); bench preprocess exits 130 for SIGTERM too, as
python -m preprocess, which it runs, does. A stopped benchmark removes its temporary
files first.
"""
import importlib
import pkgutil
import sys

import mpiconvnet.bench as package
from mpiconvnet.bench._launch import (EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, says_why_it_stopped,
                                      stop_on_signals)

# python -m preprocess, which bench preprocess runs, turns SIGTERM into ctrl-c while it packs: the same there
SIGTERM_RAISES = {"preprocess": KeyboardInterrupt}


def available():
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else ""
    # first: a stop during the imports below is one line too, not a traceback
    stop_on_signals(sigterm_raises=SIGTERM_RAISES.get(name, Terminated))
    try:
        from mpiconvnet.checkpoint import CheckpointError
        from mpiconvnet.data.shards import DatasetError
        from mpiconvnet.models import ModelError
        return run(name, argv[1:])
    except MemoryError as e:
        detail = f" ({e})" if str(e) else ""
        print(f"mpiconvnet.bench {name}: out of memory{detail}; lower {MEMORY_FLAGS.get(name, '--batch')}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if says_why_it_stopped():
            print(f"mpiconvnet.bench {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        if says_why_it_stopped():
            print(f"mpiconvnet.bench {name}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:   # its output piped into a reader that stopped reading (| head): done
        silence_stdout()
        return 0
    # last: a ctrl-c during the imports above leaves these names undefined
    except (DatasetError, ModelError, CheckpointError) as e:   # bad input met after the flags' checks
        print(f"mpiconvnet.bench {name}: {e}", file=sys.stderr)
        return 2


def run(name, rest):
    """Benchmark `name` on its flags `rest`, or the list of benchmarks; its exit code."""
    names = available()
    if name in ("", "-h", "--help"):
        print(__doc__.strip())
        print("\navailable:", ", ".join(names))
        return 0 if name else 2
    if name not in names:
        print(f"mpiconvnet.bench: unknown benchmark {name!r}; choose one of {', '.join(names)}",
              file=sys.stderr)
        return 2
    from mpiconvnet.distributed import ranks_by_environment
    module = importlib.import_module(f"mpiconvnet.bench.{name}")
    copies = ranks_by_environment()   # mpiexec's ranks, or srun's tasks MPI may not join
    if copies > 1 and not getattr(module, "RUNS_AS_MPI_RANKS", False):
        if says_why_it_stopped():
            print(f"mpiconvnet.bench {name}: started as {copies} copies (mpiexec -n {copies} or srun -n "
                  f"{copies}), each slowing the others; it measures one process: run it as one (python -m "
                  f"mpiconvnet.bench {name} ..., or srun -n 1)", file=sys.stderr)
        return 2
    return module.main(rest)


# the flag that sets what most of a benchmark's memory holds, where it is not --batch
MEMORY_FLAGS = {"checkpoint": "--model", "preprocess": "--image-size or --shard-size"}


def silence_stdout():
    """Point stdout at /dev/null: Python flushes it at exit, and the reader is gone."""
    import os
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
