"""Which GPU a rank uses: one rank per GPU, chosen from the node-local rank.

Pure Python (no pycuda): the device count is passed in, so the policy is tested on
machines without GPUs (tests/test_cuda_logic.py). `initialize` in context.py calls it with
pycuda's count, which already honours CUDA_VISIBLE_DEVICES; `visible_device_count` is the
same count read from the environment, for error messages and tests.
"""
import os


class DeviceChoiceError(RuntimeError):
    """More ranks on a node than GPUs (or no GPU); the message says how to fix it."""


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


def choose_device(local_rank, local_size, device_count, allow_sharing=False, environ=None):
    """The device ordinal (among the visible ones) for node-local rank `local_rank`.

    device_count: devices this process sees (pycuda.driver.Device.count(), which already
    honours CUDA_VISIBLE_DEVICES). One rank per GPU: rank r gets device r. When the
    launcher bound GPUs per task (srun --gpus-per-task) and this rank sees exactly its
    share, its first visible device is its own. When the node runs more ranks than it has
    GPUs, that is an error unless sharing is allowed, in which case ranks go round-robin
    (rank r gets r % device_count).
    """
    if not 0 <= local_rank < local_size:
        raise ValueError(f"local rank {local_rank} outside 0..{local_size - 1}")
    if device_count < 1:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
        raise DeviceChoiceError(f"no CUDA device visible{hint}; run on a GPU node, fix "
                                f"CUDA_VISIBLE_DEVICES, or use --backend numpy")
    if local_size > device_count and gpus_bound_per_task(environ) == device_count:
        # every rank of the node sees only the GPUs bound to it: not oversubscription
        return 0
    if local_size > device_count and not allow_sharing:
        raise DeviceChoiceError(
            f"{local_size} ranks on this node but {device_count} visible GPU(s); start at most "
            f"{device_count} ranks per node (mpirun --map-by ppr:{device_count}:node, srun "
            f"--ntasks-per-node={device_count}) or let ranks share GPUs (--allow-gpu-sharing, or MPICONVNET_ALLOW_GPU_SHARING=1)")
    return local_rank % device_count
