"""Weights out of a run (python -m mpiconvnet.export) and into a new one (--init-weights),
in our names and in torchvision's."""
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mpiconvnet import checkpoint, export
from mpiconvnet.models import ModelError, build_model
from mpiconvnet.weights import TORCHVISION_ALEXNET, from_torchvision, initial_state, to_torchvision
from tests.data_fixtures import write_tiny_dataset
from tests.test_train import ENV, MPIEXEC, needs_mpiexec, params_at, train

CLASSES = [f"n{c:08d}" for c in range(5)]   # the fixture's, in label order


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("shards")), 48, 10, 5, 64)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A float64 alexnet-mini run of 3 steps: its checkpoint is the one at step 3."""
    out = str(tmp_path_factory.mktemp("run") / "a")
    train(["--data", data, "--out", out, "--global-batch", "8", "--dtype", "float64", "--max-steps", "3"])
    return out


def test_export_writes_the_checkpoint_s_arrays_in_our_names(run, tmp_path, capsys):
    out = str(tmp_path / "weights.npz")
    assert export.main(["--checkpoint", run, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "alexnet-mini at step 3" in printed and f"class order (output i = line i + 1) in {tmp_path}/weights." \
        "classes.txt" in printed
    params, _ = params_at(run, 3)
    with np.load(out) as f:
        assert sorted(f.files) == sorted(params)
        for name in params:
            assert f[name].dtype == np.float64
            np.testing.assert_array_equal(f[name], params[name], err_msg=name)
    assert sorted(os.listdir(tmp_path)) == ["weights.classes.txt", "weights.npz"]
    assert (tmp_path / "weights.classes.txt").read_text().split("\n") == CLASSES + [""]


def test_weights_of_a_checkpoint_without_a_class_list_leave_no_other_list_beside_them(tmp_path):
    # an export of a checkpoint from before the class lists, over an export of a newer one
    from mpiconvnet.weights import write_npz
    out = str(tmp_path / "w.npz")
    write_npz(out, {"fc8.bias": np.zeros(2)}, ["n01", "n02"])
    write_npz(out, {"fc8.bias": np.ones(2)}, None)
    assert sorted(os.listdir(tmp_path)) == ["w.npz"]


@pytest.mark.parametrize("broken", ["a\nb", "a\rb", "a\x85b", "a\u2028b"])
def test_a_class_name_with_a_line_break_is_refused_and_nothing_written(tmp_path, broken):
    # a data set packed before preprocess refused such class folders: the list had a line too
    # many (read back with str.splitlines(), which breaks at NEL and U+2028 too)
    from mpiconvnet.checkpoint import OutputError
    from mpiconvnet.weights import write_npz
    with pytest.raises(OutputError, match=re.escape(f"class {broken!r} has a line break in its name")):
        write_npz(str(tmp_path / "w.npz"), {"fc8.bias": np.zeros(2)}, [broken, "c"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/nonexistent"], "--checkpoint /nonexistent: no such file or directory"),
    (["--names", "torchvision"], "torchvision's AlexNet is alexnet-owt, this checkpoint is alexnet-mini"),
    (["--out", "/nonexistent/dir/w.npz"], "cannot write /nonexistent/dir/w.npz: No such file or directory; create "
                                          "the folder /nonexistent/dir first (mkdir -p), or give another --out"),
    (["--out", "LINK"], "exists and is not a regular file"),
    (["--out", ""], "--out is empty; give the .npz file to write"),
    (["--out", "CHECKPOINT"], "ckpt-00000003.h5: not an .npz path; give a file name ending in .npz"),
    (["--checkpoint", "NPZ"], "is not a checkpoint (an HDF5 file written by python -m mpiconvnet.train)"),
])
def test_export_bad_input_is_one_line_exit_2_and_writes_nothing(run, tmp_path, capsys, args, message):
    flags = {"--checkpoint": run, "--out": str(tmp_path / "w.npz"), **dict(zip(args[::2], args[1::2]))}
    if flags["--out"] == "LINK":   # a link to elsewhere: replacing it would leave its target as it was
        (tmp_path / "link.npz").symlink_to(tmp_path / "target")
        flags["--out"] = str(tmp_path / "link.npz")
    newest = os.path.join(run, "checkpoints", "ckpt-00000003.h5")
    before = open(newest, "rb").read()
    if flags["--out"] == "CHECKPOINT":   # the file it reads: was replaced by a zip
        flags["--out"] = newest
    if flags["--checkpoint"] == "NPZ":   # weights for --init-weights given as a checkpoint
        np.savez(tmp_path / "link.npz", a=np.zeros(2))
        flags["--checkpoint"] = str(tmp_path / "link.npz")
    assert export.main([word for pair in flags.items() for word in pair]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert [n for n in os.listdir(tmp_path) if n != "link.npz"] == []
    assert open(newest, "rb").read() == before and os.listdir(os.path.dirname(newest)) == ["ckpt-00000003.h5"]


def test_export_refuses_to_write_over_the_checkpoint_it_reads(run, tmp_path, capsys):
    copy = str(tmp_path / "ckpt.npz")   # a checkpoint under any name is still one
    shutil.copy(os.path.join(run, "checkpoints", "ckpt-00000003.h5"), copy)
    assert export.main(["--checkpoint", copy, "--out", copy]) == 2
    assert capsys.readouterr().err.strip() == (f"mpiconvnet.export: --out {copy} is the checkpoint it exports; give "
                                               f"another .npz path")
    assert checkpoint.load(copy)[2]["step"] == 3


@needs_mpiexec
def test_export_under_several_ranks_refuses_in_one_line(run, tmp_path):
    out = str(tmp_path / "w.npz")
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpiconvnet.export", "--checkpoint", run,
                             "--out", out], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("mpiconvnet.export: started as 2 MPI ranks, which would all write the same "
                                     "--out; run it as one process, without mpiexec/srun -n 2")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ranks, parallel", [(1, "data"), pytest.param(2, "hybrid", marks=[pytest.mark.mpi, needs_mpiexec])])
def test_a_run_started_from_exported_weights_starts_from_them(data, run, tmp_path, ranks, parallel):
    weights = str(tmp_path / "w.npz")
    assert export.main(["--checkpoint", run, "--out", weights]) == 0
    fresh, started = str(tmp_path / "fresh"), str(tmp_path / "started")
    # an lr of 1e-12 moves the weights by ~1e-12 of a gradient: the step-1 checkpoint is the start;
    # with --parallel hybrid each rank loads its own rows of the fc layers
    common = ["--data", data, "--global-batch", "8", "--dtype", "float64", "--max-steps", "1", "--lr", "1e-12",
              "--parallel", parallel]
    train(common + ["--out", fresh], ranks=ranks)
    result = train(common + ["--out", started, "--init-weights", weights], ranks=ranks)
    assert f"starting from the weights in {weights}" in result.stdout
    exported, _ = params_at(run, 3)
    (from_weights, _), (from_seed, _) = params_at(started, 1), params_at(fresh, 1)
    for name, value in exported.items():
        np.testing.assert_allclose(from_weights[name], value, rtol=1e-9, atol=1e-12, err_msg=name)
        assert not np.allclose(from_seed[name], value, rtol=1e-6, atol=1e-9), name


def test_a_resumed_run_takes_its_checkpoint_not_the_init_weights(data, run, tmp_path):
    out = str(tmp_path / "b")
    common = ["--data", data, "--out", out, "--global-batch", "8", "--dtype", "float64", "--init-weights", run]
    train(common + ["--max-steps", "1"])
    result = train(common + ["--max-steps", "2", "--resume", "auto"])
    assert "resuming at step 1" in result.stdout and "starting from the weights" not in result.stdout


def test_init_skip_keeps_the_seed_s_init_for_another_class_count(run, tmp_path):
    net = build_model("alexnet-mini", num_classes=7, dtype="float64", seed=5)
    own = net.state_dict()
    with pytest.raises(ModelError, match=r"fc8.weight has shape \(5, 256\), alexnet-mini with 7 classes has "
                                         r"\(7, 256\); keep that layer's random init with --init-skip fc8"):
        initial_state(net, run, [])
    with pytest.raises(ModelError, match=r"--init-skip fc9: not a layer of alexnet-mini"):
        initial_state(net, run, ["fc8", "fc9"])
    state = initial_state(net, run, ["fc8"])
    exported, _ = params_at(run, 3)
    for name, value in state.items():
        expected = own[name] if name.startswith("fc8.") else exported[name]
        np.testing.assert_array_equal(value, expected, err_msg=name)


def test_weights_of_another_model_are_refused_by_name(tmp_path):
    path = str(tmp_path / "w.npz")
    np.savez(path, **build_model("alexnet-mini", num_classes=5, dtype="float32").state_dict(), extra=np.zeros(2))
    with pytest.raises(ModelError, match=r"holds extra, which alexnet-mini does not have"):
        initial_state(build_model("alexnet-mini", num_classes=5, dtype="float32"), path)
    (tmp_path / "bad.npz").write_text("not a zip")   # nor NumPy's pickle advice for a text file
    (tmp_path / "cut.npz").write_bytes(open(path, "rb").read()[:20000])   # a copy cut short
    np.save(tmp_path / "one.npy", np.zeros(3, np.float32))
    for name, message in (("bad.npz", r"not an \.npz of weights \(nor a zip, nor a checkpoint\); give an \.npz"),
                          ("cut.npz", r"not a readable \.npz of arrays"),
                          ("one.npy", r"an \.npy holds one unnamed array, not named weights")):
        with pytest.raises(ModelError, match=message):
            initial_state(build_model("alexnet-mini", num_classes=5), str(tmp_path / name))
    good = build_model("alexnet-mini", num_classes=5, dtype="float32").state_dict()
    for bad in (np.full(good["fc6.weight"].shape, "x"), np.full(good["fc6.weight"].shape, np.nan, np.float32)):
        np.savez(tmp_path / "odd.npz", **{**good, "fc6.weight": bad})
        with pytest.raises(ModelError, match=r"fc6.weight is not finite floating-point numbers"):
            initial_state(build_model("alexnet-mini", num_classes=5), str(tmp_path / "odd.npz"))
    np.savez(tmp_path / "other.npz", **build_model("alexnet-owt", num_classes=5, dtype="float32").state_dict())
    with pytest.raises(ModelError, match=r"other.npz: conv1.weight has shape .* these are another model's weights"):
        initial_state(build_model("alexnet-mini", num_classes=5), str(tmp_path / "other.npz"))
    # in torchvision's names: the line names the key the file holds
    np.savez(tmp_path / "tv.npz", **to_torchvision(build_model("alexnet-owt", num_classes=5).state_dict(),
                                                   "alexnet-owt"))
    with pytest.raises(ModelError, match=r"tv.npz: features.0.weight \(our conv1.weight\) has shape \(64, 3, 11, "
                                         r"11\), alexnet-mini"):
        initial_state(build_model("alexnet-mini", num_classes=5), str(tmp_path / "tv.npz"))


def write_torch_save_like(path, state):
    """A zip laid out as torch.save writes one (archive/data.pkl, archive/data/0, ...): what
    a PyTorch user gives first. torch itself is not needed to make one."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        for number, value in enumerate(state.values()):
            z.writestr(f"archive/data/{number}", np.ascontiguousarray(value).tobytes())
        z.writestr("archive/version", b"3\n")


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=[pytest.mark.mpi, needs_mpiexec])])
def test_a_torch_save_file_is_one_line_with_how_to_make_an_npz(data, run, tmp_path, ranks):
    weights = str(tmp_path / "torch.pt")
    write_torch_save_like(weights, params_at(run, 3)[0])
    out = tmp_path / "run"
    result = train(["--data", data, "--out", str(out), "--global-batch", "8", "--init-weights", weights],
                   ranks=ranks, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"mpiconvnet.train: --init-weights {weights}: a zip but not an .npz of weights (its archive/data.pkl is no "
        f"NumPy array: a torch.save file?); give an .npz of named arrays (python -m mpiconvnet.export; from a "
        f"PyTorch state dict: numpy.savez(path, **{{k: v.numpy() for k, v in state_dict.items()}})), a checkpoint "
        f"or a run directory")
    assert not out.exists()


def test_a_real_torch_save_file_is_refused_as_no_npz(run, tmp_path):
    torch = pytest.importorskip("torch")
    weights = str(tmp_path / "torch.pt")
    torch.save({k: torch.from_numpy(v) for k, v in params_at(run, 3)[0].items()}, weights)
    with pytest.raises(ModelError, match=r"a zip but not an \.npz of weights .* numpy\.savez\(path"):
        initial_state(build_model("alexnet-mini", num_classes=5, dtype="float64"), weights)


def test_a_shard_or_a_damaged_checkpoint_as_init_weights_names_the_flag(data, run, tmp_path):
    net = build_model("alexnet-mini", num_classes=5, dtype="float64")
    with pytest.raises(checkpoint.CheckpointError, match=r"^--init-weights .*train-00000.h5 is not an mpiconvnet "
                                                         r"checkpoint \(a data shard\?\)"):
        initial_state(net, os.path.join(data, "train-00000.h5"))
    cut = str(tmp_path / "ckpt-00000003.h5")
    shutil.copy(os.path.join(run, "checkpoints", "ckpt-00000003.h5"), cut)
    os.truncate(cut, os.path.getsize(cut) // 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"is unreadable .*; no older checkpoint is beside it in .* "
                                                         r"to give --init-weights instead$"):
        initial_state(net, cut)


def test_another_class_order_is_refused_for_a_resume_and_for_weights_that_keep_the_classifier(data, run, tmp_path):
    other = write_tiny_dataset(str(tmp_path / "other"), 48, 10, 5, 64, classes=CLASSES[::-1])
    checkpoint_path = os.path.join(run, "checkpoints", "ckpt-00000003.h5")
    mismatch = (f"{other} has other classes than checkpoint {checkpoint_path} was trained on: label 0 is n00000004 "
                f"there, n00000000 in the checkpoint")
    common = ["--data", other, "--global-batch", "8", "--dtype", "float64", "--max-steps", "4"]
    result = train(common + ["--out", str(tmp_path / "b"), "--resume", run], check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"mpiconvnet.train: {mismatch}; resume on the data set it was trained on"
    result = train(common + ["--out", str(tmp_path / "c"), "--init-weights", run], check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"mpiconvnet.train: --init-weights: {mismatch.replace(checkpoint_path, run)}; "
                                     f"to fine-tune to these classes "
                                     f"keep the classifier's random init with --init-skip fc8")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # fine-tuning to them: the classifier starts afresh, the rest from the run
    train(common + ["--out", str(tmp_path / "d"), "--init-weights", run, "--init-skip", "fc8"])


@pytest.mark.parametrize("args, message", [
    (["--init-skip", "fc8"], "--init-skip fc8 needs --init-weights"),
    (["--init-weights", "/nonexistent.npz"], "--init-weights /nonexistent.npz: no such file"),
])
def test_bad_init_flags_are_one_line_and_exit_2(data, tmp_path, args, message):
    result = train(["--data", data, "--out", str(tmp_path / "run"), "--global-batch", "8"] + args, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "run")


def torchvision_alexnet(torch, num_classes):
    """torchvision.models.AlexNet as torchvision defines it (torchvision itself is not a
    dependency): the module indices are what its state dict names."""
    nn = torch.nn
    model = nn.Module()
    model.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))
    model.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    model.classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(True),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(True), nn.Linear(4096, num_classes))
    model.forward = lambda x: model.classifier(torch.flatten(model.avgpool(model.features(x)), 1))
    return model


def test_torchvision_names_load_into_torchvision_s_alexnet_and_compute_the_same():
    torch = pytest.importorskip("torch")
    net = build_model("alexnet-owt", num_classes=10, dtype="float32", seed=3)
    state = to_torchvision(net.state_dict(), "alexnet-owt")
    assert set(state) == {f"{prefix}.{kind}" for prefix in TORCHVISION_ALEXNET.values() for kind in ("weight", "bias")}
    model = torchvision_alexnet(torch, 10)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    model.eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        expected = model.forward(torch.from_numpy(x)).numpy()
    # float32 sums of ~10^4 products in a different order: relative 1e-4 (tests/tolerances.py's GEMM bound)
    np.testing.assert_allclose(net.forward(x, train=False), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    back = from_torchvision({k: v.numpy() for k, v in model.state_dict().items()})
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
