"""Any class-per-folder tree: TRAIN/CLASS/**/image (the torchvision ImageFolder layout).

    python -m preprocess folder --train data/train --val data/val --out /data/mine-256
    python -m preprocess folder --train data/train --out DIR --workers 8 --format jpeg
    mpirun -np 4 python -m preprocess folder --train data/train --val data/val --out DIR

Classes are the sorted subfolder names of --train; label = position in that order. The
validation tree must use the same class names (a subset is fine).
"""
from preprocess.sources import (InputError, files_in_class_folders, list_class_folders, printable,
                                warn_of_empty_classes)


def gather(args):
    """(classes, class_names, {split: inputs}) for the folder command."""
    classes = list_class_folders(args.train)
    if not classes:
        raise InputError(f"--train {args.train} has no class subfolders; pass a folder with one subfolder per class")
    index = {c: i for i, c in enumerate(classes)}
    splits = {"train": files_in_class_folders(args.train, classes, index)}
    warn_of_empty_classes([printable(name) for name in classes], splits["train"], f"--train {args.train}")
    if args.val:
        val_classes = list_class_folders(args.val)
        if not val_classes:
            raise InputError(f"--val {args.val} has no class subfolders; pass a folder with one subfolder per class, "
                             f"named as in --train")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise InputError(f"--val {args.val}: class folder {unknown[0]!r} is not in --train {args.train}; "
                             f"use the same class names in both trees")
        splits["val"] = files_in_class_folders(args.val, val_classes, index)
    recorded = [printable(name) for name in classes]   # folders named in another encoding than UTF-8
    return recorded, list(recorded), splits


def add_arguments(parser):
    parser.add_argument("--train", required=True, help="folder with one subfolder of images per class")
    parser.add_argument("--val", help="validation folder with the same class subfolders")
