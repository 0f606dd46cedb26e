"""--parallel hybrid and --parallel model (model_parallel.py): fc layers, or every layer,
split across ranks. The maths must be that of one rank holding the whole model and the
whole batch, dropout included; checkpoints hold whole arrays, so they are the same as
--parallel data's. Every run is a subprocess (python -m mpiconvnet.train), under
mpiexec -n 2 where it matters."""
import os

import numpy as np
import pytest

from tests.data_fixtures import write_tiny_dataset
from tests.test_train import ENV, assert_same_state, evaluations, needs_mpiexec, params_at, train, visible_gpus


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 6 classes and alexnet-mini's 256 hidden units split over 2 ranks; 61 validation
    # images: ranks hold 30 and 31, so with 2 images a step one rank runs out first
    return write_tiny_dataset(str(tmp_path_factory.mktemp("shards")), 96, 61, 6, 64, shard_size=20)


FLOAT64 = ["--dtype", "float64", "--lr", "0.05"]
SPLITS = ["hybrid", "model"]   # fc layers split; every layer split


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("split_mode", SPLITS)
def test_two_split_ranks_equal_one_rank_holding_the_whole_model(data, tmp_path, split_mode):
    # 4 steps with dropout on fc6 and fc7's outputs (alexnet-mini has both), then an
    # evaluation in which (hybrid) one rank has a step with no images; alexnet-mini's
    # grouped conv2/4/5 put each model-parallel rank on one group
    args = ["--data", data, "--global-batch", "4", "--max-steps", "4"] + FLOAT64
    train(args + ["--out", str(tmp_path / "data")])
    train(args + ["--out", str(tmp_path / "split"), "--parallel", split_mode], ranks=2)
    whole, whole_velocity = params_at(tmp_path / "data", 4)
    split, _ = params_at(tmp_path / "split", 4)
    assert set(split) == set(whole) and split["fc6.weight"].shape == whole["fc6.weight"].shape
    assert split["conv2.weight"].shape == whole["conv2.weight"].shape
    assert_same_state(tmp_path / "split", tmp_path / "data", 4)
    assert all(np.abs(v).max() > 0 for v in whole_velocity.values())   # every layer learned
    (one,), (two,) = evaluations(tmp_path / "data"), evaluations(tmp_path / "split")
    assert two["images"] == one["images"] == 61
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-12)


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("split_mode", SPLITS)
def test_a_split_run_resumes_bit_for_bit(data, tmp_path, split_mode):
    args = ["--data", data, "--global-batch", "8", "--checkpoint-every", "2", "--parallel", split_mode] + FLOAT64
    train(args + ["--out", str(tmp_path / "straight"), "--max-steps", "4"], ranks=2)
    train(args + ["--out", str(tmp_path / "resumed"), "--max-steps", "2"], ranks=2)
    train(args + ["--out", str(tmp_path / "resumed"), "--max-steps", "4", "--resume", "auto"], ranks=2)
    assert_same_state(tmp_path / "resumed", tmp_path / "straight", 4, rtol=0, atol=0)


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("split_mode", SPLITS)
def test_a_data_parallel_checkpoint_resumes_split_and_back(data, tmp_path, split_mode):
    # checkpoints hold whole arrays: a run may change --parallel when it resumes
    args = ["--data", data, "--global-batch", "4", "--checkpoint-every", "2"] + FLOAT64
    train(args + ["--out", str(tmp_path / "straight"), "--max-steps", "6"], ranks=2)
    train(args + ["--out", str(tmp_path / "mixed"), "--max-steps", "2"], ranks=2)
    train(args + ["--out", str(tmp_path / "mixed"), "--max-steps", "4", "--parallel", split_mode, "--resume", "auto"],
          ranks=2)
    train(args + ["--out", str(tmp_path / "mixed"), "--max-steps", "6", "--resume", "auto"], ranks=2)
    assert_same_state(tmp_path / "mixed", tmp_path / "straight", 6)


@pytest.mark.cuda
@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("split_mode", SPLITS)
def test_two_split_ranks_sharing_one_gpu_equal_numpy(data, tmp_path, split_mode):
    if visible_gpus() < 1:
        pytest.skip("no GPU visible to pycuda (needs pycuda and a CUDA driver); on a GPU node run scripts/gpu-check.sh")
    args = ["--data", data, "--global-batch", "4", "--max-steps", "3"] + FLOAT64
    env = dict(ENV, MPICONVNET_ALLOW_GPU_SHARING="1",
               CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    train(args + ["--out", str(tmp_path / "numpy")])
    train(args + ["--out", str(tmp_path / "gpu"), "--backend", "cuda", "--parallel", split_mode], ranks=2, env=env)
    reference, _ = params_at(tmp_path / "numpy", 3)
    split, _ = params_at(tmp_path / "gpu", 3)
    for name in reference:
        # float64 throughout: only the order of cuDNN's / cuBLAS's sums differs
        np.testing.assert_allclose(split[name], reference[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("split_mode", SPLITS)
def test_one_split_rank_is_the_data_parallel_model(data, tmp_path, split_mode):
    # size 1: the gathers are identities, the split is the whole layer (every group of a
    # grouped convolution, for --parallel model)
    args = ["--data", data, "--global-batch", "4", "--max-steps", "2"] + FLOAT64
    train(args + ["--out", str(tmp_path / "data")])
    train(args + ["--out", str(tmp_path / "split"), "--parallel", split_mode])
    whole, _ = params_at(tmp_path / "data", 2)
    split, _ = params_at(tmp_path / "split", 2)
    for name in whole:
        np.testing.assert_array_equal(split[name], whole[name], err_msg=name)


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("ranks, classes", [(2, 5), (3, 6)])
def test_uneven_splits_equal_one_rank(tmp_path, ranks, classes):
    # fc8's 5 outputs over 2 ranks (2 + 3); alexnet-mini's 256 hidden units over 3 (85, 85, 86)
    data = write_tiny_dataset(str(tmp_path / "shards"), 24, 7, classes, 64, shard_size=12)
    args = ["--data", data, "--global-batch", str(2 * ranks), "--max-steps", "3"] + FLOAT64
    train(args + ["--out", str(tmp_path / "data")])
    train(args + ["--out", str(tmp_path / "hybrid"), "--parallel", "hybrid"], ranks=ranks)
    assert_same_state(tmp_path / "hybrid", tmp_path / "data", 3)
    (one,), (many,) = evaluations(tmp_path / "data"), evaluations(tmp_path / "hybrid")
    assert many["images"] == one["images"] == 7 and many["top1"] == one["top1"]


@pytest.mark.mpi
@needs_mpiexec
def test_more_ranks_than_outputs_is_one_line_and_exit_2(tmp_path):
    two_classes = write_tiny_dataset(str(tmp_path / "shards"), 12, 4, 2, 64, shard_size=12)
    result = train(["--data", two_classes, "--out", str(tmp_path / "run"), "--global-batch", "3",
                    "--parallel", "hybrid"], ranks=3, check=False)
    assert result.returncode == 2, result.stderr
    assert "--parallel hybrid splits fc8's 2 outputs over 3 ranks" in result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("split_mode", SPLITS)
def test_a_split_model_with_parameter_averaging_is_refused(data, tmp_path, split_mode):
    result = train(["--data", data, "--out", str(tmp_path / "run"), "--parallel", split_mode, "--sync", "params"],
                   check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--parallel {split_mode} needs --sync grads" in lines[0]


@pytest.mark.mpi
@needs_mpiexec
def test_model_parallel_across_groups_is_one_line_and_exit_2(data, tmp_path):
    # alexnet-mini's conv2 has 2 groups of 32 channels: 3 ranks would split one of them
    result = train(["--data", data, "--out", str(tmp_path / "run"), "--global-batch", "3", "--parallel", "model"],
                   ranks=3, check=False)
    assert result.returncode == 2, result.stderr
    assert "conv2 has 2 groups of 32 channels, and 3 ranks do not split it along groups" in result.stderr
    assert len(set(result.stderr.strip().splitlines())) == 1, result.stderr


def test_channel_bounds_follow_the_channel_split():
    # a channel of an (N, C*H*W) activation is H*W columns: 64 channels over 3 ranks are
    # 21, 21 and 22 of them, at 36 columns each
    from mpiconvnet.backends import numpy_backend
    from mpiconvnet.model_parallel import Shards
    shards = Shards(None, 0, 3, numpy_backend, split_convs=True)
    assert shards.column_bounds(64 * 36, unit=36) == [0, 21 * 36, 42 * 36, 64 * 36]
    assert shards.column_bounds(10) == shards.bounds(10)


@pytest.mark.parametrize("split_convs, mode", [(False, "hybrid"), (True, "model")])
def test_more_ranks_than_fc_outputs_names_the_mode_given(split_convs, mode):
    from mpiconvnet.backends import numpy_backend
    from mpiconvnet.model_parallel import Shards
    from mpiconvnet.models import ModelError, build_layers
    with pytest.raises(ModelError, match=f"--parallel {mode} splits fc8's 2 outputs over 4 ranks"):
        build_layers("alexnet-mini", 2, numpy_backend, 0.5, Shards(None, 0, 4, numpy_backend, split_convs))


@pytest.mark.parametrize("rank", [0, 1])
def test_model_parallel_on_two_ranks_is_the_two_towers(rank):
    # alexnet on 2 ranks: conv2, conv4 and conv5 see only their own tower's channels, so
    # conv3 and conv4 hand their outputs straight on; every channel is gathered only for
    # LRN (exact across the towers' boundary, which the paper's GPUs did not cross) and fc6
    from mpiconvnet.backends import numpy_backend
    from mpiconvnet.model_parallel import Shards
    from mpiconvnet.models import build_layers
    layers, shapes = build_layers("alexnet", 10, numpy_backend, 0.5, Shards(None, rank, 2, numpy_backend, True))
    names = [type(layer).__name__ for layer in layers]
    before_convs = [names[i - 1] if i else None for i, name in enumerate(names) if name == "Conv"]
    assert before_convs == [None, "ChannelSlice", "MaxPool", "ReLU", "ReLU"]
    assert names.count("GatherChannels") == 3
    assert shapes["conv4.weight"] == (192, 192, 3, 3) and shapes["conv3.weight"] == (192, 256, 3, 3)
