"""Run one benchmark: `python -m mpiconvnet.bench NAME [options]`.

    python -m mpiconvnet.bench step --model alexnet --batch 64 --threads 2
    python -m mpiconvnet.bench input --backend cuda --model alexnet-owt --batch 128 --tf32
    python -m mpiconvnet.bench preprocess
    python -m mpiconvnet.bench loader
    mpirun -np 2 python -m mpiconvnet.bench allreduce
    python -m mpiconvnet.bench scaling

Each benchmark is a module `mpiconvnet.bench.NAME` with `main(argv) -> int`; it prints a
table and the ratio against a baseline measured in the same run.
"""
import importlib
import pkgutil
import sys

import mpiconvnet.bench as package


def available():
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\navailable:", ", ".join(names))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"mpiconvnet.bench: unknown benchmark {name!r}; choose one of {', '.join(names)}",
              file=sys.stderr)
        return 2
    from mpiconvnet.checkpoint import CheckpointError
    from mpiconvnet.data.shards import DatasetError
    from mpiconvnet.models import ModelError
    try:
        return importlib.import_module(f"mpiconvnet.bench.{name}").main(rest)
    except (DatasetError, ModelError, CheckpointError) as e:   # bad input met after the flags' checks
        print(f"mpiconvnet.bench {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
