"""The shard reader against shards written by preprocess.writer with known contents."""
import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest
import simplejpeg

from mpiconvnet.data.shards import DatasetError, ShardedDataset, shard_filename
from preprocess.merge import merge_dataset
from preprocess.writer import ShardWriter

SIZE = 16
CLASSES = ["cat", "dog", "emu"]


def known_image(index):
    """A smooth image that identifies its index (JPEG keeps smooth images close)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([(index * 37 % 200) + x * 2, (index * 11 % 200) + y * 2, np.full_like(x, index % 250)], -1)
    return image.astype(np.uint8)


def pack(root, image_format, shard_sizes=(4, 3, 5), val_sizes=(2,)):
    """Write shards whose image g (global order) is known_image(100 + g) with label g % 3."""
    root = str(root)
    split_shards = {}
    for split, sizes in (("train", shard_sizes), ("val", val_sizes)):
        names, g = [], 0 if split == "train" else 1000
        for number, count in enumerate(sizes):
            name = shard_filename(split, number)
            writer = ShardWriter(root, name, split, CLASSES, SIZE, image_format, capacity=count)
            for _ in range(count):
                pixels = known_image(100 + g)
                encoded = simplejpeg.encode_jpeg(pixels, quality=95) if image_format == "jpeg" else None
                writer.add(pixels, g % 3, f"{split}/img{g}.jpg", g, encoded)
                g += 1
            writer.skip(f"{split}/broken{number}.jpg", "truncated")
            writer.finish()
            names.append(name)
        split_shards[split] = names
    settings = dict(classes=CLASSES, class_names=CLASSES, image_size=SIZE, format=image_format,
                    resize="shorter-crop", seed=0)
    merge_dataset(root, settings, split_shards)
    return root


@pytest.fixture(params=["raw", "jpeg"])
def packed(tmp_path, request):
    return pack(tmp_path, request.param), request.param


def test_metadata_and_labels(packed):
    root, image_format = packed
    ds = ShardedDataset(root, "train")
    assert (ds.num_images, ds.image_size, ds.num_classes, ds.format) == (12, SIZE, 3, image_format)
    assert ds.classes == CLASSES
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, np.arange(12) % 3)
    assert ShardedDataset(root, "val").num_images == 2


def test_read_any_order_with_repeats(packed):
    root, image_format = packed
    ds = ShardedDataset(root, "train")
    order = [11, 0, 5, 5, 3, 4, 0, 7]          # crosses shards, unsorted, repeated
    images = ds.read(order)
    assert images.shape == (len(order), SIZE, SIZE, 3) and images.dtype == np.uint8
    # jpeg is lossy; quality 95 on smooth images stays within a few levels
    tolerance = 0 if image_format == "raw" else 6
    for slot, g in enumerate(order):
        diff = np.abs(images[slot].astype(int) - known_image(100 + g).astype(int)).max()
        assert diff <= tolerance, (slot, g, diff)
    assert ds.read([]).shape == (0, SIZE, SIZE, 3)
    with pytest.raises(IndexError):
        ds.read([12])
    ds.close()


def test_read_into_a_reused_buffer(packed):
    root, _ = packed
    ds = ShardedDataset(root, "train")
    order = [11, 0, 5, 5, 3]
    buffer = np.full((8, SIZE, SIZE, 3), 77, np.uint8)     # poisoned, and larger than needed
    images = ds.read(order, out=buffer)
    assert images.base is buffer or images is buffer
    np.testing.assert_array_equal(images, ds.read(order))
    assert (buffer[len(order):] == 77).all()
    with pytest.raises(ValueError, match="expected at least"):
        ds.read(order, out=np.empty((2, SIZE, SIZE, 3), np.uint8))
    ds.close()


def test_statistics(packed):
    root, _ = packed
    ds = ShardedDataset(root, "train")
    stack = np.stack([known_image(100 + g) for g in range(12)]).astype(np.float64)
    np.testing.assert_allclose(ds.mean_image(), stack.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(ds.mean, stack.reshape(-1, 3).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(ds.std, stack.reshape(-1, 3).std(axis=0), rtol=1e-4)
    assert ds.mean.dtype == np.float32 and ds.mean_image().dtype == np.float32
    skipped = open(os.path.join(root, "skipped.tsv")).read().splitlines()
    assert len(skipped) == 1 + 4 and "train\ttrain/broken0.jpg\ttruncated" in skipped


def _read_in_child(ds, queue):
    queue.put(ds.read([6, 1]))


def test_safe_across_fork_and_pickle(tmp_path):
    root = pack(tmp_path, "raw")
    ds = ShardedDataset(root, "train")
    expected = ds.read([6, 1])              # the parent now holds open handles
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(ds, queue))
    child.start()
    np.testing.assert_array_equal(queue.get(timeout=60), expected)
    child.join(60)
    assert child.exitcode == 0
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.read([6, 1]), expected)
    # the parent's handles still work after the child exited
    np.testing.assert_array_equal(ds.read([6, 1]), expected)


def test_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset.json not found; pack the data first with python -m preprocess"):
        ShardedDataset(tmp_path, "train")
    root = pack(tmp_path, "raw", val_sizes=())
    index_path = os.path.join(root, "dataset.json")
    index = json.load(open(index_path))
    index["splits"].pop("val")
    json.dump(index, open(index_path, "w"))
    with pytest.raises(DatasetError, match=r"no 'val' split.*--val"):
        ShardedDataset(root, "val")
    ds = ShardedDataset(root, "train")
    os.remove(os.path.join(root, "train-00001.h5"))   # gone after the data set was opened
    ds.read([0])                             # shard 0 is fine
    with pytest.raises(DatasetError, match=r"train-00001.h5 not found; finish packing"):
        ds.read([5])
    with pytest.raises(DatasetError, match=r"train-00001.h5 not found; finish packing"):
        ShardedDataset(root, "train")        # gone before: found at once
    index["format_version"] = 99
    json.dump(index, open(index_path, "w"))
    with pytest.raises(DatasetError, match=r"format_version 99"):
        ShardedDataset(root, "train")


def test_shard_contradicting_the_index_is_caught(tmp_path):
    root = pack(tmp_path, "raw")
    index_path = os.path.join(root, "dataset.json")
    index = json.load(open(index_path))
    index["image_size"] = SIZE * 2
    json.dump(index, open(index_path, "w"))
    with pytest.raises(DatasetError, match=r"train-00000.h5: attribute 'image_size' is 16, dataset.json says 32"):
        ShardedDataset(root, "train").read([0])


def test_open_shards_stay_within_the_budget(tmp_path):
    root = pack(tmp_path, "raw")
    ds = ShardedDataset(root, "train")
    expected = ds.read(np.arange(12))
    ds.close()
    ds.read([0])                     # the budget is set on the first open in this process
    ds._max_open = 1
    for order in ([11, 0, 5], [4, 4, 9], np.arange(12)[::-1]):
        np.testing.assert_array_equal(ds.read(order), expected[order])
        assert len(ds._open) == 1


def test_image_offsets_by_either_walk_of_the_chunk_index(tmp_path):
    """chunk_iter (one walk) and get_chunk_info (older HDF5) find the same offsets, and the
    memory-mapped read they serve returns the written pixels."""
    import h5py

    from mpiconvnet.data.shards import raw_image_offsets

    class WithoutChunkIter:
        """A dataset id that offers only get_num_chunks/get_chunk_info, as before HDF5 1.12.3."""
        def __init__(self, dsid):
            self.get_num_chunks, self.get_chunk_info = dsid.get_num_chunks, dsid.get_chunk_info

    class Images:
        def __init__(self, images):
            self.shape, self.chunks, self.compression = images.shape, images.chunks, images.compression
            self.id = WithoutChunkIter(images.id)

    root = pack(tmp_path, "raw")
    ds = ShardedDataset(root, "train")
    with h5py.File(ds.shard_files[2], "r") as shard:
        fast = raw_image_offsets(shard["images"])
        assert fast is not None and len(fast) == 5 and len(set(fast.tolist())) == 5
        np.testing.assert_array_equal(raw_image_offsets(Images(shard["images"])), fast)
    raw = np.fromfile(ds.shard_files[2], dtype=np.uint8)
    for local in range(5):
        stored = raw[fast[local]:fast[local] + SIZE * SIZE * 3].reshape(SIZE, SIZE, 3)
        np.testing.assert_array_equal(stored, known_image(100 + 7 + local))


def test_a_shard_damaged_inside_is_one_line_naming_it(tmp_path):
    # the file opens (its superblock is fine) but a group's B-tree is zeros: h5py's own
    # errors on the reads that follow become one DatasetError naming the shard
    root = pack(tmp_path, "raw")
    path = os.path.join(root, "train-00000.h5")
    with open(path, "r+b") as f:
        f.seek(800)
        f.write(b"\0" * 400)
    with pytest.raises(DatasetError, match=rf"{path} is damaged \(.*\); check the set with python -m preprocess verify"):
        ShardedDataset(root, "train").labels
    with pytest.raises(DatasetError, match=rf"{path} is damaged"):
        ShardedDataset(root, "train").read([0])


def test_the_system_s_read_errors_are_not_called_damage(tmp_path):
    # too many open files, EIO from a network file system: the shard is fine, re-packing
    # would not help, so they pass through as what they are
    from mpiconvnet.data.shards import damage_named
    with pytest.raises(OSError, match="Too many open files"):
        with damage_named("train-00000.h5"):
            raise OSError(24, "Too many open files")
    with pytest.raises(DatasetError, match="train-00000.h5 is damaged"):
        with damage_named("train-00000.h5"):
            raise OSError("Unable to synchronously open object (bad object header version number)")
