"""Write a checkpoint's weights as an .npz of PyTorch-named arrays, for PyTorch or a new run.

    python -m mpiconvnet.export --checkpoint runs/a --out alexnet.npz
    python -m mpiconvnet.export --checkpoint runs/owt/checkpoints/ckpt-00045000.h5 --out owt.npz --names torchvision

--checkpoint takes a checkpoint file, or a run directory or its checkpoints/ folder (the
newest checkpoint). The
arrays keep their training dtype and PyTorch's layouts (conv weights (out, in/groups, kh,
kw), fc weights (out, in)). `--names torchvision` (alexnet-owt only) names them as
torchvision.models.alexnet does. In PyTorch:

    state = {k: torch.from_numpy(v) for k, v in numpy.load("owt.npz").items()}
    torchvision.models.alexnet(num_classes=state["classifier.6.bias"].shape[0]).load_state_dict(state)

Beside OUT.npz goes OUT.classes.txt, the training set's class names (wnids) in label order:
output i of the network is line i + 1 (checkpoints written before 2026-11-25 record no
list: their order is the "classes" of the training set's dataset.json). A new run starts
from the file with `python -m mpiconvnet.train ... --init-weights alexnet.npz`. Both files
are written whole or not at all; one process: run it without mpiexec or srun -n N.

Exit codes: 0 written; 2 bad input (a --checkpoint that is none, an --out that is no .npz
path, is the checkpoint itself or exists and is not a regular file) or an --out that cannot
be written (one line).
"""
import os
import sys

from mpiconvnet import checkpoint
from mpiconvnet.cli import Parser
from mpiconvnet.distributed import refuse_several_ranks
from mpiconvnet.models import ModelError
from mpiconvnet.weights import NAMINGS, classes_path, to_torchvision, write_npz


def parse_args(argv):
    p = Parser(prog="python -m mpiconvnet.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[-1].strip())
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory or its checkpoints/ folder (newest checkpoint)")
    p.add_argument("--out", required=True, help="the .npz file to write (and the class list beside it: m.npz, m.classes.txt)")
    p.add_argument("--names", choices=NAMINGS, default="ours",
                   help="ours: conv1.weight ... fc8.bias (default); torchvision: features.0.weight ... "
                        "(alexnet-owt only)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if refuse_several_ranks("mpiconvnet.export"):
        return 2
    try:
        check_out(args.out)
        path, params, _, meta = checkpoint.load_given(args.checkpoint)
        if os.path.exists(args.out) and os.path.samefile(args.out, path):
            raise ModelError(f"--out {args.out} is the checkpoint it exports; give another .npz path")
        state = to_torchvision(params, meta["model"]) if args.names == "torchvision" else params
        classes = meta.get("classes")
        write_npz(args.out, state, classes)
    except (checkpoint.CheckpointError, ModelError, checkpoint.OutputError) as e:
        print(f"mpiconvnet.export: {e}", file=sys.stderr)
        return 2
    count = sum(v.size for v in params.values())
    naming = "our names" if args.names == "ours" else "torchvision's names"
    order = (f"class order (output i = line i + 1) in {classes_path(args.out)}" if classes is not None else
             f"the checkpoint records no class list (written before 2026-11-25): outputs follow the \"classes\" of "
             f"{os.path.join(meta['config'].get('data') or 'its data set', 'dataset.json')}")
    print(f"{args.out}: {meta['model']} at step {meta['step']}, {len(state)} arrays, {count:,} parameters "
          f"({naming}) from {path}; {order}")
    return 0


def check_out(out):
    """ModelError (one line, with the fix) for an --out that is no .npz path."""
    if not out:
        raise ModelError("--out is empty; give the .npz file to write")
    if os.path.splitext(out)[1].lower() != ".npz":
        # numpy.load and --init-weights read an .npz; another suffix may be a checkpoint or a shard
        raise ModelError(f"--out {out}: not an .npz path; give a file name ending in .npz")


if __name__ == "__main__":
    sys.exit(main())
