"""Read a packed data set: `dataset.json` plus HDF5 shards (docs/data-format.md).

    from mpiconvnet.data.shards import ShardedDataset, DatasetError
    ds = ShardedDataset("/data/imagenet", "train")
    images = ds.read([5, 3, 5])          # uint8 (3, S, S, 3), in the order asked
    labels = ds.labels[[5, 3, 5]]

The writer (`python -m preprocess`) and this reader share the constants and the checks
below, so the two sides cannot drift apart.

Shards are opened lazily, in the process that reads them: h5py handles must never cross
a fork, so a reader created in a parent and used in loader worker processes opens its
own handles in each worker.
"""
import contextlib
import hashlib
import json
import os
from collections import OrderedDict

import numpy as np

FORMAT_VERSION = 2   # what the writer writes
# what the reader reads: version 1 shards also carry the attribute content_sha256, which
# only verify uses (docs/data-format.md); everything else is laid out alike
READABLE_FORMAT_VERSIONS = (1, 2)
LAYOUT = "NHWC"
FORMATS = ("raw", "jpeg")
RESIZE_MODES = ("shorter-crop", "squash")
SPLITS = ("train", "val")
INDEX_FILE = "dataset.json"
MEAN_IMAGE_FILE = "mean_image.npy"
SKIPPED_FILE = "skipped.tsv"
TMP_SUFFIX = ".tmp"
PACK_HINT = "pack the data first with python -m preprocess folder|imagenet (synth makes images to pack)"
REPACK_HINT = "re-pack it with python -m preprocess"


class DatasetError(Exception):
    """A data set on disk is missing, incomplete or not in the expected format."""


def shard_filename(split, number):
    """The file name of shard `number` of `split`: train-00000.h5, val-00012.h5, ..."""
    return f"{split}-{number:05d}.h5"


def shard_attributes(split, classes, image_size, image_format):
    """The attributes every shard carries; the writer stores them, the reader checks them."""
    return {
        "format_version": FORMAT_VERSION,
        "split": split,
        "classes": list(classes),
        "image_size": int(image_size),
        "layout": LAYOUT,
        "format": image_format,
    }


def image_datasets(image_format):
    """The names of the datasets holding the pixels for a storage format."""
    return ("images",) if image_format == "raw" else ("jpeg", "jpeg_offsets")


def content_checksum(shard):
    """sha256 over a shard's data (pixels, labels, index, sources), independent of HDF5 layout.

    Stored as the shard attribute `content_sha256` by format version 1 writers (version 2
    relies on the file sha256 in dataset.json). HDF5 checksums only its metadata, so a
    flipped byte inside image data would otherwise go unnoticed; hashing the arrays also
    stays valid if a shard is rewritten with other chunking or compression. The pixels come
    first so that the writer can hash each image as it arrives instead of re-reading it.
    """
    digest = hashlib.sha256()
    for name in image_datasets(shard.attrs["format"]):
        data = shard[name]
        # hash in slices so a 200 MB raw shard never needs a second full copy
        step = max(1, (64 << 20) // max(1, data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64))))
        for start in range(0, data.shape[0], step):
            digest.update(np.ascontiguousarray(data[start:start + step]).tobytes())
    update_checksum_tail(digest, shard["labels"][()], shard["index"][()], shard["source"].asstr()[()])
    return digest.hexdigest()


def update_checksum_tail(digest, labels, index, sources):
    """The part of content_checksum after the pixels: labels, index (int64 LE), sources (UTF-8 + NUL)."""
    for values in (labels, index):
        digest.update(np.ascontiguousarray(values, dtype="<i8").tobytes())
    for source in sources:
        digest.update(source.encode("utf-8") + b"\0")


def file_sha256(path):
    """sha256 of a whole file, read in 4 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_index(root):
    """Parse `root/dataset.json` and check the fields every reader relies on."""
    path = os.path.join(root, INDEX_FILE)
    if not os.path.isfile(path):
        raise DatasetError(f"{path} not found; {PACK_HINT}")
    try:
        with open(path) as stream:
            index = json.load(stream)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path} cannot be parsed ({error}); {REPACK_HINT}") from None
    if not isinstance(index, dict):
        raise DatasetError(f"{path}: not a JSON object; {REPACK_HINT}")
    version = index.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        readable = " or ".join(map(str, READABLE_FORMAT_VERSIONS))
        raise DatasetError(f"{path}: format_version {version!r}, this reader reads {readable}; {REPACK_HINT}")
    for key in ("classes", "image_size", "format", "splits", "mean", "std"):
        if key not in index:
            raise DatasetError(f"{path}: field {key!r} missing; {REPACK_HINT}")
    if index["format"] not in FORMATS:
        raise DatasetError(f"{path}: format {index['format']!r} is not one of {FORMATS}; {REPACK_HINT}")
    problem = _index_shape_problem(index)
    if problem:
        raise DatasetError(f"{path}: {problem}; {REPACK_HINT}")
    return index


def _index_shape_problem(index):
    """What is wrong with the types of dataset.json's fields (a hand edit, another tool), or None."""
    def is_int(value, low=0):
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    classes = index["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        return "'classes' is not a list of class names"
    if not is_int(index["image_size"], 1):
        return f"'image_size' {index['image_size']!r} is not a positive integer"
    for key in ("mean", "std"):
        if not (isinstance(index[key], list) and len(index[key]) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in index[key])):
            return f"'{key}' is not a list of 3 numbers"
    if not (isinstance(index["splits"], dict) and index["splits"]):
        return "'splits' is not an object of splits"
    for split, entry in index["splits"].items():
        if split not in SPLITS or not isinstance(entry, dict):
            return f"split {split!r} is not one of {', '.join(SPLITS)} with an object of shards"
        if not is_int(entry.get("num_images")) or not isinstance(entry.get("shards"), list):
            return f"split {split!r} lacks 'num_images' or a list of 'shards'"
        for shard in entry["shards"]:
            if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and shard["file"]
                    and is_int(shard.get("num_images")) and isinstance(shard.get("sha256"), str)):
                return f"split {split!r} has a shard entry without 'file', 'num_images' and 'sha256': {shard!r}"
    return None


def open_shard(path):
    """Open a shard read-only without HDF5 file locking (locks fail on many parallel file systems)."""
    import h5py
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise DatasetError(f"{path} not found; finish packing by re-running the same python -m preprocess command") from None
    except OSError as error:
        raise DatasetError(f"{path} is not a readable HDF5 shard ({error}); {REPACK_HINT}") from None


@contextlib.contextmanager
def damage_named(path):
    """h5py's errors from a shard damaged inside (a header, a B-tree: the file opens, a read
    fails) as one DatasetError naming the file, as open_shard's are."""
    try:
        yield
    except (DatasetError, RecursionError, NotImplementedError):
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise   # the system's error (too many open files, EIO from the file system): not the file's
        raise DatasetError(f"{path} is damaged ({error}); check the set with python -m preprocess verify, "
                           f"and {REPACK_HINT}") from None


def check_shard(shard, path, expected_attributes, num_images):
    """Raise DatasetError unless an open shard matches what dataset.json says about it."""
    for key, want in expected_attributes.items():
        if key not in shard.attrs:
            raise DatasetError(f"{path}: attribute {key!r} missing; {REPACK_HINT}")
        have = shard.attrs[key]
        if key == "classes":
            have = [x.decode() if isinstance(x, bytes) else str(x) for x in have]
        elif hasattr(have, "item"):
            have = have.item()
        if isinstance(have, bytes):
            have = have.decode()
        if key == "format_version" and have in READABLE_FORMAT_VERSIONS:
            continue   # a pack resumed across a version change mixes shards of both
        if have != want:
            shown = f"{len(have)} classes" if key == "classes" else repr(have)
            wanted = f"{len(want)} classes" if key == "classes" else repr(want)
            raise DatasetError(f"{path}: attribute {key!r} is {shown}, dataset.json says {wanted}; {REPACK_HINT}")
    size = expected_attributes["image_size"]
    for name in ("labels", "index", "source"):
        if name not in shard or shard[name].shape != (num_images,):
            shape = shard[name].shape if name in shard else "missing"
            raise DatasetError(f"{path}: dataset {name!r} has shape {shape}, expected ({num_images},); {REPACK_HINT}")
    if expected_attributes["format"] == "raw":
        want_shape = (num_images, size, size, 3)
        have_shape = shard["images"].shape if "images" in shard else "missing"
        if have_shape != want_shape:
            raise DatasetError(f"{path}: dataset 'images' has shape {have_shape}, expected {want_shape}; {REPACK_HINT}")
    else:
        have_shape = shard["jpeg_offsets"].shape if "jpeg_offsets" in shard else "missing"
        if have_shape != (num_images + 1,) or "jpeg" not in shard:
            raise DatasetError(f"{path}: dataset 'jpeg_offsets' has shape {have_shape}, expected ({num_images + 1},); {REPACK_HINT}")


def open_file_budget():
    """How many shards a reader may keep open: a quarter of the descriptor limit (a raw
    shard read by pread holds two: h5py's and our own), after raising the soft limit to the
    hard one (ImageNet's 1,252 train shards exceed the common soft 1,024)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    except (ImportError, ValueError, OSError):
        soft = 1024
    return max(16, min(soft, 65536) // 4)


def raw_image_offsets(images):
    """int64 (n,): the file offset of each image of a raw shard, or None when the images
    are not stored one unfiltered chunk each (then h5py must decode them)."""
    n, size = images.shape[0], int(np.prod(images.shape[1:]))
    if images.chunks != (1,) + images.shape[1:] or images.compression is not None:
        return None
    dsid = images.id
    if dsid.get_num_chunks() != n:
        return None
    offsets = np.full(n, -1, dtype=np.int64)
    usable = [True]

    def record(info):
        if info.filter_mask != 0 or info.size != size:
            usable[0] = False
        else:
            offsets[info.chunk_offset[0]] = info.byte_offset

    # one walk over the chunk index: get_chunk_info(k) walks it again for every k, which
    # took 40 ms for a 1,024-image shard (50 s per loader process per ImageNet epoch)
    # against 1.8 ms for chunk_iter (HDF5 >= 1.12.3)
    if hasattr(dsid, "chunk_iter"):
        dsid.chunk_iter(record)
    else:
        for k in range(n):
            record(dsid.get_chunk_info(k))
    return None if not usable[0] or (offsets < 0).any() else offsets


class OpenShard:
    """One shard opened for reading in this process: the HDF5 file, and for jpeg shards
    the image offsets in the flat byte array; for raw shards stored one unfiltered chunk
    per image, a plain descriptor and each image's file offset, so an image is one pread
    instead of a trip through h5py: h5py's fancy selection costs ~30 ms per image on
    one-image chunks, a plain images[i] ~0.4 ms, a pread ~20 us. (A memory map of the
    file was tried: 1.2x slower than pread on pages a process touches for the first
    time, which is every page of an epoch; docs/benchmarks-loader.md.)"""

    def __init__(self, path, attributes, num_images, image_format):
        self.file = open_shard(path)
        self.fd = None
        try:
            with damage_named(path):
                check_shard(self.file, path, attributes, num_images)
                if image_format == "jpeg":
                    self.offsets = self.file["jpeg_offsets"][()]
                else:
                    self.offsets = raw_image_offsets(self.file["images"])
                    if self.offsets is not None:
                        self.fd = os.open(path, os.O_RDONLY)
                        self.offset_list = self.offsets.tolist()   # Python ints: no NumPy scalar per read
        except DatasetError:
            self.close()
            raise

    def close(self):
        self.file.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ShardedDataset:
    """One split of a packed data set, indexed globally: shards in dataset.json order,
    images in shard order.

    The constructor reads dataset.json only. Shards open on first read, in the reading
    process, and stay open until close(); after a fork the child opens its own.
    """

    def __init__(self, root, split):
        self.root = os.fspath(root)
        self.split = split
        index = load_index(self.root)
        index_path = os.path.join(self.root, INDEX_FILE)
        if split not in index["splits"]:
            present = ", ".join(sorted(index["splits"])) or "none"
            flag = "--val" if split == "val" else "--train"
            raise DatasetError(f"{index_path} has no {split!r} split (has: {present}); pack it with {flag} DIR")
        entry = index["splits"][split]
        self.classes = list(index["classes"])
        self.num_classes = len(self.classes)
        self.class_names = list(index.get("class_names", self.classes))
        self.image_size = int(index["image_size"])
        self.format = index["format"]
        self.resize = index.get("resize")
        self.mean = np.asarray(index["mean"], dtype=np.float32).reshape(3)
        self.std = np.asarray(index["std"], dtype=np.float32).reshape(3)
        self.mean_image_path = os.path.join(self.root, index.get("mean_image", MEAN_IMAGE_FILE))
        self.shard_files = [os.path.join(self.root, shard["file"]) for shard in entry["shards"]]
        # a stat each, so that a missing shard stops a run before its first step, not at
        # the evaluation after an epoch of training (a damaged one is found when read)
        for path in self.shard_files:
            if not os.path.isfile(path):
                raise DatasetError(f"{path} not found; finish packing by re-running the same python -m preprocess "
                                   f"command")
        self.shard_sizes = np.array([shard["num_images"] for shard in entry["shards"]], dtype=np.int64)
        # shard_offsets[k] is the global index of shard k's first image
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self.num_images = int(self.shard_offsets[-1])
        if self.num_images != entry.get("num_images", self.num_images):
            raise DatasetError(f"{index_path}: split {split!r} says {entry['num_images']} images but its shards hold {self.num_images}; {REPACK_HINT}")
        self._attributes = shard_attributes(split, self.classes, self.image_size, self.format)
        self._labels = None
        # shard number -> OpenShard, least recently used first
        self._open = OrderedDict()
        self._owner_pid = None       # the process that opened the handles in self._open
        self._max_open = None        # set on first open, in the reading process

    def __len__(self):
        return self.num_images

    def __repr__(self):
        return (f"ShardedDataset({self.root!r}, {self.split!r}: {self.num_images} images, "
                f"{self.num_classes} classes, {self.image_size}px {self.format}, {len(self.shard_files)} shards)")

    def mean_image(self):
        """The mean training image, float32 (S, S, 3) on the 0-255 scale."""
        if not os.path.isfile(self.mean_image_path):
            raise DatasetError(f"{self.mean_image_path} not found; {REPACK_HINT}")
        try:
            mean = np.load(self.mean_image_path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as error:
            raise DatasetError(f"{self.mean_image_path} cannot be read ({error}); {REPACK_HINT}") from None
        if mean.shape != (self.image_size, self.image_size, 3):
            raise DatasetError(f"{self.mean_image_path} has shape {mean.shape}, expected "
                               f"{(self.image_size, self.image_size, 3)}; {REPACK_HINT}")
        return mean

    @property
    def labels(self):
        """int64 (num_images,): every label of the split, in global order."""
        if self._labels is None:
            labels = np.empty(self.num_images, dtype=np.int64)
            for number, path in enumerate(self.shard_files):
                # opened and closed here, so that asking for labels before a fork leaves
                # no HDF5 handle for the children to inherit
                with open_shard(path) as shard, damage_named(path):
                    check_shard(shard, path, self._attributes, int(self.shard_sizes[number]))
                    start, stop = self.shard_offsets[number], self.shard_offsets[number + 1]
                    labels[start:stop] = shard["labels"][()]
            bad = (labels < 0) | (labels >= self.num_classes)
            if bad.any():
                where = int(np.searchsorted(self.shard_offsets, np.argmax(bad), side="right")) - 1
                raise DatasetError(f"{self.shard_files[where]}: label outside 0..{self.num_classes - 1}; {REPACK_HINT}")
            self._labels = labels
        return self._labels

    def read(self, indices, out=None):
        """uint8 (len(indices), S, S, 3): the images at global `indices`, in the order given.

        `out`, a uint8 array of at least that many images, is filled and returned instead of
        a new array: a loader reusing one buffer saves the page faults of a fresh 12 MB
        batch, which cost as much as the reads themselves.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        size = self.image_size
        if out is None:
            out = np.empty((len(indices), size, size, 3), dtype=np.uint8)
        elif out.dtype != np.uint8 or out.shape[1:] != (size, size, 3) or len(out) < len(indices):
            raise ValueError(f"out has shape {out.shape} {out.dtype}, expected at least "
                             f"({len(indices)}, {size}, {size}, 3) uint8")
        out = out[:len(indices)]
        if len(indices) == 0:
            return out
        if indices.min() < 0 or indices.max() >= self.num_images:
            raise IndexError(f"image index out of range 0..{self.num_images - 1} "
                             f"(got {indices.min()}..{indices.max()}) in {self.split!r} of {self.root}")
        shard_of = np.searchsorted(self.shard_offsets, indices, side="right") - 1
        local_of = indices - self.shard_offsets[shard_of]
        # raw shards: image by image, one pread each straight into its row of `out`; a
        # batch of 1.28 M ImageNet images touches a different shard for almost every
        # image, so grouping by shard would cost more than it saves
        others = []
        image_bytes = out[0].nbytes
        for position, (number, local) in enumerate(zip(shard_of.tolist(), local_of.tolist())):
            shard = self._shard(number)
            if shard.fd is None:
                others.append(position)
            elif os.preadv(shard.fd, [out[position]], shard.offset_list[local]) != image_bytes:
                raise DatasetError(f"{self.shard_files[number]}: image {local} is cut short; "
                                   f"check it with python -m preprocess verify {self.root}")
        others = np.array(others, dtype=np.int64)
        for number in np.unique(shard_of[others]):
            positions = others[shard_of[others] == number]
            # h5py fancy indexing needs strictly increasing indices: read each image once
            # in sorted order, then scatter back to every position that asked for it
            wanted, inverse = np.unique(local_of[positions], return_inverse=True)
            with damage_named(self.shard_files[int(number)]):
                out[positions] = self._read_sorted(int(number), self._shard(int(number)), wanted)[inverse]
        return out

    def _shard(self, number):
        if self._owner_pid != os.getpid():
            # handles inherited through fork belong to the parent; drop them unused
            self._open = OrderedDict()
            self._owner_pid = os.getpid()
            self._max_open = open_file_budget()
        shard = self._open.get(number)
        if shard is not None:
            self._open.move_to_end(number)
            return shard
        if len(self._open) >= self._max_open:
            self._open.popitem(last=False)[1].close()
        shard = self._open[number] = OpenShard(self.shard_files[number], self._attributes,
                                               int(self.shard_sizes[number]), self.format)
        return shard

    def _read_sorted(self, number, shard, wanted):
        if self.format == "jpeg":
            return self._decode_jpegs(number, shard.file, shard.offsets, wanted)
        size = self.image_size
        images = np.empty((len(wanted), size, size, 3), dtype=np.uint8)
        data = shard.file["images"]
        for slot, local in enumerate(wanted):
            images[slot] = data[int(local)]   # filtered or oddly chunked shards: h5py decodes
        return images

    def _decode_jpegs(self, number, shard, offsets, wanted):
        import simplejpeg
        size = self.image_size
        data = shard["jpeg"]
        images = np.empty((len(wanted), size, size, 3), dtype=np.uint8)
        first, last = int(offsets[wanted[0]]), int(offsets[wanted[-1] + 1])
        dense = (last - first) <= 2 * int((offsets[wanted + 1] - offsets[wanted]).sum())
        block = data[first:last] if dense else None
        for slot, local in enumerate(wanted):
            start, stop = int(offsets[local]), int(offsets[local + 1])
            encoded = block[start - first:stop - first] if dense else data[start:stop]
            try:
                image = simplejpeg.decode_jpeg(encoded.tobytes(), colorspace="RGB")
            except ValueError as error:
                raise DatasetError(f"{self.shard_files[number]}: image {local} does not decode ({error}); "
                                   f"check it with python -m preprocess verify {self.root}") from None
            if image.shape != (size, size, 3):
                raise DatasetError(f"{self.shard_files[number]}: image {local} decodes to {image.shape}, "
                                   f"expected {(size, size, 3)}; {REPACK_HINT}")
            images[slot] = image
        return images

    def close(self):
        """Close the shards this process opened (safe to call more than once)."""
        if self._owner_pid == os.getpid():
            for shard in self._open.values():
                shard.close()
        self._open = OrderedDict()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __getstate__(self):
        # pickled into spawned workers: never send open handles
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_owner_pid"] = None
        return state
