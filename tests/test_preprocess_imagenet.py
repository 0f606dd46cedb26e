"""ImageNet inputs: original archives and extracted folders give the same shards; the
validation labels go through meta.mat's leaf synsets, not ILSVRC2012_ID order."""
import io
import json
import os
import subprocess
import sys
import tarfile

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from mpiconvnet.data.shards import ShardedDataset
from preprocess.__main__ import main
from preprocess.imagenet import leaf_synsets, validation_labels
from preprocess.synth import add_bytes, meta_mat_bytes
from tests.conftest import as_an_ordinary_user

PACK = ["--image-size", "32", "--shard-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    assert main(["synth", "--out", str(root), "--classes", "4", "--per-class", "10", "--val-per-class", "3",
                 "--size", "40x30", "--layout", "imagenet", "--seed", "3"]) == 0
    return root


def extract_like_a_user(release, folders):
    """The folders a user gets from the usual `tar xf` steps (done here with tarfile)."""
    train = folders / "train"
    with tarfile.open(release / "ILSVRC2012_img_train.tar") as outer:
        for member in outer:
            wnid = member.name[:-4]
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                (train / wnid).mkdir(parents=True)
                for image in inner:
                    (train / wnid / image.name).write_bytes(inner.extractfile(image).read())
    val = folders / "val"
    val.mkdir()
    with tarfile.open(release / "ILSVRC2012_img_val.tar") as archive:
        for member in archive:
            (val / member.name).write_bytes(archive.extractfile(member).read())
    devkit = folders / "devkit"
    with tarfile.open(release / "ILSVRC2012_devkit_t12.tar.gz") as archive:
        for member in archive:
            target = devkit / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    return train, val, devkit


def test_archives_and_folders_give_identical_shards(release, tmp_path):
    from_tars = tmp_path / "from-tars"
    # --workers 2 here and for the class tars below: they are indexed by 2 processes
    assert main(["imagenet", "--train", str(release / "ILSVRC2012_img_train.tar"),
                 "--val", str(release / "ILSVRC2012_img_val.tar"), "--workers", "2",
                 "--devkit", str(release / "ILSVRC2012_devkit_t12.tar.gz"), "--out", str(from_tars)] + PACK) == 0
    train, val, devkit = extract_like_a_user(release, tmp_path / "extracted")
    from_folders = tmp_path / "from-folders"
    assert main(["imagenet", "--train", str(train), "--val", str(val), "--devkit", str(devkit),
                 "--out", str(from_folders)] + PACK) == 0
    # the common half-way form: the outer tar extracted, the per-class tars left as they are
    inner_tars = tmp_path / "inner-tars"
    inner_tars.mkdir()
    with tarfile.open(release / "ILSVRC2012_img_train.tar") as outer:
        for member in outer:
            (inner_tars / member.name).write_bytes(outer.extractfile(member).read())
    from_inner = tmp_path / "from-inner-tars"
    assert main(["imagenet", "--train", str(inner_tars), "--val", str(val), "--devkit", str(devkit),
                 "--out", str(from_inner), "--workers", "2"] + PACK) == 0
    a, b, c = (json.loads((d / "dataset.json").read_text()) for d in (from_tars, from_folders, from_inner))
    assert a == b == c          # includes every shard file's sha256
    assert a["splits"]["train"]["num_images"] == 40 and a["splits"]["val"]["num_images"] == 12
    assert a["skipped"] == 0   # the CMYK, PNG-named-.JPEG and grayscale traps all decode
    ds = ShardedDataset(from_tars, "train")
    assert len(set(ds.labels[:16].tolist())) > 1, "shards must mix classes"


def test_synthetic_devkit_order_is_not_sorted_order(release):
    with tarfile.open(release / "ILSVRC2012_devkit_t12.tar.gz") as archive:
        meta = archive.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
    synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    leaves = [(int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if int(s["num_children"]) == 0]
    by_id = [wnid for _, wnid in sorted(leaves)]
    assert by_id != sorted(by_id)
    assert any(int(s["num_children"]) > 0 for s in synsets)


def hand_made_release(root):
    """3 classes whose ID order (n03, n01, n02) differs from sorted order, a non-leaf synset
    sorting first (n00), and validation images whose classes we know from their colour."""
    colours = {"n01": (250, 0, 0), "n02": (0, 250, 0), "n03": (0, 0, 250)}
    ids = {"n03": 1, "n01": 2, "n02": 3}
    train = root / "train"
    for wnid, colour in colours.items():
        (train / wnid).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (40, 30), colour).save(train / wnid / f"{wnid}_{k}.JPEG", "JPEG")
    val_order = ["n02", "n03", "n01", "n01"]
    with tarfile.open(root / "val.tar", "w") as archive:
        for k, wnid in enumerate(val_order, start=1):
            stream = io.BytesIO()
            Image.new("RGB", (30, 40), colours[wnid]).save(stream, "JPEG")
            add_bytes(archive, f"ILSVRC2012_val_{k:08d}.JPEG", stream.getvalue())
    devkit = root / "devkit" / "data"
    devkit.mkdir(parents=True)
    (devkit / "meta.mat").write_bytes(meta_mat_bytes(ids, ["n00"]))
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in val_order))
    return train, root / "val.tar", root / "devkit", val_order


def test_validation_labels_follow_the_wnid_not_the_id(tmp_path):
    train, val, devkit, val_order = hand_made_release(tmp_path)
    out = tmp_path / "out"
    assert main(["imagenet", "--train", str(train), "--val", str(val), "--devkit", str(devkit),
                 "--out", str(out)] + PACK) == 0
    ds = ShardedDataset(out, "val")
    assert ds.classes == ["n01", "n02", "n03"]
    with h5py.File(out / "val-00000.h5") as shard:
        by_index = dict(zip(shard["index"][()].tolist(), shard["labels"][()].tolist()))
    # the sorted source list is val images 1..4; their wnids sort to these labels
    assert [by_index[k] for k in range(4)] == [{"n01": 0, "n02": 1, "n03": 2}[w] for w in val_order]
    # and each label's colour is the class's colour: red n01, green n02, blue n03
    images = ds.read(np.arange(ds.num_images))
    for image, label in zip(images, ds.labels):
        assert int(np.argmax(image.reshape(-1, 3).mean(axis=0))) == label


def test_label_mapping_skips_non_leaf_synsets():
    meta = meta_mat_bytes({"n05": 1, "n02": 2}, ["n01", "n03"])
    leaves = leaf_synsets(meta)
    assert sorted(w for w, _ in leaves.values()) == ["n02", "n05"]
    assert validation_labels("2\n1\n2\n", leaves, ["n02", "n05"]).tolist() == [0, 1, 0]


def test_val_sorted_into_class_folders_needs_no_devkit(tmp_path):
    train, _, _, _ = hand_made_release(tmp_path)
    val = tmp_path / "val-sorted" / "n02"
    val.mkdir(parents=True)
    Image.new("RGB", (40, 30), (0, 250, 0)).save(val / "x.JPEG", "JPEG")
    out = tmp_path / "out"
    assert main(["imagenet", "--train", str(train), "--val", str(val.parent), "--out", str(out)] + PACK) == 0
    assert ShardedDataset(out, "val").labels.tolist() == [1]


def test_bad_devkit_paths_are_named(tmp_path, capsys):
    train, val, _, _ = hand_made_release(tmp_path)
    code = main(["imagenet", "--train", str(train), "--val", str(val), "--devkit", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")] + PACK)
    assert code == 2
    error = capsys.readouterr().err
    assert "--devkit" in error and "does not exist" in error


def test_archive_reads_stay_within_the_open_file_budget(tmp_path, monkeypatch):
    from preprocess.sources import ArchiveInputs, tar_members
    contents, archives, ids, offsets, sizes = [], [], [], [], []
    for k in range(5):
        path = tmp_path / f"n{k}.tar"
        with tarfile.open(path, "w") as archive:
            add_bytes(archive, f"n{k}_0.JPEG", f"image {k}".encode() * (k + 1))
        archives.append(str(path))
        for _, offset, size in tar_members(str(path)):
            ids.append(k), offsets.append(offset), sizes.append(size)
        contents.append(f"image {k}".encode() * (k + 1))
    inputs = ArchiveInputs([f"n{k}" for k in range(5)], [0] * 5, archives, ids, offsets, sizes)
    monkeypatch.setattr(ArchiveInputs, "MAX_OPEN", 2)
    for k in [0, 1, 2, 3, 4, 0, 4, 2]:
        assert inputs.read(k) == contents[k]
        assert len(inputs._fds) <= 2


def make_tar(path, tar_format, entries):
    """entries: (kind, name, size) with kind file, dir, symlink or hardlink (to the first entry)."""
    with tarfile.open(path, "w", format=tar_format) as archive:
        for kind, name, size in entries:
            info = tarfile.TarInfo(name)
            info.size = size if kind == "file" else 0
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE}[kind]
            info.linkname = entries[0][1] if kind != "file" else ""
            archive.addfile(info, io.BytesIO(bytes(range(256)) * (size // 256 + 1)) if kind == "file" else None)


PLAIN = [("file", "n1_1.JPEG", 1000), ("dir", "sub", 0), ("file", "sub/n1_2.JPEG", 0), ("symlink", "link", 0),
         ("hardlink", "hard", 0), ("file", "n1_3.JPEG", 512), ("file", "d" * 90 + "/" + "n" * 90 + ".JPEG", 7)]


@pytest.mark.parametrize("tar_format, entries, fast", [
    (tarfile.GNU_FORMAT, PLAIN[:-1], True),             # ImageNet's kind of archive
    (tarfile.USTAR_FORMAT, PLAIN, True),                # a long name split into prefix and name
    (tarfile.GNU_FORMAT, PLAIN, False),                 # a long name: a GNU 'L' record
    (tarfile.PAX_FORMAT, PLAIN + [("file", "é.JPEG", 3)], False),   # pax records
])
def test_tar_headers_read_here_match_tarfile(tmp_path, monkeypatch, tar_format, entries, fast):
    from preprocess import sources
    path = str(tmp_path / "a.tar")
    make_tar(path, tar_format, entries)
    expected = sources._tarfile_members(path)
    assert [name for name, _, _ in expected] == [name for kind, name, _ in entries if kind == "file"]
    if fast:   # the plain headers never reach tarfile
        monkeypatch.setattr(sources, "_tarfile_members", lambda *args: pytest.fail("fell back to tarfile"))
    assert sources.tar_members(path) == expected


def test_a_damaged_cut_or_foreign_tar_is_one_line_naming_it(tmp_path):
    from preprocess import sources
    path = tmp_path / "a.tar"
    make_tar(str(path), tarfile.GNU_FORMAT, PLAIN[:2] + [("file", "n1_9.JPEG", 600)])
    data = bytearray(path.read_bytes())
    second = 512 + 1024 + 512          # the header after the first file's data and the directory
    data[second + 10] ^= 0xFF           # a flipped byte: a bad checksum, which tarfile takes as the end
    path.write_bytes(bytes(data))
    with tarfile.open(path) as archive:
        assert [member.name for member in archive if member.isreg()] == ["n1_1.JPEG"]   # silently
    with pytest.raises(sources.InputError, match=f"the tar header at byte {second} is damaged"):
        sources.tar_members(str(path))
    path.write_bytes(bytes(data[:700]))  # cut inside the first file's data
    with pytest.raises(sources.InputError, match="is truncated: it ends at byte 700, inside the data of member"):
        sources.tar_members(str(path))
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(sources.InputError, match="is not an uncompressed tar archive"):
        sources.tar_members(str(path))


def test_class_tars_indexed_by_two_processes_as_by_one(release):
    from preprocess.sources import nested_tar_members
    path = str(release / "ILSVRC2012_img_train.tar")
    one = nested_tar_members(path, workers=1)
    assert nested_tar_members(path, workers=2) == one and len(one) == 4 and all(len(m) == 10 for _, m in one)


def test_a_train_folder_with_both_class_tars_and_class_folders_is_refused(release, tmp_path, capsys):
    train, _, devkit = extract_like_a_user(release, tmp_path / "extracted")
    with tarfile.open(release / "ILSVRC2012_img_train.tar") as outer:   # one class tar left over
        member = outer.getmembers()[0]
        (train / member.name).write_bytes(outer.extractfile(member).read())
    assert main(["imagenet", "--train", str(train), "--devkit", str(devkit), "--out", str(tmp_path / "out")]
                + PACK) == 2
    assert "holds both class tars and class folders" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_damaged_devkit_is_one_line(release, tmp_path, capsys):
    truncated = tmp_path / "devkit.tar.gz"
    truncated.write_bytes((release / "ILSVRC2012_devkit_t12.tar.gz").read_bytes()[:300])
    _, val, devkit = extract_like_a_user(release, tmp_path / "extracted")
    (next(devkit.rglob("meta.mat"))).write_bytes(b"garbage")
    base = ["imagenet", "--train", str(release / "ILSVRC2012_img_train.tar"), "--val", str(val)] + PACK
    for given, message in ((truncated, "is not a readable tar archive"), (devkit, "meta.mat is damaged")):
        assert main([*base, "--devkit", str(given), "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"--devkit {given}" in error[0] and message in error[0], error
    assert not (tmp_path / "out").exists()


def header_offsets(path):
    with tarfile.open(path) as archive:
        return [member.offset for member in archive]


@pytest.mark.parametrize("split, into_header", [("val", 100), ("val", 0), ("train", 100)])
def test_a_truncated_archive_is_refused_naming_it(release, tmp_path, capsys, split, into_header):
    # tarfile takes a cut header, or none where one should start, for the end of the archive:
    # these packed 2 of 12 val images, or 2 of 4 classes, silently
    paths = {"train": release / "ILSVRC2012_img_train.tar", "val": release / "ILSVRC2012_img_val.tar"}
    cut = tmp_path / paths[split].name
    cut.write_bytes(paths[split].read_bytes()[:header_offsets(paths[split])[2] + into_header])
    paths[split] = cut
    code = main(["imagenet", "--train", str(paths["train"]), "--val", str(paths["val"]),
                 "--devkit", str(release / "ILSVRC2012_devkit_t12.tar.gz"), "--out", str(tmp_path / "out")] + PACK)
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and f"{cut} is truncated: it ends at byte" in error[0], error
    assert not (tmp_path / "out").exists()


def test_an_archive_left_to_tarfile_is_checked_for_a_cut_or_a_damaged_header_too(tmp_path):
    from preprocess import sources
    path = tmp_path / "a.tar"
    make_tar(str(path), tarfile.PAX_FORMAT, PLAIN + [("file", "é.JPEG", 3)])
    data = path.read_bytes()
    last = header_offsets(path)[-1]
    for cut in (last, last + 100):
        path.write_bytes(data[:cut])
        with pytest.raises(sources.InputError, match="is truncated"):
            sources.tar_members(str(path))
    damaged = bytearray(data)
    damaged[last + 10] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(sources.InputError, match=f"the tar header at byte {last} is damaged"):
        sources.tar_members(str(path))


def test_a_partial_copy_or_a_subset_of_the_release_is_packed_with_a_warning(tmp_path, capsys):
    # a chosen subset (ImageNet-100) is packed; a copy cut short is said, not passed over
    train, val, devkit, _ = hand_made_release(tmp_path)
    argv = ["imagenet", "--train", str(train), "--val", str(val), "--devkit", str(devkit)] + PACK
    ground_truth = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    lines = ground_truth.read_text()
    ground_truth.write_text(lines + "1\n2\n")        # 6 lines for 4 validation images
    assert main(argv + ["--out", str(tmp_path / "val-subset")]) == 0
    assert f"preprocess: warning: --val {val} holds 4 images where ILSVRC2012_validation_ground_truth.txt lists 6 " \
           f"(image 5 is missing); packing those" in capsys.readouterr().err
    ground_truth.write_text(lines)
    (devkit / "data" / "meta.mat").write_bytes(meta_mat_bytes({"n03": 1, "n01": 2, "n02": 3, "n04": 4}, ["n00"]))
    assert main(argv + ["--out", str(tmp_path / "train-subset")]) == 0   # a class of the devkit not in --train
    assert f"preprocess: warning: --train {train} holds 3 classes where meta.mat in --devkit {devkit} lists 4 " \
           f"(n04 is missing); packing those" in capsys.readouterr().err
    index = json.loads((tmp_path / "train-subset" / "dataset.json").read_text())
    assert index["classes"] == ["n01", "n02", "n03"]


def test_an_unreadable_devkit_file_is_one_line_naming_it(tmp_path):
    train, val, devkit, _ = hand_made_release(tmp_path)
    meta = devkit / "data" / "meta.mat"
    meta.chmod(0)
    try:
        run = subprocess.run(as_an_ordinary_user([sys.executable, "-m", "preprocess", "imagenet", "--train", str(train),
                                                  "--val", str(val), "--devkit", str(devkit),
                                                  "--out", str(tmp_path / "out"), *PACK]),
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    finally:
        meta.chmod(0o644)
    assert run.returncode == 2 and run.stderr == (f"preprocess: --devkit {devkit}: {meta} cannot be read (Permission "
                                                  f"denied); make it readable, or pass ILSVRC2012_devkit_t12.tar.gz\n")
    assert not (tmp_path / "out").exists()


def test_archive_names_that_are_not_utf8_are_packed_under_escaped_names(tmp_path):
    # a member name was "'utf-8' codec can't encode character" naming neither archive nor member
    image = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image, "JPEG")
    train = tmp_path / "train"
    train.mkdir()
    for tar_name, member in ((b"n01.tar", "n01_caf\udce9.JPEG"), (b"n02\xff.tar", "n02_1.JPEG")):
        with tarfile.open(os.path.join(os.fsencode(train), tar_name), "w", format=tarfile.GNU_FORMAT,
                          encoding="utf-8", errors="surrogateescape") as archive:
            add_bytes(archive, member, image.getvalue())
    out = tmp_path / "out"
    assert main(["imagenet", "--train", str(train), "--out", str(out)] + PACK) == 0
    with h5py.File(out / "train-00000.h5") as shard:
        assert sorted(s.decode() for s in shard["source"][()]) == ["n01/n01_caf\\xe9.JPEG", "n02\\xff/n02_1.JPEG"]
    assert ShardedDataset(out, "train").classes == ["n01", "n02\\xff"]


@pytest.mark.parametrize("ground_truth, line", [
    (b"3\nthree\n2\n2\n", "line 2 of ILSVRC2012_validation_ground_truth.txt is 'three'"),
    (b"3\n1\n2\xe9\n2\n", "line 3 of ILSVRC2012_validation_ground_truth.txt is '2\\\\xe9'"),
    # skipped, it shifted the labels of the images after it
    (b"3\n\n1\n2\n2\n", "line 2 of ILSVRC2012_validation_ground_truth.txt is ''"),
])
def test_a_ground_truth_line_that_is_not_an_id_is_one_line_naming_it(tmp_path, capsys, ground_truth, line):
    train, val, devkit, _ = hand_made_release(tmp_path)
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_bytes(ground_truth)
    assert main(["imagenet", "--train", str(train), "--val", str(val), "--devkit", str(devkit),
                 "--out", str(tmp_path / "out")] + PACK) == 2
    assert capsys.readouterr().err == (f"preprocess: --devkit {devkit}: {line}, not an ILSVRC2012_ID; download the "
                                       f"ILSVRC2012 devkit again\n")
    assert not (tmp_path / "out").exists()


def test_a_meta_mat_without_a_field_read_is_one_line_naming_it(tmp_path, capsys):
    from scipy.io import savemat
    train, val, devkit, _ = hand_made_release(tmp_path)
    synsets = np.zeros((3, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")])
    for k, wnid in enumerate(["n03", "n01", "n02"]):
        synsets[k, 0] = (np.array([[k + 1]], np.uint16), np.array([wnid]), np.array([f"class {wnid}"]))
    stream = io.BytesIO()
    savemat(stream, {"synsets": synsets})
    (devkit / "data" / "meta.mat").write_bytes(stream.getvalue())
    assert main(["imagenet", "--train", str(train), "--val", str(val), "--devkit", str(devkit),
                 "--out", str(tmp_path / "out")] + PACK) == 2
    assert capsys.readouterr().err == (f"preprocess: --devkit {devkit}: meta.mat's synsets have no field num_children "
                                       f"(they need ILSVRC2012_ID, WNID, words, num_children); pass the ILSVRC2012 "
                                       f"devkit (ILSVRC2012_devkit_t12)\n")
    assert not (tmp_path / "out").exists()
