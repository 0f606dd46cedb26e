"""Re-read a packed data set and check everything the reader and the trainer rely on.

    python -m preprocess verify /data/imagenet-256
    python -m preprocess verify /data/imagenet-256 --no-decode     # skip decoding jpeg shards

Checks, per split and shard: the file's sha256 against dataset.json (which catches a
truncated file and a flipped byte anywhere, image data included), the shard's attributes
and shapes, the content checksum of format version 1 shards (which carry one), labels
in range, indices unique and not negative, counts adding up, jpeg offsets increasing
and every jpeg decoding to S x S x 3; then the mean image, and that the train split is
not empty (the packer writes a set whose every input was skipped, for its skipped.tsv,
but nothing can train on it). Exits 1 naming the first bad file, or the empty split; 2
when there is no data set at all.
"""
import os
import sys

import numpy as np

from mpiconvnet.data.shards import (DatasetError, REPACK_HINT, check_shard, content_checksum, file_sha256,
                                    load_index, open_shard, shard_attributes, MEAN_IMAGE_FILE, SKIPPED_FILE)


def verify_shard(path, expected_sha256, attributes, num_images, num_classes, decode):
    """Raise DatasetError naming `path` at the first problem."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path} not found; re-run the python -m preprocess command that made this data set")
    # bytes first: HDF5 can hang or crash parsing damaged metadata, so it never sees a bad file
    if file_sha256(path) != expected_sha256:
        raise DatasetError(f"{path}: sha256 differs from dataset.json (the file changed or was truncated "
                           f"after packing); delete it and re-run the same python -m preprocess command")
    with open_shard(path) as shard:
        check_shard(shard, path, attributes, num_images)
        # format version 1 shards also hashed their datasets; the file sha256 above covers
        # the same bytes, so version 2 leaves it out (docs/data-format.md)
        if "content_sha256" in shard.attrs:
            try:
                checksum = content_checksum(shard)
            except (OSError, KeyError) as error:
                raise DatasetError(f"{path}: cannot read its data ({error}); {REPACK_HINT}") from None
            if checksum != shard.attrs["content_sha256"]:
                raise DatasetError(f"{path}: content checksum mismatch (image or label data corrupted); {REPACK_HINT}")
        labels, index = shard["labels"][()], shard["index"][()]
        if num_images and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetError(f"{path}: label outside 0..{num_classes - 1}; {REPACK_HINT}")
        if attributes["format"] == "jpeg":
            verify_jpegs(shard, path, attributes["image_size"], decode)
    return index


def verify_jpegs(shard, path, size, decode):
    offsets = shard["jpeg_offsets"][()]
    data = shard["jpeg"][()]
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] != len(data):
        raise DatasetError(f"{path}: jpeg_offsets are not increasing from 0 to {len(data)}; {REPACK_HINT}")
    if not decode:
        return
    import simplejpeg
    for i in range(len(offsets) - 1):
        try:
            shape = simplejpeg.decode_jpeg(data[offsets[i]:offsets[i + 1]].tobytes(), colorspace="RGB").shape
        except ValueError as error:
            raise DatasetError(f"{path}: image {i} does not decode ({error}); {REPACK_HINT}") from None
        if shape != (size, size, 3):
            raise DatasetError(f"{path}: image {i} decodes to {shape}, expected {(size, size, 3)}; {REPACK_HINT}")


def verify_dataset(root, decode=True, log=print):
    """Check the whole data set; returns the number of images checked, raises DatasetError."""
    index = load_index(root)
    size, classes = index["image_size"], index["classes"]
    checked = 0
    for split, entry in index["splits"].items():
        attributes = shard_attributes(split, classes, size, index["format"])
        seen = []
        for shard in entry["shards"]:
            path = os.path.join(root, shard["file"])
            seen.append(verify_shard(path, shard["sha256"], attributes, shard["num_images"], len(classes), decode))
            checked += shard["num_images"]
        positions = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
        total = sum(shard["num_images"] for shard in entry["shards"])
        if total != entry["num_images"]:
            raise DatasetError(f"{os.path.join(root, 'dataset.json')}: split {split!r} says {entry['num_images']} "
                               f"images, its shards hold {total}; {REPACK_HINT}")
        if len(np.unique(positions)) != len(positions):
            raise DatasetError(f"{root}: split {split!r} holds an input twice; {REPACK_HINT}")
        if len(positions) and positions.min() < 0:
            raise DatasetError(f"{root}: split {split!r} holds a negative input index; {REPACK_HINT}")
        count = len(entry["shards"])
        log(f"verify: {split}: {total} images in {count} shard{'' if count == 1 else 's'} ok")
    mean_path = os.path.join(root, index.get("mean_image", MEAN_IMAGE_FILE))
    if not os.path.isfile(mean_path):
        raise DatasetError(f"{mean_path} not found; {REPACK_HINT}")
    try:
        mean_image = np.load(mean_path, allow_pickle=False)
    except (OSError, ValueError) as error:   # truncated, not an .npy, pickled objects
        raise DatasetError(f"{mean_path} cannot be read ({error}); {REPACK_HINT}") from None
    if mean_image.shape != (size, size, 3) or not np.all(np.isfinite(mean_image)):
        raise DatasetError(f"{mean_path}: shape {mean_image.shape} or values are wrong; {REPACK_HINT}")
    if index["splits"].get("train", {}).get("num_images", 0) == 0:
        raise DatasetError(f"{root}: the train split holds no images (every input was skipped: see "
                           f"{os.path.join(root, SKIPPED_FILE)}); fix the inputs and {REPACK_HINT}")
    return checked


def add_arguments(parser):
    parser.add_argument("dir", help="the folder holding dataset.json")
    parser.add_argument("--no-decode", action="store_true", help="do not decode every image of jpeg shards")


def main(args):
    try:
        checked = verify_dataset(args.dir, decode=not args.no_decode)
    except DatasetError as error:
        print(f"verify: {error}", file=sys.stderr)
        return 2 if "dataset.json not found" in str(error) else 1
    print(f"verify: {args.dir}: all {checked} images ok")
    return 0
