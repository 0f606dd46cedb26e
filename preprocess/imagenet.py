"""ImageNet (ILSVRC2012) inputs from the original archives or from extracted folders.

    python -m preprocess imagenet --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz --out /data/imagenet-256
    python -m preprocess imagenet --train train/ --val val/ --devkit ILSVRC2012_devkit_t12/ --out DIR --workers 8
    mpirun -np 4 python -m preprocess imagenet --train ... --val ... --devkit ... --out DIR
    sbatch --array=0-3 --wrap "python -m preprocess imagenet ... --out DIR --rank \\$SLURM_ARRAY_TASK_ID --size 4"

Labels: class index = position of the wnid in sorted order (Caffe, torchvision). The
validation ground truth lists ILSVRC2012_IDs, whose 1..1000 order is NOT the sorted-wnid
order; it is mapped through meta.mat's leaf synsets (num_children == 0) to wnids, then to
sorted positions. Check on the real data: validation images 1-5 get labels 65, 970, 230,
809, 516.

Accepted forms:
  --train  ILSVRC2012_img_train.tar (one inner tar per class), a folder of those inner
           tars, or a folder with one subfolder per wnid;
  --val    ILSVRC2012_img_val.tar (50,000 flat files), the flat extracted folder, or a
           folder already sorted into wnid subfolders (then the devkit is not needed for it);
  --devkit ILSVRC2012_devkit_t12.tar.gz or its extracted folder (meta.mat and
           ILSVRC2012_validation_ground_truth.txt are found anywhere inside).
"""
import io
import os
import re
import tarfile
import zlib

import numpy as np

from preprocess.sources import (ArchiveInputs, FileInputs, InputError, basename, files_in_class_folders,
                                folder_entries, list_class_folders, nested_tar_members, printable,
                                sorted_inputs, tar_files_members, tar_members, warn, warn_of_empty_classes)

META_FILE = "meta.mat"
GROUND_TRUTH_FILE = "ILSVRC2012_validation_ground_truth.txt"
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "num_children")   # the ones read from meta.mat
VAL_NUMBER = re.compile(r"(\d+)\.[A-Za-z]+$")


def archive_inputs(names, labels, archives, archive_ids, offsets, sizes):
    names = [printable(name) for name in names]   # member names are bytes that need not be UTF-8
    order = sorted(range(len(names)), key=names.__getitem__)
    names = [names[i] for i in order]
    for a, b in zip(names, names[1:]):
        if a == b:
            raise InputError(f"archive member {a!r} occurs twice; remove the duplicate")
    pick = lambda column: [column[i] for i in order]
    return ArchiveInputs(names, pick(labels), archives, pick(archive_ids), pick(offsets), pick(sizes))


def wnid_of(inner_name):
    """'n01440764.tar' -> 'n01440764' (as printable() records it)."""
    name = basename(inner_name)
    return printable(name[:-4] if name.endswith(".tar") else name)


def classes_of_tars(inner_tars, path):
    """{wnid: members} from [(class tar name, members)]; two tars of one class are refused,
    where a dict would keep the last one's images and drop the other's."""
    per_class = {}
    for inner, members in inner_tars:
        wnid = wnid_of(inner)
        if wnid in per_class:
            raise InputError(f"--train {path} holds two tars of class {wnid}; remove the duplicate")
        per_class[wnid] = members
    return per_class


def train_inputs(path, workers=1):
    """(sorted wnids, inputs) for --train; names are 'WNID/FILE' in every form. The class
    tars are indexed by `workers` processes."""
    if os.path.isfile(path):
        per_class = classes_of_tars(nested_tar_members(path, workers), path)
        archives = [path]
        ids = None
    elif os.path.isdir(path) and any(e.name.endswith(".tar") and e.is_file() for e in folder_entries(path)):
        folders = list_class_folders(path)
        if folders:
            # e.g. an extraction stopped halfway: packing either half would drop classes silently
            raise InputError(f"--train {path} holds both class tars and class folders (e.g. {folders[0]}); finish "
                             f"extracting the tars into folders (and remove the tars), or pass only tars")
        inner_tars = sorted(e.name for e in folder_entries(path) if e.name.endswith(".tar") and e.is_file())
        archives = [os.path.join(path, name) for name in inner_tars]
        per_class = classes_of_tars(zip(inner_tars, tar_files_members(archives, workers)), path)
        ids = {wnid_of(name): k for k, name in enumerate(inner_tars)}
    elif os.path.isdir(path):
        classes = list_class_folders(path)
        if not classes:
            raise InputError(f"--train {path}: no class folders and no .tar files inside; pass "
                             f"ILSVRC2012_img_train.tar or its extracted folder")
        inputs = files_in_class_folders(path, classes, {c: i for i, c in enumerate(classes)})
        return [printable(c) for c in classes], inputs
    else:
        raise InputError(f"--train {path} does not exist; pass ILSVRC2012_img_train.tar or its extracted folder")
    classes = sorted(per_class)
    index = {c: i for i, c in enumerate(classes)}
    names, labels, archive_ids, offsets, sizes = [], [], [], [], []
    for wnid, members in per_class.items():
        for member, offset, size in members:
            names.append(f"{wnid}/{basename(member)}")
            labels.append(index[wnid])
            archive_ids.append(0 if ids is None else ids[wnid])
            offsets.append(offset)
            sizes.append(size)
    return classes, archive_inputs(names, labels, archives, archive_ids, offsets, sizes)


def read_devkit(path):
    """(meta.mat bytes, ground-truth text) from the devkit tar.gz or its folder."""
    wanted = {META_FILE: None, GROUND_TRUTH_FILE: None}
    if os.path.isdir(path):
        for folder, _, files in os.walk(path, onerror=lambda error: unreadable_devkit(path, error)):
            for file in files:
                if file in wanted and wanted[file] is None:
                    try:
                        with open(os.path.join(folder, file), "rb") as stream:
                            wanted[file] = stream.read()
                    except OSError as error:
                        unreadable_devkit(path, error)
    elif os.path.isfile(path):
        try:
            with tarfile.open(path, mode="r:*") as archive:
                for member in archive:
                    name = basename(member.name)
                    if member.isreg() and name in wanted and wanted[name] is None:
                        wanted[name] = archive.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:   # gzip's errors are OSError or EOFError
            reason = " ".join(str(error).split())   # tarfile lists each method it tried on a line of its own
            raise InputError(f"--devkit {path} is not a readable tar archive ({reason}); download "
                             f"ILSVRC2012_devkit_t12.tar.gz again, or pass its extracted folder") from None
    else:
        raise InputError(f"--devkit {path} does not exist; pass ILSVRC2012_devkit_t12.tar.gz or its extracted folder")
    for name, data in wanted.items():
        if data is None:
            raise InputError(f"--devkit {path} holds no {name}; pass the ILSVRC2012 devkit (ILSVRC2012_devkit_t12)")
    # a byte that is not UTF-8 shows as \xNN in the message about its line (validation_labels)
    return wanted[META_FILE], wanted[GROUND_TRUTH_FILE].decode("utf-8", "backslashreplace")


def unreadable_devkit(path, error):
    # the devkit is two small files: any part of it that cannot be read is an error, not a skip
    raise InputError(f"--devkit {path}: {error.filename} cannot be read ({error.strerror or error}); make it "
                     f"readable, or pass ILSVRC2012_devkit_t12.tar.gz") from None


def leaf_synsets(meta_bytes, devkit_path="devkit"):
    """{ILSVRC2012_ID: (wnid, words)} for the leaf synsets (num_children == 0) of meta.mat."""
    from scipy.io import loadmat
    try:
        synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
    except Exception as error:   # scipy's MatReadError, ValueError, KeyError, ... for a damaged file
        raise InputError(f"--devkit {devkit_path}: meta.mat is damaged ({type(error).__name__}: {error}); download "
                         f"the ILSVRC2012 devkit again") from None
    fields = getattr(getattr(synsets, "dtype", None), "names", None) or ()
    missing = [field for field in SYNSET_FIELDS if field not in fields]
    if missing:
        raise InputError(f"--devkit {devkit_path}: meta.mat's synsets have no field {missing[0]} (they need "
                         f"{', '.join(SYNSET_FIELDS)}); pass the ILSVRC2012 devkit (ILSVRC2012_devkit_t12)")
    leaves = {}
    for row, synset in enumerate(np.atleast_1d(synsets), start=1):
        try:
            if int(synset["num_children"]) == 0:
                leaves[int(synset["ILSVRC2012_ID"])] = (str(synset["WNID"]), str(synset["words"]))
        except (TypeError, ValueError) as error:   # an empty or non-numeric field
            raise InputError(f"--devkit {devkit_path}: meta.mat's synset {row} is damaged ({error}); download "
                             f"the ILSVRC2012 devkit again") from None
    if not leaves:
        raise InputError(f"--devkit {devkit_path}: meta.mat has no leaf synsets; pass the ILSVRC2012 devkit")
    return leaves


def class_names_from_devkit(classes, leaves):
    words = {wnid: text for wnid, text in leaves.values()}
    return [words.get(wnid, wnid) for wnid in classes]


def validation_labels(ground_truth, leaves, classes, devkit_path="devkit"):
    """Sorted-wnid label of validation image k for every line k of the ground truth: one
    ILSVRC2012_ID a line, so a blank line inside is refused (skipping it would shift the
    labels of every image after it)."""
    position = {wnid: i for i, wnid in enumerate(classes)}
    labels = []
    for line_number, line in enumerate(ground_truth.rstrip().splitlines(), start=1):
        try:
            synset_id = int(line)
        except ValueError:
            raise InputError(f"--devkit {devkit_path}: line {line_number} of {GROUND_TRUTH_FILE} is {line!r}, not "
                             f"an ILSVRC2012_ID; download the ILSVRC2012 devkit again") from None
        if synset_id not in leaves or leaves[synset_id][0] not in position:
            raise InputError(f"--devkit {devkit_path}: ground truth line {line_number} names ILSVRC2012_ID "
                             f"{synset_id}, which is not a training class; use the devkit of the same release")
        labels.append(position[leaves[synset_id][0]])
    return np.asarray(labels, dtype=np.int64)


def val_number(name, path):
    match = VAL_NUMBER.search(name)
    if not match:
        raise InputError(f"--val {path}: {name!r} is not named like ILSVRC2012_val_00000001.JPEG; pass the "
                         f"original validation archive or folder")
    return int(match.group(1))


def label_by_number(names, labels_by_line, path):
    """The label of each validation image, by its number's line in the ground truth. Fewer
    images than lines is a partial copy or a chosen subset: said in a warning, so that a
    partial copy does not go unnoticed."""
    labels, seen = [], set()
    for name in names:
        number = val_number(name, path)
        if not 1 <= number <= len(labels_by_line):
            raise InputError(f"--val {path}: {name!r} has no line in {GROUND_TRUTH_FILE} "
                             f"({len(labels_by_line)} lines); use the devkit of the same release")
        if number in seen:
            raise InputError(f"--val {path}: {name!r} is the second image numbered {number}; remove the copy")
        seen.add(number)
        labels.append(int(labels_by_line[number - 1]))
    if len(names) != len(labels_by_line):
        missing = min(set(range(1, len(labels_by_line) + 1)) - seen)
        warn(f"--val {path} holds {len(names)} images where {GROUND_TRUTH_FILE} lists {len(labels_by_line)} "
             f"(image {missing} is missing); packing those. Unless a subset is meant, it is a partial copy: copy "
             f"the whole ILSVRC2012_img_val.tar again")
    return labels


def val_inputs(path, classes, devkit_labels):
    """Inputs for --val; devkit_labels() gives labels by ground-truth line (only called if needed)."""
    if os.path.isfile(path):
        members = tar_members(path)
        names = [basename(m) for m, _, _ in members]
        labels = label_by_number(names, devkit_labels(), path)
        return archive_inputs(names, labels, [path], [0] * len(names), [o for _, o, _ in members],
                              [s for _, _, s in members])
    if not os.path.isdir(path):
        raise InputError(f"--val {path} does not exist; pass ILSVRC2012_img_val.tar or its extracted folder")
    subfolders = list_class_folders(path)
    if subfolders:
        position = {c: i for i, c in enumerate(classes)}   # classes as recorded: printable()
        unknown = [folder for folder in subfolders if printable(folder) not in position]
        if unknown:
            raise InputError(f"--val {path}: folder {printable(unknown[0])!r} is not a training class; pass the "
                             f"flat validation folder or one sorted into the training wnids")
        return files_in_class_folders(path, subfolders, {f: position[printable(f)] for f in subfolders})
    names = sorted(e.name for e in folder_entries(path) if e.is_file() and not e.name.startswith("."))
    labels = label_by_number(names, devkit_labels(), path)
    return sorted_inputs(FileInputs, names, labels, [os.path.join(path, n) for n in names])


def check_classes_match_devkit(classes, leaves, args):
    """The training classes must be meta.mat's leaf synsets. The release has all 1,000 in
    its train tar, so a class missing from --train is a partial copy, or a chosen subset
    (ImageNet-100 and the like): said in a warning, and packed."""
    wnids = {wnid for wnid, _ in leaves.values()}
    unknown = sorted(set(classes) - wnids)
    if unknown:
        raise InputError(f"--devkit {args.devkit}: training class {unknown[0]} is not a leaf synset "
                         f"of meta.mat; use the devkit of the same release")
    missing = sorted(wnids - set(classes))
    if missing:
        warn(f"--train {args.train} holds {len(classes)} classes where meta.mat in --devkit {args.devkit} lists "
             f"{len(wnids)} ({missing[0]} is missing); packing those. Unless a subset is meant, it is a partial "
             f"copy: copy the whole ILSVRC2012_img_train.tar again")


def gather(args):
    """(classes, class_names, {split: inputs}) for the imagenet command."""
    classes, train = train_inputs(args.train, args.workers)
    warn_of_empty_classes(classes, train, f"--train {args.train}")
    devkit = {}

    def devkit_contents():
        if not devkit:
            if not args.devkit:
                raise InputError("--devkit is required to label a flat validation set; pass "
                                 "ILSVRC2012_devkit_t12.tar.gz")
            meta, ground_truth = read_devkit(args.devkit)
            devkit["leaves"] = leaf_synsets(meta, args.devkit)
            devkit["ground_truth"] = ground_truth
            check_classes_match_devkit(classes, devkit["leaves"], args)
        return devkit

    splits = {"train": train}
    if args.val:
        splits["val"] = val_inputs(args.val, classes, lambda: validation_labels(
            devkit_contents()["ground_truth"], devkit_contents()["leaves"], classes, args.devkit))
    class_names = class_names_from_devkit(classes, devkit_contents()["leaves"]) if args.devkit else list(classes)
    return classes, class_names, splits


def add_arguments(parser):
    parser.add_argument("--train", required=True, help="ILSVRC2012_img_train.tar, or its extracted folder")
    parser.add_argument("--val", help="ILSVRC2012_img_val.tar, or its extracted folder")
    parser.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz, or its extracted folder")
