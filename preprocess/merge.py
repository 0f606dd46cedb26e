"""Build dataset.json, mean_image.npy and skipped.tsv from finished shards and their receipts.

Runs once every shard exists (rank 0 under MPI, or whichever array task finds the set
complete). Everything it writes is deterministic in the shards, so two tasks merging at
once write the same bytes, and each file appears by an atomic rename.
"""
import io
import json
import os

import numpy as np

from mpiconvnet.data.shards import (FORMAT_VERSION, INDEX_FILE, LAYOUT, MEAN_IMAGE_FILE, SKIPPED_FILE, DatasetError,
                                    open_shard)
from preprocess.writer import receipt_path, write_atomic


def missing_shards(out_dir, shard_files):
    """Shards not yet finished: a shard counts once both the file and its receipt exist."""
    return [name for name in shard_files
            if not (os.path.exists(os.path.join(out_dir, name)) and os.path.exists(receipt_path(out_dir, name)))]


def read_receipt(out_dir, shard_file):
    with open(receipt_path(out_dir, shard_file)) as stream:
        return json.load(stream)


def train_statistics(out_dir, shard_files, image_size):
    """Mean image, per-channel mean and std (0-255 scale) from the sums kept in each shard."""
    sum_image = np.zeros((image_size, image_size, 3), dtype=np.float64)
    sum_squares = np.zeros(3, dtype=np.float64)
    count = 0
    for name in shard_files:
        with open_shard(os.path.join(out_dir, name)) as shard:
            sum_image += shard["sum_image"][()]
            sum_squares += shard.attrs["channel_sum_squares"]
            count += shard["labels"].shape[0]
    if count == 0:
        return np.zeros_like(sum_image, dtype=np.float32), [0.0] * 3, [0.0] * 3
    mean_image = sum_image / count
    pixels = count * image_size * image_size
    mean = sum_image.reshape(-1, 3).sum(axis=0) / pixels
    std = np.sqrt(np.maximum(sum_squares / pixels - mean ** 2, 0.0))
    return mean_image.astype(np.float32), [float(x) for x in mean], [float(x) for x in std]


def _tsv_field(text):
    # a tab or a line break inside a file name would split its row
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def merge_dataset(out_dir, settings, split_shards):
    """Write the index of a finished pack.

    settings: classes, class_names, image_size, format, resize, seed (from the plan).
    split_shards: {split: [shard file names in order]}.
    """
    splits, skipped_rows = {}, []
    for split, shard_files in split_shards.items():
        entries = []
        for name in shard_files:
            receipt = read_receipt(out_dir, name)
            # a stat, not a checksum: a re-run must not read 140 GB; verify reads every byte
            size = os.path.getsize(os.path.join(out_dir, name))
            if size != receipt.get("bytes", size):   # receipts before 2026-11-25 have no size
                raise DatasetError(f"{os.path.join(out_dir, name)} has {size} bytes where its receipt says "
                                   f"{receipt['bytes']} (truncated or changed since it was packed)")
            entries.append({"file": name, "num_images": receipt["num_images"], "sha256": receipt["sha256"]})
            skipped_rows += [(split, source, reason) for source, reason in receipt["skipped"]]
        splits[split] = {"num_images": sum(e["num_images"] for e in entries), "shards": entries}
    size = settings["image_size"]
    mean_image, mean, std = train_statistics(out_dir, split_shards.get("train", []), size)
    npy = io.BytesIO()
    np.save(npy, mean_image)
    write_atomic(os.path.join(out_dir, MEAN_IMAGE_FILE), npy.getvalue())
    skipped_rows.sort()
    lines = ["split\tsource\treason"] + ["\t".join(map(_tsv_field, row)) for row in skipped_rows]
    write_atomic(os.path.join(out_dir, SKIPPED_FILE), "\n".join(lines) + "\n")
    index = {
        "format_version": FORMAT_VERSION,
        "classes": settings["classes"],
        "class_names": settings["class_names"],
        "image_size": size,
        "layout": LAYOUT,
        "format": settings["format"],
        "resize": settings["resize"],
        "seed": settings["seed"],
        "mean": mean,
        "std": std,
        "mean_image": MEAN_IMAGE_FILE,
        "splits": splits,
        "skipped": len(skipped_rows),
    }
    # dataset.json last: its presence means the whole set is complete
    write_atomic(os.path.join(out_dir, INDEX_FILE), json.dumps(index, indent=1) + "\n")
    return index
