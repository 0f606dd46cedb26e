"""Input lists: where each image of a split comes from, its name and its label.

A split's inputs are sorted by name (tar member order is not name order, and the position
in the sorted list is the image's `index` in the shards), so the same images give the same
shards whether they come from a folder tree or from the original archives.

Archives are never extracted: one pass over the tar headers records each member's byte
offset and size, and images are then read with pread() at those offsets, from any worker
in any order. Tars inside a tar (ImageNet's train archive holds one tar per class) are
indexed the same way, offsets added up. Member names are only ever used as labels and
source names, never as paths on disk.
"""
import os
import tarfile
from collections import OrderedDict

import numpy as np

from preprocess.decode import BadImage


class InputError(Exception):
    """A user-facing problem with the inputs; the message names the path and the fix."""


class FileInputs:
    """Images stored as files: names are relative paths, read by opening the file."""

    def __init__(self, names, labels, paths):
        self.names, self.labels, self.paths = names, np.asarray(labels, dtype=np.int64), paths

    def __len__(self):
        return len(self.names)

    def read(self, i):
        try:
            with open(self.paths[i], "rb") as stream:
                return stream.read()
        except OSError as error:
            raise BadImage(f"unreadable: {error.strerror or error}") from None


class ArchiveInputs:
    """Images stored as members of uncompressed tar archives, read by offset.

    With a folder of 1,000 per-class tars every shard touches nearly every archive, so open
    descriptors are kept in a small least-recently-used set instead of one per archive
    (which would hit the usual limit of 1,024 open files); reopening costs ~20 us against a
    ~3 ms decode.
    """

    MAX_OPEN = 128

    def __init__(self, names, labels, archives, archive_ids, offsets, sizes):
        self.names, self.labels = names, np.asarray(labels, dtype=np.int64)
        self.archives = archives
        self.archive_ids = np.asarray(archive_ids, dtype=np.int32)
        self.offsets, self.sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
        self._fds = OrderedDict()
        self._pid = None

    def __len__(self):
        return len(self.names)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"], state["_pid"] = OrderedDict(), None
        return state

    def read(self, i):
        if self._pid != os.getpid():
            # descriptors inherited through fork stay the parent's business
            self._fds, self._pid = OrderedDict(), os.getpid()
        archive = int(self.archive_ids[i])
        try:
            if archive in self._fds:
                self._fds.move_to_end(archive)
            else:
                if len(self._fds) >= self.MAX_OPEN:
                    os.close(self._fds.popitem(last=False)[1])
                self._fds[archive] = os.open(self.archives[archive], os.O_RDONLY)
            size = int(self.sizes[i])
            data = os.pread(self._fds[archive], size, int(self.offsets[i]))
        except OSError as error:
            raise BadImage(f"unreadable: {error.strerror or error}") from None
        if len(data) != size:
            raise BadImage(f"archive ends early: read {len(data)} of {size} bytes")
        return data


def sorted_inputs(kind, names, labels, *columns):
    """Sort every column by name; refuse duplicate names (they would be ambiguous in skipped.tsv)."""
    order = sorted(range(len(names)), key=names.__getitem__)
    names = [names[i] for i in order]
    for a, b in zip(names, names[1:]):
        if a == b:
            raise InputError(f"input name {a!r} occurs twice; remove the duplicate")
    picked = [[column[i] for i in order] for column in (labels,) + columns]
    return kind(names, *picked[:1], *picked[1:])


def is_hidden(name):
    return name.startswith(".")


def list_class_folders(root):
    """Sorted class-folder names under `root` (hidden ones ignored)."""
    if not os.path.isdir(root):
        raise InputError(f"{root} is not a directory; pass a folder with one subfolder per class")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not is_hidden(entry.name))
    return classes


def files_in_class_folders(root, classes, class_index):
    """FileInputs for root/CLASS/**/file, labelled by class_index[CLASS]; names 'CLASS/relpath'."""
    names, labels, paths = [], [], []
    for name in classes:
        top = os.path.join(root, name)
        for folder, subfolders, files in os.walk(top, followlinks=True):
            subfolders[:] = sorted(d for d in subfolders if not is_hidden(d))
            for file in sorted(files):
                if is_hidden(file):
                    continue
                path = os.path.join(folder, file)
                names.append(os.path.relpath(path, root).replace(os.sep, "/"))
                labels.append(class_index[name])
                paths.append(path)
    return sorted_inputs(FileInputs, names, labels, paths)


def tar_members(path, fileobj=None, base=0):
    """(name, absolute data offset, size) of every regular file in an uncompressed tar.

    Non-regular members (directories, links, devices) are left out: a link's target is a
    name chosen by whoever made the archive, and following it would turn names into paths.
    """
    try:
        with tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj) as archive:
            for member in archive:
                if member.isreg():
                    yield member.name, base + member.offset_data, member.size
    except tarfile.ReadError as error:
        where = path if fileobj is None else f"{path} (inner archive)"
        raise InputError(f"{where} is not an uncompressed tar archive ({error}); pass the original "
                         f".tar or the extracted folder") from None


def nested_tar_members(path):
    """(inner tar name, [(member name, absolute offset, size), ...]) for a tar of tars.
    Members that are not .tar files (a stray README) are not classes and are passed over."""
    with open(path, "rb") as stream:
        for inner_name, offset, size in list(tar_members(path)):
            if not inner_name.endswith(".tar"):
                continue
            window = ByteWindow(stream, offset, size)
            yield inner_name, list(tar_members(path, fileobj=window, base=offset))


class ByteWindow:
    """A read-only, seekable view of bytes [start, start + size) of an open file."""

    def __init__(self, stream, start, size):
        self.stream, self.start, self.size, self.position = stream, start, size, 0

    def read(self, count=-1):
        count = self.size - self.position if count is None or count < 0 else min(count, self.size - self.position)
        self.stream.seek(self.start + self.position)
        data = self.stream.read(count)
        self.position += len(data)
        return data

    def seek(self, position, whence=0):
        base = {0: 0, 1: self.position, 2: self.size}[whence]
        self.position = max(0, min(self.size, base + position))
        return self.position

    def tell(self):
        return self.position


def basename(member_name):
    """The last component of a tar member name ('./a/b.JPEG' -> 'b.JPEG')."""
    return member_name.rstrip("/").rsplit("/", 1)[-1]
