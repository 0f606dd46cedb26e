"""Pack images into verified HDF5 shards for mpiconvnet (format: docs/data-format.md).

    python -m preprocess imagenet --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz --out /data/imagenet-256 --workers 8
    python -m preprocess folder --train data/train --val data/val --out /data/mine-256
    python -m preprocess synth --out /tmp/synth --classes 10 --per-class 100 [--layout imagenet]
    python -m preprocess verify /data/imagenet-256

Across nodes: `mpirun -np 4 python -m preprocess imagenet ...` or `srun --mpi=pmi2 -n 4
python -m preprocess imagenet ...` (each rank packs a disjoint set of shards, rank 0
writes the index), or a SLURM array where each task adds `--rank $SLURM_ARRAY_TASK_ID
--size $SLURM_ARRAY_TASK_COUNT` (for an array numbered from 0; jobs/preprocess.sbatch
subtracts SLURM_ARRAY_TASK_MIN; the last task to finish writes the index). `--workers N`
adds N processes per rank or task. Re-running the same command finishes a killed run;
every shard appears by an atomic rename and dataset.json last.

Exit codes of imagenet and folder: 0 packed; 1 nothing usable found, anything skipped
with --strict, --out could not be written (full disk, permissions; finished shards
are kept), a worker process died (the OOM killer: fewer --workers), or another run is
packing the same shards into --out; 2 a bad flag or input path; 130 ctrl-c or SIGTERM
(finished shards are kept). Skipped inputs are listed with their reason in
OUT/skipped.tsv.
"""
import argparse
import sys

from mpiconvnet.cli import Parser
from preprocess import folder, imagenet, synth, verify
from preprocess.pack import add_pack_arguments, pack


def build_parser():
    parser = Parser(prog="python -m preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    for name, module, summary in (("imagenet", imagenet, "ILSVRC2012 from the original tars or extracted folders"),
                                  ("folder", folder, "any class-per-folder tree")):
        command = commands.add_parser(name, help=summary, description=module.__doc__, formatter_class=raw)
        module.add_arguments(command)
        add_pack_arguments(command)
        command.set_defaults(run=lambda args, module=module: pack(args, module.gather))
    command = commands.add_parser("synth", help="a synthetic learnable image set", description=synth.__doc__,
                                  formatter_class=raw)
    synth.add_arguments(command)
    command.set_defaults(run=synth.main)
    command = commands.add_parser("verify", help="re-read and check a packed data set", description=verify.__doc__,
                                  formatter_class=raw)
    verify.add_arguments(command)
    command.set_defaults(run=verify.main)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:   # ctrl-c outside the packing loop, which says more itself
        print(f"preprocess {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
