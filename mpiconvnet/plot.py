"""Plot a run: loss, top-1/top-5 error, learning rate, throughput and memory, into one image.

    python -m mpiconvnet.plot runs/a                # writes runs/a/training.png
    python -m mpiconvnet.plot runs/a --out a.pdf    # .png, .pdf, .svg or .jpg, as the suffix says

One process: run it without mpiexec or srun -n N. --out is written whole or not at all,
and replaces only a regular file.

Exit codes: 0 written; 2 bad input (no run directory, damaged metrics.jsonl, an --out of
another format, or one that exists and is not a regular file) or an --out that cannot be
written (one line).
"""
import os
import sys

from mpiconvnet.checkpoint import output_problem
from mpiconvnet.cli import Parser
from mpiconvnet.distributed import refuse_several_ranks
from mpiconvnet.metrics import read_records

FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpg", ".jpeg": "jpg"}   # suffix: matplotlib's format


class CannotWrite(Exception):
    """The image could not be written (full disk, permissions, no such folder); one line with the fix."""


def check_out(out):
    """The format to write --out in; ValueError with the fix for an --out plot must not write."""
    if not out:
        raise ValueError("--out is empty; give an image path (.png, .pdf, .svg or .jpg), or leave --out out for "
                         "RUN_DIR/training.png")
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in FORMATS:
        raise ValueError(f"--out {out}: {suffix or 'no suffix'} is not a format plot writes; give a path ending "
                         f"in .png, .pdf, .svg or .jpg")
    if os.path.lexists(out) and (os.path.islink(out) or not os.path.isfile(out)):
        # a link, a FIFO, a device, a folder: replacing it would not write where it points
        raise ValueError(f"--out {out} exists and is not a regular file (a link, a device, a pipe, a folder); "
                         f"give a file name")
    return FORMATS[suffix]


# what each kind of record must hold for its panels
NEEDED = {"train": ("loss", "lr", "images_per_s"), "eval": ("loss", "top1", "top5")}


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; is {run_dir} a run directory of python -m mpiconvnet.train?")
    train, evals = [], []
    for record in read_records(path):
        kind = "eval" if record.get("kind") == "eval" else "train"
        missing = [key for key in NEEDED[kind] if not isinstance(record.get(key), (int, float))]
        if missing:
            raise ValueError(f"{path}: the {kind} record of step {record['step']} has no {', '.join(missing)}; "
                             f"the file is damaged or not mpiconvnet's")
        (evals if kind == "eval" else train).append(record)
    if not train and not evals:
        raise ValueError(f"{path} holds no records yet; the run logs one every --log-every steps")
    return train, evals


def plot(run_dir, out):
    image_format = check_out(out)
    import matplotlib
    matplotlib.use("Agg")   # no display on compute nodes
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = [r["step"] for r in train]
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation")
    ax.set(title="loss", xlabel="step", ylabel="cross-entropy")
    ax.legend()
    ax = axes[0, 1]
    if evals:
        es = [r["step"] for r in evals]
        ax.plot(es, [1 - r["top1"] for r in evals], "o-", label="top-1 error")
        ax.plot(es, [1 - r["top5"] for r in evals], "s-", label="top-5 error")
        ax.legend()
    ax.set(title="validation error", xlabel="step", ylim=(0, 1))
    ax = axes[1, 0]
    ax.plot(steps, [r["lr"] for r in train])
    ax.set(title="learning rate", xlabel="step")
    ax = axes[1, 1]
    ax.plot(steps, [r["images_per_s"] for r in train], label="images/s")
    ax.set(title="throughput", xlabel="step", ylabel="images/s")
    with_memory = [r for r in train if "memory_mb" in r]   # runs before 2026-11-24 have none
    if with_memory:
        # a high water that keeps rising over epochs is a leak, long before memory runs out
        memory = ax.twinx()
        memory.plot([r["step"] for r in with_memory], [r["memory_mb"] for r in with_memory], "--", color="tab:gray")
        memory.set_ylabel("memory high water, MB (largest rank)", color="tab:gray")
        memory.set_ylim(bottom=0)   # from zero: the first evaluation's few MB are no cliff
        ax.set_title("throughput (line) and memory (dashes)")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    partial = f"{out}.tmp.{image_format}"
    try:
        fig.savefig(partial, dpi=100, format=image_format)
        os.replace(partial, out)
    except OSError as error:
        if os.path.lexists(partial):
            os.remove(partial)
        raise CannotWrite(output_problem(out, error)) from None
    finally:
        plt.close(fig)
    return out


def main(argv=None):
    p = Parser(prog="python -m mpiconvnet.plot", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[-1].strip())
    p.add_argument("run_dir", help="a run directory of python -m mpiconvnet.train")
    p.add_argument("--out", help="image to write, its format by its suffix: .png, .pdf, .svg or .jpg "
                                 "(default RUN_DIR/training.png)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if refuse_several_ranks("mpiconvnet.plot"):
        return 2
    out = os.path.join(args.run_dir, "training.png") if args.out is None else args.out
    try:
        print(plot(args.run_dir, out))
    except (FileNotFoundError, ValueError, CannotWrite) as e:
        print(f"mpiconvnet.plot: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
