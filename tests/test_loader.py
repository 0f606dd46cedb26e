"""BatchLoader: the same batches for any worker count, resume, eval exactly once, and
workers that fail loudly and never outlive the loader."""
import multiprocessing
import os
import signal
import time
import types

import numpy as np
import pytest

import mpiconvnet.backends.numpy_backend as numpy_backend
from mpiconvnet.data import loader as loader_module
from mpiconvnet.data.loader import BatchLoader, LoaderError
from mpiconvnet.data.sampler import DistributedSampler
from tests.data_fixtures import decode_index, label_of, write_tiny_dataset

NUM_TRAIN, NUM_VAL, NUM_CLASSES, SIZE, CROP = 50, 23, 5, 32, 24


@pytest.fixture(scope="module", params=["raw", "jpeg"])
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return str(write_tiny_dataset(root, NUM_TRAIN, NUM_VAL, NUM_CLASSES, SIZE, format=request.param, shard_size=16))


@pytest.fixture
def raw_dataset(tmp_path):
    return str(write_tiny_dataset(tmp_path, NUM_TRAIN, NUM_VAL, NUM_CLASSES, SIZE, format="raw", shard_size=16))


def collect(root, **options):
    """(step, model input, labels) of every batch of one loader, as the NumPy backend
    makes the model input, copied (the loader reuses its slots)."""
    options = {"batch_per_rank": 4, "crop_size": CROP, "epoch": 1, "seed": 3, **options}
    with BatchLoader(root, **options) as loader:
        batches = []
        for batch in loader:
            assert batch.pixels.dtype == np.uint8 and batch.pixels.shape == (len(batch.labels), SIZE, SIZE, 3)
            batches.append((batch.step, loader.model_input(batch, numpy_backend), batch.labels.copy()))
        assert len(batches) == len(loader)
        assert (loader.time_waiting > 0) == bool(batches)
    return batches


def assert_same_batches(left, right):
    assert [s for s, _, _ in left] == [s for s, _, _ in right]
    for (_, images_a, labels_a), (_, images_b, labels_b) in zip(left, right):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)


def image_indices(images, root, split="train"):
    """Which fixture image each crop shows: undo the channel mean, read the colour code."""
    from mpiconvnet.data.shards import ShardedDataset
    mean = ShardedDataset(root, split).mean
    pixels = images[:, :, CROP // 2, CROP // 2] + mean          # (n, 3), flat images
    return decode_index(pixels)


def test_workers_and_prefetch_do_not_change_the_batches(dataset):
    options = dict(mean="image", pca_lighting=True, divide_by_std=True, drop_last=False)
    in_process = collect(dataset, workers=0, **options)
    assert len(in_process) == 13                     # 50 images, batches of 4, last one padded
    assert_same_batches(in_process, collect(dataset, workers=2, prefetch=1, **options))
    assert_same_batches(in_process, collect(dataset, workers=1, prefetch=3, **options))


class LazyDevice:
    """A stand-in GPU backend for the loader: stage_batch's copy reads the slot only when an
    event recorded after it is waited for (as a copy from page-locked memory runs after
    the call that queued it), and crop_staged's crops are made from that copy. A loader
    that refilled a slot before waiting would hand the model another batch's pixels."""
    HOST_MEMORY = False

    def __init__(self):
        self.pinned, self.pending = [], []

    def pin_host_memory(self, array):
        self.pinned.append(array)
        return object()

    def stage_batch(self, images, plan, crop_size, mean_chw, std):
        copy = {}
        self.pending.append(lambda: copy.setdefault("pixels", images.copy()))
        return types.SimpleNamespace(copy=copy, copied=self.record_event(),
                                     crop=lambda pixels: numpy_backend.crop_flip_normalize(pixels, plan, crop_size,
                                                                                            mean_chw, std))

    def crop_staged(self, staged):
        result = {}
        self.pending.append(lambda: result.setdefault("x", staged.crop(staged.copy["pixels"])))
        return result

    def record_event(self):
        return len(self.pending)

    def wait_event(self, event):
        for run in self.pending[:event]:
            run()

    def finish(self):
        self.wait_event(len(self.pending))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_slot_is_refilled_only_after_the_device_has_read_it(raw_dataset, workers):
    device = LazyDevice()
    options = {"batch_per_rank": 4, "crop_size": CROP, "epoch": 1, "seed": 3, "workers": workers}
    with BatchLoader(raw_dataset, **options) as loader:
        inputs = [loader.model_input(batch, device) for batch in loader]
    device.finish()
    assert len(device.pinned) == 1 and device.pinned[0].shape[0] == loader.num_slots   # every slot, once
    expected = collect(raw_dataset, **options)
    assert len(inputs) == len(expected)
    for got, (_, want, _) in zip(inputs, expected):
        np.testing.assert_array_equal(got["x"], want)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_device_batches_stage_one_ahead_and_hand_out_what_model_input_does(raw_dataset, workers):
    # the slot of the batch handed out is refilled while the caller works on it: its
    # labels must be its own copy, and the next batch must already be staged
    device = LazyDevice()
    options = {"batch_per_rank": 4, "crop_size": CROP, "epoch": 1, "seed": 3, "workers": workers, "prefetch": 1}
    got, staged_when_handed_out = [], []
    with BatchLoader(raw_dataset, **options) as loader:
        for batch, x in loader.device_batches(device):
            staged_when_handed_out.append(len(device.pending))
            got.append((batch.step, x, batch.labels))
            assert batch.pixels is None
    device.finish()
    expected = collect(raw_dataset, **options)
    assert [step for step, _, _ in got] == [step for step, _, _ in expected]
    for (_, x, labels), (_, want_x, want_labels) in zip(got, expected):
        np.testing.assert_array_equal(x["x"], want_x)
        np.testing.assert_array_equal(labels, want_labels)
    # when batch k is handed out, batches 0..k+1 are staged (two queued operations per
    # batch: its copy and its crop) but the last one
    assert staged_when_handed_out[:-1] == [2 * k + 3 for k in range(len(got) - 1)]
    assert staged_when_handed_out[-1] == 2 * len(got)


def test_device_batches_on_numpy_give_model_input(raw_dataset):
    options = {"batch_per_rank": 4, "crop_size": CROP, "epoch": 1, "seed": 3, "workers": 2, "pca_lighting": True}
    with BatchLoader(raw_dataset, **options) as loader:
        got = [(batch.step, x, batch.labels) for batch, x in loader.device_batches(numpy_backend)]
    expected = collect(raw_dataset, **options)
    assert len(got) == len(expected)
    for (step, x, labels), (want_step, want_x, want_labels) in zip(got, expected):
        assert step == want_step
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(labels, want_labels)


def test_a_slot_that_cannot_be_pinned_is_used_unpinned(raw_dataset, monkeypatch, capsys):
    device = LazyDevice()
    device.pin_host_memory = lambda array: (_ for _ in ()).throw(RuntimeError("cuMemHostRegister failed"))
    monkeypatch.setattr(loader_module, "_pin_warned", False)
    options = {"batch_per_rank": 4, "crop_size": CROP, "epoch": 1, "seed": 3, "workers": 0}
    with BatchLoader(raw_dataset, **options) as loader:
        inputs = [loader.model_input(batch, device) for batch in loader]
    device.finish()
    err = capsys.readouterr().err
    assert err.count("could not page-lock the batch slots (cuMemHostRegister failed)") == 1
    for got, (_, want, _) in zip(inputs, collect(raw_dataset, **options)):
        np.testing.assert_array_equal(got["x"], want)


def test_batches_hold_the_sampled_images_and_labels(dataset):
    batches = collect(dataset, workers=2)
    assert len(batches) == 12
    for step, images, labels in batches:
        assert images.shape == (4, 3, CROP, CROP) and images.dtype == np.float32
        want = DistributedSampler(NUM_TRAIN, 0, 1, 3, 1, 4).indices_for_step(step)
        np.testing.assert_array_equal(image_indices(images, dataset), want)
        np.testing.assert_array_equal(labels, label_of(want, NUM_CLASSES))


def test_a_standardising_model_s_input_is_divided_by_the_channel_std(raw_dataset):
    from mpiconvnet.data.shards import ShardedDataset
    std = ShardedDataset(raw_dataset, "train").std
    assert np.abs(std - 1).max() > 10                       # the fixture's std tells the cases apart
    plain, standard = collect(raw_dataset, workers=0), collect(raw_dataset, workers=0, divide_by_std=True)
    assert len(plain) == len(standard) > 0
    for (_, x, _), (_, z, _) in zip(plain, standard):
        np.testing.assert_allclose(z, x / std.reshape(1, 3, 1, 1), rtol=1e-6, atol=1e-6)


def test_start_step_resumes_the_epoch_exactly(raw_dataset):
    whole = collect(raw_dataset, workers=0, pca_lighting=True)
    assert_same_batches(whole[5:], collect(raw_dataset, workers=2, start_step=5, pca_lighting=True))
    assert collect(raw_dataset, workers=1, start_step=len(whole)) == []


def test_ranks_together_load_the_one_rank_batch(raw_dataset):
    single = collect(raw_dataset, workers=0, batch_per_rank=6, pca_lighting=True)
    ranks = [collect(raw_dataset, workers=1, rank=r, size=2, batch_per_rank=3, pca_lighting=True) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, (images, labels) in enumerate((s[1], s[2]) for s in single):
        np.testing.assert_array_equal(np.concatenate([r[step][1] for r in ranks]), images)
        np.testing.assert_array_equal(np.concatenate([r[step][2] for r in ranks]), labels)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_evaluation_sees_every_image_exactly_once(dataset, size):
    seen, labels = [], []
    for rank in range(size):
        for _, images, batch_labels in collect(dataset, split="val", train=False, rank=rank, size=size,
                                               workers=1 if rank % 2 else 0):
            assert images.shape[0] == batch_labels.shape[0] <= 4
            seen.append(image_indices(images, dataset, "val"))
            labels.append(batch_labels)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(NUM_VAL))
    np.testing.assert_array_equal(np.concatenate(labels), label_of(np.arange(NUM_VAL), NUM_CLASSES))


def test_ten_crop_evaluation_shapes_and_order(raw_dataset):
    ten = collect(raw_dataset, train=False, crops=10, workers=2)
    centre = collect(raw_dataset, train=False, crops=1, workers=0)
    assert [images.shape[0] for _, images, _ in ten] == [40] * 5 + [30]
    for (_, images10, labels10), (_, images1, labels1) in zip(ten, centre):
        np.testing.assert_array_equal(labels10, labels1)
        # crop 4 of each image is the centre crop; crop 9 its mirror
        np.testing.assert_array_equal(images10[4::10], images1)
        np.testing.assert_array_equal(images10[9::10], images1[..., ::-1])


@pytest.mark.parametrize("crops", [1, 10])
def test_evaluation_scores_the_mean_of_each_image_s_crop_probabilities(raw_dataset, crops):
    # a stand-in model answers random logits and keeps them; top-1, top-5 and the loss are
    # recomputed here from the softmax of each image's crops, averaged (Krizhevsky 2012)
    from mpiconvnet.evaluation import evaluate, score_batch
    rng, given = np.random.default_rng(0), []

    def forward(images, train):
        assert not train and images.shape[1:] == (3, CROP, CROP)
        given.append(rng.normal(0, 2, size=(len(images), 12)))
        return given[-1]

    net = types.SimpleNamespace(shards=None, input_size=CROP, spec=types.SimpleNamespace(standardize_input=False),
                                ops=numpy_backend, dtype=np.float32, forward=forward)
    world = types.SimpleNamespace(rank=0, size=1, progress=lambda where: None, allreduce_sum=lambda values: values)
    result = evaluate(net, world, raw_dataset, batch_per_rank=4, crops=crops, workers=0)
    logits = np.concatenate(given)                                           # (images * crops, 12)
    assert logits.shape[0] == NUM_VAL * crops
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    probabilities = softmax.reshape(NUM_VAL, crops, 12).mean(axis=1)          # image i: crops 10i..10i+9
    labels = label_of(np.arange(NUM_VAL), NUM_CLASSES)
    true = probabilities[np.arange(NUM_VAL), labels]
    rank = (probabilities > true[:, None]).sum(axis=1)
    assert result["images"] == NUM_VAL
    assert result["top1"] == np.mean(rank < 1) and result["top5"] == np.mean(rank < 5)
    assert result["loss"] == pytest.approx(-np.mean(np.log(true)), rel=1e-12)
    # the true class fifth counts for top-5, sixth does not
    fifth_and_sixth = np.array([[0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05], [0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05]])
    assert score_batch(fifth_and_sixth, np.array([4, 5]))[:2] == (0, 1)


def test_worker_exception_reaches_the_parent_with_its_traceback(raw_dataset, monkeypatch):
    real_fill = loader_module.BatchMaker.fill

    def fill_failing_at_step_2(self, step, pixels_out, labels_out):
        if step == 2:
            raise RuntimeError("disk on fire at step 2")
        return real_fill(self, step, pixels_out, labels_out)

    # workers fork after this, so they run the patched method
    monkeypatch.setattr(loader_module.BatchMaker, "fill", fill_failing_at_step_2)
    loader = BatchLoader(raw_dataset, batch_per_rank=4, crop_size=CROP, workers=2)
    processes = list(loader._processes)
    started = time.monotonic()
    with pytest.raises(LoaderError, match="step 2") as error:
        for _ in loader:
            pass
    assert time.monotonic() - started < 10
    assert "disk on fire at step 2" in str(error.value) and "Traceback" in str(error.value)
    assert not any(p.is_alive() for p in processes)


def test_killed_worker_is_reported_not_waited_for(raw_dataset):
    loader = BatchLoader(raw_dataset, batch_per_rank=4, crop_size=CROP, workers=2, prefetch=1)
    processes = list(loader._processes)
    next(loader)
    os.kill(processes[1].pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(LoaderError, match="exit code -9"):
        for _ in loader:
            pass
    assert time.monotonic() - started < 10
    assert not any(p.is_alive() for p in processes)


def test_a_stop_signal_to_the_workers_is_left_to_their_parent(raw_dataset):
    # scancel, a time limit or mpiexec signal every process of the job, loader workers
    # included; a fork inherits the parent's handler, and evaluate's raises KeyboardInterrupt
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = {stop: signal.signal(stop, interrupt) for stop in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        loader = BatchLoader(raw_dataset, batch_per_rank=4, crop_size=CROP, workers=2, prefetch=1)
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
    with loader:
        processes = list(loader._processes)
        steps = [next(loader).step, next(loader).step]   # one from each worker: both are set up
        for process in processes:
            os.kill(process.pid, signal.SIGTERM)
            os.kill(process.pid, signal.SIGUSR1)
        steps += [batch.step for batch in loader]
    assert steps == list(range(loader.steps_per_epoch))
    assert not any(p.is_alive() for p in processes)


def test_no_process_outlives_close(raw_dataset):
    loader = BatchLoader(raw_dataset, batch_per_rank=4, crop_size=CROP, workers=3)
    processes = list(loader._processes)
    assert len(processes) == 3 and all(p.is_alive() for p in processes)
    next(loader)                     # stop mid-epoch, workers busy prefetching
    loader.close()
    loader.close()
    assert not any(p.is_alive() for p in processes)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("mpiconvnet-loader")]
    with pytest.raises(StopIteration):
        next(loader)
    # an exception in the consumer's loop also closes the loader
    with pytest.raises(KeyError):
        with BatchLoader(raw_dataset, batch_per_rank=4, crop_size=CROP, workers=2) as loader:
            processes = list(loader._processes)
            for _ in loader:
                raise KeyError("trainer bug")
    assert not any(p.is_alive() for p in processes)


@pytest.mark.parametrize("stopped", [False, True])
def test_workers_leave_when_the_parent_dies(raw_dataset, stopped):
    # a middle process owns a loader and is SIGKILLed: no close(), no atexit. A hung worker
    # (stopped) never runs its own check for a dead parent: the kernel ends it
    # (PR_SET_PDEATHSIG), or it would hold mpiexec's output pipe open for ever
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)

    def owner():
        loader = BatchLoader(raw_dataset, batch_per_rank=4, crop_size=CROP, workers=2)
        next(loader)
        next(loader)    # each worker has made a batch: it runs its loop, its set-up is done
        writer.send([p.pid for p in loader._processes])
        time.sleep(60)

    middle = context.Process(target=owner)
    middle.start()
    worker_pids = reader.recv()
    for pid in worker_pids if stopped else ():
        os.kill(pid, signal.SIGSTOP)
    os.kill(middle.pid, signal.SIGKILL)
    middle.join()
    deadline = time.monotonic() + 10
    alive = worker_pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in worker_pids if _running(pid)]
    for pid in alive:
        # orphans would hold pytest's output pipe open and hang the run after a failure
        os.kill(pid, signal.SIGKILL)
    assert alive == []


def test_a_hung_worker_is_named_after_the_stall_timeout(raw_dataset):
    loader = BatchLoader(raw_dataset, batch_per_rank=4, crop_size=CROP, workers=2, prefetch=1, stall_timeout=1.5)
    processes = list(loader._processes)
    os.kill(processes[1].pid, signal.SIGSTOP)       # worker 1 makes steps 1, 3, ...: the first or the next hangs
    started = time.monotonic()
    try:
        with pytest.raises(LoaderError, match=r"loader worker 1 \(pid \d+\) has made no batch for step [13] of "
                                              r"epoch 0 in 1.5 s: hung, stopped or stuck reading"):
            for _ in loader:
                pass
    finally:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGCONT)
    assert 1.5 <= time.monotonic() - started < 10
    assert not any(p.is_alive() for p in processes)   # the stopped one too


def _running(pid):
    """True while pid exists and is not a zombie (orphans are reaped by init, but slowly in containers)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_bad_arguments_are_refused(raw_dataset):
    with pytest.raises(ValueError, match="crop size 40"):
        BatchLoader(raw_dataset, batch_per_rank=4, crop_size=40)
    with pytest.raises(ValueError, match="mean"):
        BatchLoader(raw_dataset, batch_per_rank=4, crop_size=CROP, mean="median")
    with pytest.raises(ValueError, match="crops=10"):
        BatchLoader(raw_dataset, batch_per_rank=4, crop_size=CROP, crops=10)
