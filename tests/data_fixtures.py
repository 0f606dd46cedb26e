"""Tiny packed data sets for tests, written straight from docs/data-format.md with
h5py, numpy and simplejpeg (not through preprocess or the reader, so the reader is
checked against the document, not against itself).

Every image is one flat colour that encodes its global index in the split: channel c
holds 16 * digit_c + 8, with digit_c the c-th base-16 digit of the index. Levels 16
apart survive JPEG (flat blocks round-trip within a few levels) and crops, flips and
mean subtraction, so a test can tell which image arrived where with decode_index.
"""
import hashlib
import json
import os

import h5py
import numpy as np

LEVEL_STEP = 16
MAX_IMAGES = LEVEL_STEP ** 3


def label_of(index, num_classes):
    """The label the fixture gives image `index`: not monotone in the index, so a label
    read from the wrong position shows up."""
    return (np.asarray(index, dtype=np.int64) * 7 + 3) % num_classes


def colour_of(index):
    """uint8 (..., 3): the flat colour of image `index`."""
    index = np.asarray(index, dtype=np.int64)
    digits = np.stack([(index // LEVEL_STEP ** c) % LEVEL_STEP for c in range(3)], axis=-1)
    return (LEVEL_STEP * digits + LEVEL_STEP // 2).astype(np.uint8)


def decode_index(pixels):
    """int64 (...): the image index from pixel values (..., 3) on the 0-255 scale."""
    digits = np.floor(np.asarray(pixels, dtype=np.float64) / LEVEL_STEP).astype(np.int64)
    return digits[..., 0] + LEVEL_STEP * digits[..., 1] + LEVEL_STEP ** 2 * digits[..., 2]


def _encode_jpeg(image):
    import simplejpeg
    return np.frombuffer(simplejpeg.encode_jpeg(image, quality=95, colorspace="RGB"), dtype=np.uint8)


def _write_split(root, split, num_images, num_classes, size, image_format, shard_size, classes):
    """Write the shards of one split; return (dataset.json entry, sum and count of pixels)."""
    entry = {"num_images": num_images, "shards": []}
    for number, start in enumerate(range(0, num_images, shard_size)):
        index = np.arange(start, min(start + shard_size, num_images), dtype=np.int64)
        images = np.broadcast_to(colour_of(index)[:, None, None, :], (len(index), size, size, 3))
        name = f"{split}-{number:05d}.h5"
        path = os.path.join(root, name)
        with h5py.File(path + ".tmp", "w") as shard:
            shard.attrs.update({"format_version": 1, "split": split, "classes": classes,
                                "image_size": size, "layout": "NHWC", "format": image_format})
            shard["labels"] = label_of(index, num_classes)
            shard["index"] = index
            shard.create_dataset("source", data=[f"{split}/{i:06d}.png" for i in index],
                                 dtype=h5py.string_dtype())
            if image_format == "raw":
                shard.create_dataset("images", data=np.ascontiguousarray(images), chunks=(1, size, size, 3))
            else:
                encoded = [_encode_jpeg(np.ascontiguousarray(image)) for image in images]
                shard["jpeg"] = np.concatenate(encoded)
                shard["jpeg_offsets"] = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
        os.rename(path + ".tmp", path)
        with open(path, "rb") as stream:
            digest = hashlib.sha256(stream.read()).hexdigest()
        entry["shards"].append({"file": name, "num_images": len(index), "sha256": digest})
    return entry


def write_tiny_dataset(root, num_train, num_val, num_classes, size, format="raw", shard_size=16, classes=None):
    """Write a complete data set under root (dataset.json, mean_image.npy, shards,
    skipped.tsv) and return root. num_val=0 leaves the val split out. classes: the class
    names in label order (default n00000000, n00000001, ...)."""
    if num_train + num_val > MAX_IMAGES:
        raise ValueError(f"the colour code holds {MAX_IMAGES} images per split")
    os.makedirs(root, exist_ok=True)
    classes = classes or [f"n{c:08d}" for c in range(num_classes)]
    splits = {"train": _write_split(root, "train", num_train, num_classes, size, format, shard_size, classes)}
    if num_val:
        splits["val"] = _write_split(root, "val", num_val, num_classes, size, format, shard_size, classes)
    # images are flat, so the mean image is the per-channel mean everywhere
    colours = colour_of(np.arange(num_train)).astype(np.float64)
    # small sets leave the high digit constant (std 0); a floor of 1 keeps division by
    # the std finite, as it is for any real photo collection
    mean, std = colours.mean(axis=0), np.maximum(colours.std(axis=0), 1.0)
    np.save(os.path.join(root, "mean_image.npy"),
            np.broadcast_to(mean.astype(np.float32), (size, size, 3)).copy())
    index = {
        "format_version": 1, "classes": classes, "class_names": [f"class {c}" for c in range(num_classes)],
        "image_size": size, "layout": "NHWC", "format": format, "resize": "squash", "seed": 0,
        "mean": mean.tolist(), "std": std.tolist(), "mean_image": "mean_image.npy",
        "splits": splits, "skipped": 0,
    }
    with open(os.path.join(root, "dataset.json"), "w") as stream:
        json.dump(index, stream, indent=1)
    with open(os.path.join(root, "skipped.tsv"), "w") as stream:
        stream.write("split\tsource\treason\n")
    return root
