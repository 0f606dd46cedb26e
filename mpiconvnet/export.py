"""Write a checkpoint's weights as an .npz of PyTorch-named arrays, for PyTorch or a new run.

    python -m mpiconvnet.export --checkpoint runs/a --out alexnet.npz
    python -m mpiconvnet.export --checkpoint runs/owt/checkpoints/ckpt-00045000.h5 --out owt.npz --names torchvision

--checkpoint takes a checkpoint file, or a run directory (its newest checkpoint). The
arrays keep their training dtype and PyTorch's layouts (conv weights (out, in/groups, kh,
kw), fc weights (out, in)). `--names torchvision` (alexnet-owt only) names them as
torchvision.models.alexnet does. In PyTorch:

    state = {k: torch.from_numpy(v) for k, v in numpy.load("owt.npz").items()}
    torchvision.models.alexnet(num_classes=state["classifier.6.bias"].shape[0]).load_state_dict(state)

A new run starts from the file with `python -m mpiconvnet.train ... --init-weights alexnet.npz`.
Exit 2 on bad input or an --out that cannot be written; the file is written whole or not at all.
"""
import argparse
import sys

from mpiconvnet import checkpoint
from mpiconvnet.models import ModelError
from mpiconvnet.weights import NAMINGS, to_torchvision, write_npz


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpiconvnet.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory (newest checkpoint)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--names", choices=NAMINGS, default="ours",
                   help="ours: conv1.weight ... fc8.bias (default); torchvision: features.0.weight ... "
                        "(alexnet-owt only)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = checkpoint.find_checkpoint(args.checkpoint)
        params, _, meta = checkpoint.load(path)
        state = to_torchvision(params, meta["model"]) if args.names == "torchvision" else params
        write_npz(args.out, state)
    except (checkpoint.CheckpointError, ModelError, checkpoint.OutputError) as e:
        print(f"mpiconvnet.export: {e}", file=sys.stderr)
        return 2
    count = sum(v.size for v in params.values())
    naming = "our names" if args.names == "ours" else "torchvision's names"
    print(f"{args.out}: {meta['model']} at step {meta['step']}, {len(state)} arrays, {count:,} parameters "
          f"({naming}) from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
