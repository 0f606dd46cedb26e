"""Input lists: where each image of a split comes from, its name and its label.

A split's inputs are sorted by name (tar member order is not name order, and the position
in the sorted list is the image's `index` in the shards), so the same images give the same
shards whether they come from a folder tree or from the original archives.

Archives are never extracted: one pass over the tar headers records each member's byte
offset and size, and images are then read with pread() at those offsets, from any worker
in any order. Tars inside a tar (ImageNet's train archive holds one tar per class) are
indexed the same way, offsets added up, by --workers processes at once. Member names are
only ever used as labels and source names, never as paths on disk.
"""
import os
import stat
import sys
import tarfile
import unicodedata
from collections import OrderedDict

import numpy as np

from preprocess.decode import DEFAULT_MAX_PIXELS, BadImage, refuse_by_start


class InputError(Exception):
    """A user-facing problem with the inputs; the message names the path and the fix."""


class FileInputs:
    """Images stored as files: names are relative paths, read by opening the file. An input
    found unusable while listing (a folder that cannot be listed) has its reason in
    `problems` and is skipped with it, so that it shows in skipped.tsv like a bad file."""

    def __init__(self, names, labels, paths, problems=None):
        self.names, self.labels, self.paths = names, np.asarray(labels, dtype=np.int64), paths
        self.problems = problems or [None] * len(names)

    def __len__(self):
        return len(self.names)

    def read(self, i, max_pixels=DEFAULT_MAX_PIXELS):
        """The input's bytes; BadImage where it cannot be packed (see read_judged)."""
        if self.problems[i]:
            raise BadImage(self.problems[i])
        try:
            # stat, not open: opening a FIFO waits forever for a writer, a device may do anything
            info = os.stat(self.paths[i])
            kind = not_regular(info.st_mode)
            if kind:
                raise BadImage(f"not a regular file ({kind})")
            with open(self.paths[i], "rb") as stream:
                return read_judged(stream.read, info.st_size, max_pixels)
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

    def read(self, i, max_pixels=DEFAULT_MAX_PIXELS):
        """The member's bytes; BadImage where it cannot be packed (see read_judged)."""
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
            data = read_judged(_member_reader(self._fds[archive], int(self.offsets[i]), size), size, max_pixels)
        except OSError as error:
            raise BadImage(f"unreadable: {error.strerror or error}") from None
        if len(data) != size:
            raise BadImage(f"archive ends early: read {len(data)} of {size} bytes")
        return data


def unseen_input(inputs):
    """A file of `inputs` (as rank 0 listed them) that this process does not see, or None.
    A rank on a node where the input tree is not mounted, or started in another folder
    with a relative --train, found every input it was given unreadable: it skipped them
    all and the pack ended with exit 0 and half its images. The first and last listed
    files stand for a folder tree (lexists: a dangling link is a bad input, not an unseen
    tree); every archive is looked at."""
    if isinstance(inputs, ArchiveInputs):
        paths = inputs.archives
    else:
        paths = [inputs.paths[i] for i in {0, len(inputs) - 1} if 0 <= i < len(inputs) and not inputs.problems[i]]
    return next((path for path in paths if not os.path.lexists(path)), None)


def _member_reader(fd, start, size):
    """read(count) over one archive member's bytes, as a file's read: count -1 for the rest."""
    done = 0

    def read(count):
        nonlocal done
        data = os.pread(fd, size - done if count < 0 else min(count, size - done), start + done)
        done += len(data)
        return data
    return read


HEAD_BYTES = 1 << 20   # nearly every image is smaller, and is read in one go


def read_judged(read, size, max_pixels):
    """All of an input of `size` bytes through read(count) (-1: the rest), but one longer
    than HEAD_BYTES only once refuse_by_start() has passed its first bytes: a stray 3 GB
    non-image was read whole (3.2 GB resident, 14 s) before the decoder refused it."""
    if size <= HEAD_BYTES:
        return read(-1)
    head = read(HEAD_BYTES)
    refuse_by_start(head, max_pixels)
    return head + read(-1)


def not_regular(mode):
    """What a file of this st_mode is when it is not a regular file, else None."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    for test, kind in kinds:
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "another kind of file"


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


def folder_entries(folder):
    """os.scandir(folder) as a list; a folder that cannot be listed is an InputError naming it."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as error:
        raise InputError(f"{folder} cannot be listed ({error.strerror or error}); make it readable "
                         f"(chmod u+rx) or pass another folder") from None


def list_class_folders(root):
    """Class-folder names under `root` as on disk (hidden ones ignored), sorted as the names
    recorded for them, printable(name), which the labels follow."""
    if not os.path.isdir(root):
        raise InputError(f"{root} is not a directory; pass a folder with one subfolder per class")
    classes = [entry.name for entry in folder_entries(root) if entry.is_dir() and not is_hidden(entry.name)]
    for name in classes:
        if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
            # the class lists beside exported weights hold one name a line: control characters
            # (C0, DEL and C1, whose NEL str.splitlines() breaks at, as at U+2028 and U+2029)
            raise InputError(f"{root}: class folder {name!r} has a line break or another control character in its "
                             f"name, which a class list cannot hold; rename it")
    classes.sort(key=printable)
    for a, b in zip(classes, classes[1:]):
        if printable(a) == printable(b):
            raise InputError(f"{root}: class folders {a!r} and {b!r} would both be recorded as {printable(b)!r}; "
                             f"rename one")
    return classes


def files_in_class_folders(root, classes, class_index):
    """FileInputs for root/CLASS/**/file, labelled by class_index[CLASS]; names 'CLASS/relpath'.
    A folder that cannot be listed is an input 'CLASS/relpath/' that is skipped, naming why;
    files directly in root belong to no class and are only warned of.
    Listing 20,000 files takes 3-5 us a file (11-13 us when each path was made relative on
    its own); listed by 2 processes it took longer here, so it stays serial."""
    loose = sorted(e.name for e in folder_entries(root) if not e.is_dir() and not is_hidden(e.name))
    if loose:
        warn(f"{root} holds files outside any class folder, which are not packed: {len(loose)} (e.g. "
             f"{printable(loose[0])!r})")
    names, labels, problems = [], [], []
    # every real folder is listed once, and a class folder only as its own class: a symlink
    # up the tree or into another class would otherwise list images again, mislabelled
    visited = {_folder_identity(os.path.join(root, name)) for name in ["", *classes]}
    for name in classes:
        found, unusable = _files_in_folder(root, name, visited)
        names.extend(found)
        labels.extend([class_index[name]] * len(found))
        problems.extend(unusable)
    paths = [os.path.join(root, *name.split("/")) for name in names]
    return sorted_inputs(FileInputs, [printable(name) for name in names], labels, paths, problems)


def warn(message):
    """One line on stderr about something odd in the inputs that does not stop the run."""
    print(f"preprocess: warning: {message}", file=sys.stderr)


def warn_of_empty_classes(classes, inputs, where):
    """A training class without a single input still gets its label, and nothing trains it."""
    counts = np.bincount(inputs.labels, minlength=len(classes))
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        warn(f"{where}: classes without files, whose labels no training image will have: {len(empty)} of "
             f"{len(classes)} (e.g. {empty[0]})")


def printable(name):
    """A file, folder or archive member name as text that HDF5, JSON and skipped.tsv can
    hold: a name that is not UTF-8 on disk or in the archive (Python keeps its bytes as
    surrogates) gets them as \\xNN escapes. Every name recorded passes through here."""
    try:
        name.encode()
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _folder_identity(path):
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _files_in_folder(root, name, visited):
    """('CLASS/relpath' of every file under root/CLASS, hidden ones and folders already in
    `visited` (which this extends) left out, and 'CLASS/relpath/' for each folder that
    cannot be listed, which os.walk would pass over in silence; [None or why, ...])."""
    found, problems = [], []   # problems: None for a file, the reason for an unlisted folder

    def unlisted(error):
        found.append(os.path.relpath(error.filename, root).replace(os.sep, "/") + "/")
        problems.append(f"unreadable folder: {error.strerror or error}; its files were not listed")

    for folder, subfolders, files in os.walk(os.path.join(root, name), onerror=unlisted, followlinks=True):
        kept = []
        for sub in sorted(d for d in subfolders if not is_hidden(d)):
            try:
                identity = _folder_identity(os.path.join(folder, sub))
            except OSError:   # a dangling link: os.walk lists it as a folder only if it resolves
                continue
            if identity not in visited:
                visited.add(identity)
                kept.append(sub)
        subfolders[:] = kept
        relative = os.path.relpath(folder, root).replace(os.sep, "/")   # once per folder
        files = [f"{relative}/{file}" for file in sorted(files) if not is_hidden(file)]
        found.extend(files)
        problems.extend([None] * len(files))
    return found, problems


def tar_members(path, fileobj=None, base=0):
    """[(name, absolute data offset, size), ...] of every regular file in an uncompressed tar.

    Non-regular members (directories, links, devices) are left out: a link's target is a
    name chosen by whoever made the archive, and following it would turn names into paths.
    Plain ustar/GNU headers (ImageNet's) are parsed here, 11 us a member against tarfile's
    30; an archive with anything else (pax or GNU long-name records, sparse files) is read
    by tarfile from the start, which then decides. A damaged header after the first, and
    an archive cut short (inside a header or a member's data, or before its end-of-archive
    block), are errors here and on tarfile's path alike: tarfile takes either for the end
    of the archive and silently drops every member after it.
    """
    try:
        return _any_tar_members(path, fileobj, base)
    except _DamagedHeader as error:
        raise InputError(f"{path}: the tar header at byte {base + error.args[0]} is damaged (bad checksum), so the "
                         f"members after it cannot be found; copy or download the archive again") from None
    except _Truncated as error:
        where = path if fileobj is None else f"{path} (the inner archive at byte {base})"
        raise InputError(f"{where} is truncated: {error}, so members are missing; copy or download the archive "
                         f"again") from None
    except OSError as error:
        raise InputError(f"{path} cannot be read ({error.strerror or error}); check the path") from None


def _any_tar_members(path, fileobj, base):
    try:
        if fileobj is None:
            with open(path, "rb") as stream:
                return _plain_tar_members(stream, base)
        return _plain_tar_members(fileobj, base)
    except _NotPlain:
        return _tarfile_members(path, fileobj, base)


def _tarfile_members(path, fileobj=None, base=0):
    if fileobj is not None:
        fileobj.seek(0)
    try:
        with tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj) as archive:
            members = [(member.name, base + member.offset_data, member.size) for member in archive if member.isreg()]
            _check_end_block(archive.fileobj, archive.offset)
            return members
    except tarfile.ReadError as error:
        where = path if fileobj is None else f"{path} (inner archive)"
        raise InputError(f"{where} is not an uncompressed tar archive ({error}); pass the original "
                         f".tar or the extracted folder") from None


class _NotPlain(Exception):
    """A tar header the fast path leaves to tarfile."""


class _DamagedHeader(Exception):
    """A header with a wrong checksum after the first: the archive is damaged."""


class _Truncated(Exception):
    """The archive ends before its end-of-archive block; str() says where."""


BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")             # tarfile's REGULAR_TYPES, less GNU sparse files
_EMPTY_KINDS = (b"1", b"2", b"3", b"4", b"5", b"6")   # links, devices, directories, fifos: no data


def _plain_tar_members(stream, base):
    """tarfile's answer for archives of plain headers, or _NotPlain (see tar_members)."""
    encoding = sys.getfilesystemencoding()
    end = stream.seek(0, os.SEEK_END)
    found, position = [], 0
    while True:
        stream.seek(position)
        header = stream.read(BLOCK)
        if len(header) != BLOCK:
            if position == 0:
                raise _NotPlain()   # empty or tiny: tarfile says what it is
            raise _Truncated(_cut_at(position, end))
        if not any(header):
            return found          # the end-of-archive block
        kind, size_field = header[156:157], header[124:136]
        if (kind not in _REGULAR and kind not in _EMPTY_KINDS) or size_field[0] & 0x80:
            raise _NotPlain()     # extension records, sparse files, base-256 sizes
        try:
            checksum, size = _octal(header[148:156]), _octal(size_field)
        except ValueError:
            raise _NotPlain() from None
        # the checksum counts its own field as spaces; tarfile accepts signed or unsigned bytes
        unsigned = sum(header) - sum(header[148:156]) + 8 * 32
        if checksum != unsigned and checksum != unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:]):
            if position == 0:
                raise _NotPlain()   # not a tar at all: tarfile says so
            # tarfile would take this for the end of the archive and drop every member after it
            raise _DamagedHeader(position)
        name = _text(header[0:100], encoding)
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"           # an old-style directory
        if kind in _EMPTY_KINDS:
            if size:
                raise _NotPlain()
            position += BLOCK
            continue
        prefix = _text(header[345:500], encoding)
        name = f"{prefix}/{name}" if prefix else name
        if position + BLOCK + size > end:
            raise _Truncated(f"it ends at byte {end}, inside the data of member {printable(name)!r}")
        found.append((name, base + position + BLOCK, size))
        position += BLOCK + -(-size // BLOCK) * BLOCK


def _cut_at(position, end):
    """Where an archive ends whose next header starts at `position`."""
    if end > position:
        return f"it ends at byte {end}, inside the tar header at byte {position}"
    return f"it ends at byte {end}, before the end-of-archive block"


def _check_end_block(stream, position):
    """Raise unless the block where tarfile stopped reading is the end-of-archive block."""
    end = stream.seek(0, os.SEEK_END)
    stream.seek(position)
    block = stream.read(BLOCK)
    if len(block) != BLOCK:
        raise _Truncated(_cut_at(position, end))
    if any(block):
        raise _DamagedHeader(position)


def _octal(field):
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _text(field, encoding):
    return field.split(b"\0", 1)[0].decode(encoding, "surrogateescape")


def nested_tar_members(path, workers=1):
    """[(inner tar name, [(member name, absolute offset, size), ...]), ...] for a tar of
    tars, the inner tars indexed by `workers` processes at once. Members that are not .tar
    files (a stray README) are not classes and are passed over."""
    inner = [(name, offset, size) for name, offset, size in tar_members(path) if name.endswith(".tar")]
    members = map_in_processes(_inner_tar_members, [(path, offset, size) for _, offset, size in inner], workers)
    return [(name, found) for (name, _, _), found in zip(inner, members)]


def _inner_tar_members(task):
    path, offset, size = task
    with open(path, "rb") as stream:
        return tar_members(path, fileobj=ByteWindow(stream, offset, size), base=offset)


def tar_files_members(paths, workers=1):
    """[tar_members(path), ...] for many tars, indexed by `workers` processes."""
    return map_in_processes(tar_members, paths, workers)


def map_in_processes(function, items, workers):
    """[function(item) for item in items], by `workers` processes when there are several.

    Indexing ImageNet's train tar reads 1.28 M headers spread over 138 GB: ~30 us of
    tarfile's parsing each, more where every header is a cold read (~80 us here, more on
    a parallel file system), and the planning that needs them runs before any packing,
    so done serially it would cost as much as the packing itself on a many-core node.
    """
    if workers <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    from preprocess.parallel import worker_context
    from preprocess.workers import WorkerPool
    results = [None] * len(items)
    with WorkerPool(min(workers, len(items)), worker_context()) as pool:
        for finished in pool.imap_unordered(function, items):
            if finished is not None:
                results[finished[0]] = finished[1]
    return results


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
