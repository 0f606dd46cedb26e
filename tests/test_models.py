"""The AlexNet family: sizes, parameter counts, gradients of a whole model, learning, interop."""
import math

import numpy as np
import pytest

from mpiconvnet.torch_twin import torch_twin
from mpiconvnet.layers import LRN, Dropout
from mpiconvnet.models import MODELS, ModelError, build_layers, build_model, describe
from tests.tolerances import FD_EPS, REDUCTION_F32


def test_parameter_counts_match_the_papers_and_torchvision():
    counts = {name: sum(int(np.prod(s)) for s in build_layers(name, 1000, ops=None)[1].values()) for name in MODELS}
    assert counts["alexnet"] == 60_965_224
    assert counts["caffenet"] == 60_965_224
    assert counts["alexnet-owt"] == 61_100_840
    assert "60,965,224" in describe()


def test_pytorch_names_and_layouts():
    _, shapes = build_layers("alexnet", 1000, ops=None)
    assert shapes["conv1.weight"] == (96, 3, 11, 11)
    assert shapes["conv2.weight"] == (256, 48, 5, 5)       # groups=2: in/groups
    assert shapes["fc6.weight"] == (4096, 9216)            # 256 * 6 * 6, (out, in)
    assert shapes["fc8.bias"] == (1000,)
    assert list(shapes)[:2] == ["conv1.weight", "conv1.bias"]


@pytest.mark.parametrize("name", ["alexnet", "caffenet", "alexnet-owt", "alexnet-mini"])
def test_output_shape(name):
    net = build_model(name, num_classes=1000 if name != "alexnet-mini" else 10, seed=1)
    x = np.random.default_rng(0).normal(size=(2, 3, net.input_size, net.input_size)).astype(np.float32)
    logits = net.forward(x)
    assert logits.shape == (2, net.num_classes) and logits.dtype == np.float32
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("name, block", [
    ("alexnet", ["Conv", "ReLU", "LRN", "MaxPool"]),       # Krizhevsky 2012: pool after LRN
    ("caffenet", ["Conv", "ReLU", "MaxPool", "LRN"]),      # Caffe's reference model: pool before LRN
    ("alexnet-mini", ["Conv", "ReLU", "LRN", "MaxPool"])])
def test_lrn_has_alexnet_s_constants_and_sits_where_each_model_puts_it(name, block):
    # the PyTorch twin reads the LRN constants from our layers, so it cannot pin them
    layers = build_model(name, num_classes=10).layers
    assert [type(layer).__name__ for layer in layers[:8]] == block + block
    lrns = [layer for layer in layers if isinstance(layer, LRN)]
    assert len(lrns) == 2
    assert all((lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0) for lrn in lrns)


# weight and bias of each layer as each model's source draws them: ("normal", std) or
# ("uniform", bound), and a constant bias
def _paper(layer, fan_in):
    return ("normal", 0.01), 1.0 if layer in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0


def _caffe(layer, fan_in):
    return ("normal", 0.005 if layer in ("fc6", "fc7") else 0.01), \
        0.1 if layer in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0


def _torchvision(layer, fan_in):
    return ("uniform", 1 / math.sqrt(fan_in)), ("uniform", 1 / math.sqrt(fan_in))


def _he(layer, fan_in):
    return ("normal", math.sqrt(2 / fan_in)), 0.0


@pytest.mark.parametrize("name, rule", [("alexnet", _paper), ("caffenet", _caffe), ("alexnet-owt", _torchvision),
                                        ("alexnet-mini", _he)])
def test_initial_weights_follow_each_model_s_source(name, rule):
    net = build_model(name, num_classes=1000 if name != "alexnet-mini" else 10, seed=0)
    for layer in sorted({n.split(".")[0] for n in net.params}):
        weight, bias = (net.params[f"{layer}.{kind}"].astype(np.float64) for kind in ("weight", "bias"))
        fan_in = int(np.prod(weight.shape[1:]))                  # (in / groups) * kh * kw, or in
        for values, want in zip((weight, bias), rule(layer, fan_in)):
            if isinstance(want, float):   # float32 weights: equal to float32 rounding
                np.testing.assert_allclose(values, want, rtol=1e-7, atol=0, err_msg=layer)
                continue
            kind, scale = want
            # the sample std of n draws is off by about 1/sqrt(2n): 1.5 % for the 2,400 of the smallest
            expected_std = scale if kind == "normal" else scale / math.sqrt(3)
            if values.size >= 2000:
                assert values.std() == pytest.approx(expected_std, rel=0.06), layer
                assert abs(values.mean()) < 4 * expected_std / math.sqrt(values.size), layer
            if kind == "uniform":
                assert 0.5 * scale < np.abs(values).max() <= scale * (1 + 1e-7), layer


def test_wrong_input_size_is_a_clear_error():
    net = build_model("alexnet-mini", num_classes=10)
    with pytest.raises(ModelError, match=r"takes input \(N, 3, 56, 56\)"):
        net.forward(np.zeros((1, 3, 64, 64), np.float32))


@pytest.mark.parametrize("name, pixel_std, tolerance", [
    # Caffe's init scales: mean-subtracted pixels (std ~50); torchvision's: standardised (std 1)
    ("caffenet", 50.0, 0.05), ("alexnet-owt", 1.0, 0.05),
    # the paper's bias 1 on fc7 makes fc8's inputs ~1, so its N(0, 0.01) weights give
    # logits of std ~0.01 * sqrt(4096) ~ 0.9 and an expected loss of ln(1000) + var/2 ~ 7.3
    ("alexnet", 50.0, 0.6)])
def test_initial_loss_of_an_untrained_1000_class_model_is_near_ln_1000(name, pixel_std, tolerance):
    # theano_alexnet's users learned to check this before blaming the optimiser. The loss
    # is averaged over every possible label (logsumexp(z) - mean(z)), not a random draw,
    # so the test measures the model and not the luck of 8 labels.
    net = build_model(name, num_classes=1000, seed=0)
    x = np.random.default_rng(1).normal(0, pixel_std, size=(4, 3, net.input_size, net.input_size))
    z = net.forward(x.astype(np.float32)).astype(np.float64)
    shift = z.max(axis=1, keepdims=True)
    expected_loss = np.mean(np.log(np.exp(z - shift).sum(axis=1)) + shift[:, 0] - z.mean(axis=1))
    assert abs(expected_loss - math.log(1000)) < tolerance


def test_whole_model_gradient_by_finite_differences():
    net = build_model("alexnet-mini", num_classes=5, dtype="float64", seed=3)
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, size=(3, 3, 56, 56))
    labels = np.array([0, 3, 1])
    # dropout stays on: its mask is a pure function of (seed, step), the same on every call
    loss, grads = net.loss_and_grads(x, labels, step=7)
    grads = {n: g.copy() for n, g in grads.items()}
    for name, param in net.params.items():
        flat = param.reshape(-1)
        for i in rng.choice(flat.size, size=3, replace=False):
            original = flat[i]
            flat[i] = original + FD_EPS
            plus, _ = net.loss_and_grads(x, labels, step=7)
            flat[i] = original - FD_EPS
            minus, _ = net.loss_and_grads(x, labels, step=7)
            flat[i] = original
            numeric = (plus - minus) / (2 * FD_EPS)
            # 1e-4 relative: a ReLU or max-pool switch inside +-eps would show as an O(1) error
            assert grads[name].reshape(-1)[i] == pytest.approx(numeric, rel=1e-4, abs=1e-8), name


def test_dropout_masks_differ_between_steps_and_layers():
    # fc6's and fc7's dropout outputs have the same shape: a mask that repeated across steps
    # or layers (step s, fc7 drawing what step s + 1, fc6 draws) would tie draws that should
    # be independent
    net = build_model("alexnet-mini", num_classes=5, seed=3)
    x = np.random.default_rng(0).normal(size=(4, 3, 56, 56)).astype(np.float32)
    dropouts = [layer for layer in net.layers if isinstance(layer, Dropout)]
    masks = []
    for step in range(4):
        net.forward_device(x, train=True, step=step)
        masks += [layer.mask.copy() for layer in dropouts]
    assert len(masks) == 8 and all(m.shape == masks[0].shape for m in masks)
    for i in range(len(masks)):
        for j in range(i):
            assert np.mean(masks[i] != masks[j]) > 0.3, (i, j)


def test_a_fixed_batch_of_8_images_overfits():
    from mpiconvnet.optim import SGD
    net = build_model("alexnet-mini", num_classes=10, seed=0, dropout=0.0)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, size=(8, 3, 56, 56)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    opt = SGD(net.ops, net.params, momentum=0.9, weight_decay=0.0, bias_lr_mult=1.0)
    first = None
    for step in range(150):
        loss, grads = net.loss_and_grads(x, labels, step=step)
        first = loss if first is None else first
        opt.step(grads, lr=0.01)
    assert first > 1.5 and loss < 0.05


def test_npz_round_trip(tmp_path):
    a = build_model("alexnet-mini", num_classes=7, seed=1)
    b = build_model("alexnet-mini", num_classes=7, seed=2)
    x = np.random.default_rng(0).normal(size=(2, 3, 56, 56)).astype(np.float32)
    a.save_npz(tmp_path / "w.npz")
    b.load_npz(tmp_path / "w.npz")
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    with np.load(tmp_path / "w.npz") as f:
        assert f["conv2.weight"].shape == (64, 16, 5, 5)


def test_loading_weights_of_another_model_names_the_mismatch(tmp_path):
    build_model("alexnet-mini", num_classes=7).save_npz(tmp_path / "w.npz")
    with pytest.raises(ModelError, match=r"fc8.weight has shape \(7, 256\).*expects \(10, 256\)"):
        build_model("alexnet-mini", num_classes=10).load_npz(tmp_path / "w.npz")


def test_same_seed_same_weights_in_float32_and_float64():
    a = build_model("alexnet-mini", num_classes=4, seed=5)
    b = build_model("alexnet-mini", num_classes=4, seed=5, dtype="float64")
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name].astype(np.float32))


@pytest.mark.parametrize("name", ["alexnet-mini", "alexnet-owt"])
def test_forward_matches_pytorch_with_the_same_weights(name):
    torch = pytest.importorskip("torch")
    net = build_model(name, num_classes=10, seed=0)
    x = np.random.default_rng(0).normal(size=(2, 3, net.input_size, net.input_size)).astype(np.float32)
    with torch.no_grad():
        expected = torch_twin(net, torch).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), expected, **REDUCTION_F32)


def test_the_pytorch_baseline_s_sgd_makes_our_update():
    # bench step's PyTorch side must do the work ours does, no more: biases at 2x lr and
    # without weight decay, the fused one-pass kernel where torch has it
    torch = pytest.importorskip("torch")
    from mpiconvnet.torch_twin import torch_sgd
    from mpiconvnet.optim import SGD
    net = build_model("alexnet-mini", num_classes=10, dtype="float64", seed=0)
    weights = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in net.params.items()}
    ours, theirs = SGD(net.ops, net.params), torch_sgd(torch, weights.items(), lr=0.01)
    rng = np.random.default_rng(1)
    for _ in range(3):
        grads = {n: rng.standard_normal(p.shape) for n, p in net.params.items()}
        ours.step(grads, 0.01)
        for n, w in weights.items():
            w.grad = torch.from_numpy(grads[n])
        theirs.step()
    for n, w in weights.items():
        np.testing.assert_allclose(w.detach().numpy(), net.params[n], rtol=1e-13, atol=1e-15, err_msg=n)
    assert all(group.get("fused") for group in theirs.param_groups)
