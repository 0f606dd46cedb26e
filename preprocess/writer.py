"""Write one shard atomically: NAME.h5.tmp first, renamed to NAME.h5 only when complete.

A shard that exists under its final name is therefore whole; a killed run leaves at most
a .tmp file, which the next run overwrites. Beside each shard the writer leaves a small
receipt in .pack/ (file sha256, image count, the inputs it had to skip) written *before*
the rename, so the merge never needs to re-read shard files to build dataset.json.
"""
import io
import json
import os

import h5py
import numpy as np

from mpiconvnet.data.shards import TMP_SUFFIX, file_sha256, shard_attributes

WORK_DIR = ".pack"   # per-shard receipts and the packing plan; inside the output directory


def receipt_path(out_dir, shard_file):
    return os.path.join(out_dir, WORK_DIR, shard_file + ".json")


def write_atomic(path, text):
    """Write a small file (str or bytes) so that it is either absent, the old one, or
    complete; a failed write (a full disk) leaves no temporary file behind."""
    tmp = f"{path}.{os.getpid()}{TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as stream:
            stream.write(text.encode() if isinstance(text, str) else text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class ShardWriter:
    """Collects one shard's images, then writes and publishes it.

    Raw pixels are written as they arrive, each image as its own chunk with
    write_direct_chunk (a 1,024-image shard at S=256 is 200 MB, too much to hold per
    worker; the chunk is the image's bytes unfiltered, so HDF5 has nothing to do but one
    pwrite: `add` took 0.16-0.18 ms an image with it, statistics included, against
    0.20-0.30 with 64-image blocks written through h5py's selection and chunk cache);
    JPEG bytes are collected and written as one flat array plus offsets. Per-shard sums for the training statistics are kept as the dataset
    `sum_image` and the attribute `channel_sum_squares`, so a resumed run merges statistics
    without decoding again. They are exact: summed in integers, narrow while they cannot
    overflow (cheap to add), widened into uint64 every WIDEN_EVERY images.
    """

    # 257 x 255 = 65,535 is the most a uint16 sum holds; 257 x 255^2 fits uint32 easily
    WIDEN_EVERY = 257

    def __init__(self, out_dir, shard_file, split, classes, image_size, image_format, capacity):
        self.out_dir = out_dir
        self.shard_file = shard_file
        self.path = os.path.join(out_dir, shard_file)
        self.tmp_path = self.path + TMP_SUFFIX
        self.split = split
        self.attributes = shard_attributes(split, classes, image_size, image_format)
        self.image_size = image_size
        self.image_format = image_format
        self.labels, self.sources, self.indices, self.skipped = [], [], [], []
        self.jpeg_sizes = []
        shape = (image_size, image_size, 3)
        self.sum_image = np.zeros(shape, dtype=np.uint64)
        self.channel_sum_squares = np.zeros(3, dtype=np.uint64)
        # the last few images' sums: adding into uint16 and uint32 costs ~0.12 ms an image at
        # S=256, against ~0.19 ms for uint32 plus float32 dot products (which also rounded)
        self.recent_sum = np.zeros(shape, dtype=np.uint16)
        self.recent_squares = np.zeros(shape, dtype=np.uint32)
        self.recent_count = 0
        self.squared = np.empty(shape, dtype=np.uint16)   # scratch: one image widened, then squared
        if os.path.exists(self.tmp_path):
            # a killed run's; a new file, not the old one truncated, in case a writer of it lives on
            os.remove(self.tmp_path)
        self.file = h5py.File(self.tmp_path, "w", locking=False)
        if image_format == "raw":
            shape = (capacity, image_size, image_size, 3)
            self.images = self.file.create_dataset("images", shape=shape, maxshape=shape, dtype=np.uint8,
                                                   chunks=(1, image_size, image_size, 3))
        else:
            self.jpeg_stream = io.BytesIO()

    def add(self, pixels, label, source, index, encoded=None):
        """Append one decoded image (uint8 S x S x 3); `encoded` holds its JPEG bytes for jpeg shards."""
        if pixels.shape != self.squared.shape or pixels.dtype != np.uint8:
            raise ValueError(f"image of shape {pixels.shape} and type {pixels.dtype}; the shard holds uint8 "
                             f"{self.squared.shape}")
        if self.image_format == "raw":
            # chunk k holds image k: the layout the raw reader maps (one chunk per image).
            # A raw chunk write checks no shape, hence the check above.
            self.images.id.write_direct_chunk((len(self.labels), 0, 0, 0), np.ascontiguousarray(pixels))
        else:
            self.jpeg_stream.write(encoded)
            self.jpeg_sizes.append(len(encoded))
        self.labels.append(label)
        self.sources.append(source)
        self.indices.append(index)
        self._add_to_sums(pixels)

    def _add_to_sums(self, pixels):
        np.copyto(self.squared, pixels)
        np.add(self.recent_sum, self.squared, out=self.recent_sum)
        np.multiply(self.squared, self.squared, out=self.squared)   # 255^2 fits uint16
        np.add(self.recent_squares, self.squared, out=self.recent_squares)
        self.recent_count += 1
        if self.recent_count == self.WIDEN_EVERY:
            self._widen_sums()

    def _widen_sums(self):
        self.sum_image += self.recent_sum
        # down the rows first: the (S*S, 3) column sums directly took 1.2 ms at S=256, this 0.08
        per_column = self.recent_squares.reshape(self.image_size, -1).sum(axis=0, dtype=np.uint64)
        self.channel_sum_squares += per_column.reshape(-1, 3).sum(axis=0)
        self.recent_sum.fill(0)
        self.recent_squares.fill(0)
        self.recent_count = 0

    def skip(self, source, reason):
        self.skipped.append((source, reason))

    def finish(self):
        """Close and publish in one go; returns the receipt."""
        return publish(self.close())

    def close(self):
        """Write the small datasets and the statistics and close the .tmp file.

        Returns what publish() needs. Kept apart from publishing so that the slow part of
        making a shard durable (fsync, hashing the file) can overlap the next shard's decoding.
        """
        count = len(self.labels)
        shard = self.file
        if self.image_format == "raw":
            self.images.resize(count, axis=0)
        else:
            offsets = np.zeros(count + 1, dtype=np.int64)
            offsets[1:] = np.cumsum(self.jpeg_sizes)
            flat = np.frombuffer(self.jpeg_stream.getvalue(), dtype=np.uint8)
            # contiguous: a reader fetches exactly one image's bytes, not a whole chunk
            shard.create_dataset("jpeg", data=flat, dtype=np.uint8)
            shard.create_dataset("jpeg_offsets", data=offsets)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(count)
        indices = np.asarray(self.indices, dtype=np.int64).reshape(count)
        shard.create_dataset("labels", data=labels)
        shard.create_dataset("index", data=indices)
        shard.create_dataset("source", data=np.asarray(self.sources, dtype=object).reshape(count),
                             dtype=h5py.string_dtype("utf-8"))
        self._widen_sums()
        # float64 as the format says; still exact below 2^53, i.e. up to 2^53 / 255^2 = 1.4e11
        # values per channel in a shard (2 M images at S=256)
        shard.create_dataset("sum_image", data=self.sum_image.astype(np.float64))
        for key, value in self.attributes.items():
            shard.attrs[key] = value
        shard.attrs["channel_sum_squares"] = self.channel_sum_squares.astype(np.float64)
        shard.close()
        return {"out_dir": self.out_dir, "file": self.shard_file, "num_images": count,
                "skipped": [list(s) for s in self.skipped]}

    def abandon(self):
        """Drop a half-written shard (an exception while packing it)."""
        try:
            self.file.close()
        except Exception:   # e.g. the full disk that got us here: that error is the one to report
            pass
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def publish(closed):
    """Make a closed .tmp shard durable, leave its receipt, then rename it into place.

    The order is what makes a kill at any point safe: until the rename the shard is only a
    .tmp file (redone by the next run), and the receipt exists before the final name does.
    """
    out_dir, shard_file = closed["out_dir"], closed["file"]
    path = os.path.join(out_dir, shard_file)
    tmp_path = path + TMP_SUFFIX
    with open(tmp_path, "rb+") as stream:
        os.fsync(stream.fileno())
    receipt = {"file": shard_file, "num_images": closed["num_images"], "sha256": file_sha256(tmp_path),
               "bytes": os.path.getsize(tmp_path), "skipped": closed["skipped"]}
    os.makedirs(os.path.join(out_dir, WORK_DIR), exist_ok=True)
    write_atomic(receipt_path(out_dir, shard_file), json.dumps(receipt))
    os.replace(tmp_path, path)
    return receipt
