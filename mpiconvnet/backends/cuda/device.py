"""Which GPU a rank uses: one rank per GPU, chosen from the node-local rank.

Pure Python (no pycuda): the device count is passed in, so the policy is tested on
machines without GPUs (tests/test_cuda_logic.py). `initialize` in context.py calls it with
pycuda's count, which already honours CUDA_VISIBLE_DEVICES; `visible_device_count` is the
same count read from the environment, for error messages and tests.

Whether ranks share a GPU is not judged from counts: what each rank sees depends on the
launcher's binding (srun --gpus-per-task, --gpu-bind, --ntasks-per-gpu, a site's
CUDA_VISIBLE_DEVICES per task), which no variable reliably tells. Each rank takes
local_rank % (GPUs it sees), and once MPI runs, the ranks of a node compare the UUIDs of
the GPUs they took (shared_gpu_problem): two ranks on one GPU is an error unless sharing
is allowed.
"""
import os


class DeviceChoiceError(RuntimeError):
    """No GPU visible, or a bad CUDA_VISIBLE_DEVICES; the message says how to fix it."""


def parse_visible_devices(value):
    """The entries of a CUDA_VISIBLE_DEVICES value, as CUDA reads it.

    None (unset) means "all devices" and returns None. CUDA stops at the first invalid
    entry ("0,1,-1,2" exposes 0 and 1; "" and "-1" expose none). Entries are indices or
    GPU-/MIG- UUIDs; duplicates make CUDA expose nothing, so they are an error here.
    """
    if value is None:
        return None
    entries = []
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            break
        if item.lstrip("-").isdigit():
            if int(item) < 0:
                break
            item = str(int(item))
        elif not (item.startswith("GPU-") or item.startswith("MIG-")):
            break
        entries.append(item)
    if len(set(entries)) != len(entries):
        raise DeviceChoiceError(f"CUDA_VISIBLE_DEVICES={value!r} names a device twice; "
                                f"list each GPU once")
    return entries


def visible_device_count(physical_count, environ=None):
    """How many devices a process sees: CUDA_VISIBLE_DEVICES entries that exist, or all.

    Numeric entries beyond the physical count end the list, as in CUDA; UUID entries are
    counted as given (they cannot be checked without the driver).
    """
    environ = os.environ if environ is None else environ
    entries = parse_visible_devices(environ.get("CUDA_VISIBLE_DEVICES"))
    if entries is None:
        return physical_count
    count = 0
    for item in entries:
        if item.isdigit() and int(item) >= physical_count:
            break
        count += 1
    return count


def gpus_bound_per_task(environ=None):
    """G when the launcher gives each task its own G GPUs, else None.

    srun --gpus-per-task=G (SLURM_GPUS_PER_TASK, "G" or "type:G") binds G GPUs to each
    task unless --gpu-bind says otherwise (Slurm's implicit --gpu-bind=per_task:G, or the
    device cgroup), so a rank then sees only its own GPUs, not the node's.
    """
    environ = os.environ if environ is None else environ
    value = environ.get("SLURM_GPUS_PER_TASK", "").strip()
    count = value.rsplit(":", 1)[-1]
    return int(count) if count.isdigit() and int(count) > 0 else None


def choose_device(local_rank, local_size, device_count, environ=None):
    """The device ordinal (among the visible ones) for node-local rank `local_rank`.

    device_count: devices this process sees (pycuda.driver.Device.count(), which already
    honours CUDA_VISIBLE_DEVICES). One rank per GPU: rank r gets device r % device_count
    (with every GPU of the node visible, its own; with fewer, ranks would share, which
    shared_gpu_problem then finds). When the launcher bound GPUs per task (srun
    --gpus-per-task) and this rank sees exactly its share, its first one. local_size may
    be None (not known before MPI starts).
    """
    if local_rank < 0 or (local_size is not None and local_rank >= local_size):
        raise ValueError(f"local rank {local_rank} outside 0..{(local_size or 1) - 1}")
    if device_count < 1:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
        raise DeviceChoiceError(f"no CUDA device visible{hint}; run on a GPU node, fix "
                                f"CUDA_VISIBLE_DEVICES, or use --backend numpy")
    outnumbered = local_size is None or local_size > device_count
    if outnumbered and gpus_bound_per_task(environ) == device_count:
        # the GPUs this rank sees are its own (with as many ranks as GPUs, they may instead
        # be the node's, which an mpirun inside a --gpus-per-task=G allocation shows them all)
        return 0
    return local_rank % device_count


def shared_gpu_problem(placements):
    """A one-line error when ranks of one node compute on the same GPU, else None.

    placements: (world rank, GPU UUID or None where the driver cannot say) of every rank
    on the node, in local-rank order.
    """
    ranks_of = {}
    for rank, uuid in placements:
        if uuid is not None:
            ranks_of.setdefault(uuid, []).append(rank)
    shared = {uuid: ranks for uuid, ranks in ranks_of.items() if len(ranks) > 1}
    if not shared:
        return None
    uuid, ranks = next(iter(shared.items()))
    gpus = len(ranks_of)
    return (f"ranks {', '.join(map(str, ranks))} all compute on GPU {uuid}: {len(placements)} ranks on this node, "
            f"{gpus} GPU(s) among them; start at most {gpus} rank(s) per node, each with its own GPU "
            f"(srun --ntasks-per-node={gpus} --gpus-per-task=1, mpirun --map-by ppr:{gpus}:node), or let ranks "
            f"share GPUs (train's --allow-gpu-sharing, or MPICONVNET_ALLOW_GPU_SHARING=1)")


def unchecked_gpus_note(placements):
    """A one-line note when ranks of a node could not name their GPU, so shared_gpu_problem
    could not tell whether they share one, else None."""
    unknown = [rank for rank, uuid in placements if uuid is None]
    if len(placements) < 2 or not unknown:
        return None
    return (f"note: the CUDA driver did not report the GPU UUID of rank(s) {', '.join(map(str, unknown))}, so "
            f"whether ranks of this node share a GPU was not checked; make sure each rank has its own "
            f"(nvidia-smi -L lists the GPUs)")


def sharing_allowed(flag, environ=None):
    """--allow-gpu-sharing, or MPICONVNET_ALLOW_GPU_SHARING=1."""
    environ = os.environ if environ is None else environ
    return bool(flag) or environ.get("MPICONVNET_ALLOW_GPU_SHARING", "0") == "1"
