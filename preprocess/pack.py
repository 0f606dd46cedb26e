"""Pack a split's inputs into shards: plan, share the work, write, merge, report.

The plan is a pure function of the inputs and the flags: each split's sorted input list is
shuffled once with --seed and cut into shards of --shard-size, so every shard mixes
classes and the same command always produces the same shards, whatever the number of
workers, ranks or restarts. The plan is recorded in OUT/.pack/plan.json; re-running the
same command skips finished shards, and running a different one into the same folder is
refused rather than mixed in.
"""
import glob
import hashlib
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mpiconvnet.data.shards import DatasetError, FORMATS, INDEX_FILE, RESIZE_MODES, SPLITS, TMP_SUFFIX, shard_filename
from mpiconvnet.distributed import first_rank_by_environment
from preprocess.decode import DEFAULT_MAX_PIXELS, BadImage, decode_image, encode_jpeg
from preprocess.merge import merge_dataset, missing_shards
from preprocess.parallel import make_team, worker_context
from preprocess.shard_lock import ShardBusy, ShardLocks
from preprocess.sources import InputError, unseen_input
from preprocess.workers import WorkerDied, WorkerPool
from preprocess.writer import WORK_DIR, ShardWriter, publish, receipt_path, write_atomic

PLAN_FILE = "plan.json"
EXIT_INTERRUPTED = 130   # the shell's code for a ctrl-c
SPLIT_SEED_OFFSET = {"train": 0, "val": 1}   # train and val get unrelated shuffles
# ShardWriter's running sums: uint64 + uint16 + uint32 + a uint16 scratch copy, 3 channels
SUM_BYTES_PER_PIXEL = 3 * (8 + 2 + 4 + 2)
MAX_IMAGE_SIZE = 4096   # 0.75 GiB of sums per process, and 48 MiB a raw image


class NothingToPack(InputError):
    """An input tree or archive without a single image (exit 1, as documented)."""


def add_pack_arguments(parser):
    parser.add_argument("--out", required=True, help="output folder for dataset.json and the shards")
    parser.add_argument("--image-size", type=int, default=256, metavar="S", help="stored images are S x S (default 256)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="shorter-crop",
                        help="shorter-crop: shorter side to S, centre crop (default); squash: S x S ignoring aspect (Caffe)")
    parser.add_argument("--format", choices=FORMATS, default="raw",
                        help="raw: uint8 pixels; jpeg: re-encoded, ~10x smaller, decoded when read")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality for --format jpeg (default 90)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the one shuffle before sharding")
    parser.add_argument("--workers", type=int, default=1, help="decode processes per rank or array task (default 1)")
    parser.add_argument("--rank", type=int, help="this task's number in a job array (with --size)")
    parser.add_argument("--size", type=int, help="number of tasks in a job array (with --rank)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="larger inputs are skipped as decompression bombs")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any input had to be skipped")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_flags(args):
    for flag, value, low in (("--image-size", args.image_size, 1), ("--shard-size", args.shard_size, 1),
                             ("--workers", args.workers, 1), ("--max-pixels", args.max_pixels, 1)):
        if value < low:
            raise InputError(f"{flag} {value}: must be at least {low}")
    if args.image_size > MAX_IMAGE_SIZE:
        # found here, not as a MemoryError from the first shard after plan.json has locked --out to it
        raise InputError(f"--image-size {args.image_size}: at most {MAX_IMAGE_SIZE}; a packing process holds "
                         f"{SUM_BYTES_PER_PIXEL} bytes a pixel of exact sums ({sum_gib(args.image_size):,.0f} GiB "
                         f"here, {sum_gib(MAX_IMAGE_SIZE):.2f} GiB at {MAX_IMAGE_SIZE}), and convnets train on "
                         f"crops of 224-512")
    if not 1 <= args.quality <= 100:
        raise InputError(f"--quality {args.quality}: must be in 1..100")
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: must be at least 0")
    train, val = getattr(args, "train", None), getattr(args, "val", None)
    if train and val and os.path.realpath(train) == os.path.realpath(val):
        raise InputError(f"--val {val} is --train {train}: its images would be scored as unseen ones; pass a "
                         f"held-out set as --val, or leave --val out")
    out = os.path.realpath(args.out)
    for flag in ("--train", "--val"):
        given = getattr(args, flag[2:], None)
        if given and os.path.isdir(given) and (out + os.sep).startswith(os.path.realpath(given) + os.sep):
            raise InputError(f"--out {args.out} is inside {flag} {given}: its files would be packed as images; "
                             f"choose an --out outside the input trees")


def sum_gib(image_size):
    return SUM_BYTES_PER_PIXEL * image_size ** 2 / 2 ** 30


def fingerprint(inputs):
    digest = hashlib.sha256()
    for name, label in zip(inputs.names, inputs.labels.tolist()):
        digest.update(f"{name}\t{label}\n".encode())
    return digest.hexdigest()


def make_plan(args, classes, class_names, splits):
    """The settings that define the output; two runs into one folder must agree on all of it."""
    return {
        "classes": classes, "class_names": class_names, "image_size": args.image_size, "format": args.format,
        "quality": args.quality if args.format == "jpeg" else None, "resize": args.resize, "seed": args.seed,
        "shard_size": args.shard_size, "max_pixels": args.max_pixels,
        "splits": {split: {"num_inputs": len(inputs), "inputs_sha256": fingerprint(inputs),
                           "num_shards": math.ceil(len(inputs) / args.shard_size)}
                   for split, inputs in splits.items()},
    }


def record_plan(out_dir, plan):
    """Write OUT/.pack/plan.json, or refuse if OUT holds a pack made with other inputs or flags."""
    work = os.path.join(out_dir, WORK_DIR)
    path = os.path.join(work, PLAN_FILE)
    if os.path.exists(path):
        with open(path) as stream:
            previous = json.load(stream)
        if previous != plan:
            changed = sorted(k for k in set(plan) | set(previous) if plan.get(k) != previous.get(k))
            raise InputError(f"{out_dir} holds a pack made with different {', '.join(changed)}; "
                             f"re-run that command to finish it, or use a new --out")
        return
    elif os.path.exists(os.path.join(out_dir, INDEX_FILE)):
        raise InputError(f"{out_dir} already holds a data set packed by another tool or version; use a new --out")
    os.makedirs(work, exist_ok=True)
    write_atomic(path, json.dumps(plan, indent=1) + "\n")


def shard_tasks(plan, seed):
    """[(split, shard number, input positions)] for the whole pack, in a fixed order."""
    tasks = []
    for split in SPLITS:
        if split not in plan["splits"]:
            continue
        count, size = plan["splits"][split]["num_inputs"], plan["shard_size"]
        order = np.random.default_rng([seed, SPLIT_SEED_OFFSET[split]]).permutation(count)
        for number in range(math.ceil(count / size)):
            tasks.append((split, number, order[number * size:(number + 1) * size]))
    return tasks


def is_finished(out_dir, split, number):
    return not missing_shards(out_dir, [shard_filename(split, number)])


# state of a packing process: set once per worker, so each task pickles only its positions
_job = {}


class Progress:
    """Images done and skipped, counted by every packing process without a lock: each
    writes only its own slot (a lock a killed worker held would stop the parent reading)."""
    KINDS = ("done", "skipped")

    def __init__(self, context, slots):
        self.counts = context.RawArray("q", len(self.KINDS) * slots)

    def add(self, slot, kind, amount=1):
        self.counts[slot * len(self.KINDS) + self.KINDS.index(kind)] += amount

    def total(self, kind):
        return sum(self.counts[self.KINDS.index(kind)::len(self.KINDS)])


def init_worker(slot, out_dir, plan, splits, progress):
    _job.update(slot=slot, out_dir=out_dir, plan=plan, splits=splits, progress=progress)


def count(kind, amount=1):
    _job["progress"].add(_job["slot"], kind, amount)


def pack_shard(task):
    """Decode, resize and write one shard as a closed .tmp file; returns what publish() needs."""
    split, number, positions = task
    plan, inputs = _job["plan"], _job["splits"][split]
    size, resize = plan["image_size"], plan["resize"]
    writer = ShardWriter(_job["out_dir"], shard_filename(split, number), split, plan["classes"], size,
                         plan["format"], capacity=len(positions))
    try:
        for position in positions.tolist():
            name = inputs.names[position]
            try:
                pixels = decode_image(inputs.read(position, plan["max_pixels"]), size, resize, plan["max_pixels"])
            except BadImage as error:
                writer.skip(name, str(error))
                count("skipped")
            except Exception as error:   # one odd file must never stop a 1.28 M image run
                writer.skip(name, f"unexpected {type(error).__name__}: {error}")
                count("skipped")
            else:
                encoded = encode_jpeg(pixels, plan["quality"]) if plan["format"] == "jpeg" else None
                writer.add(pixels, int(inputs.labels[position]), name, position, encoded)
            count("done")
        closed = writer.close()
    except BaseException:
        writer.abandon()
        raise
    return closed


def run_tasks(tasks, workers, out_dir, plan, splits, show_progress, label):
    """Pack `tasks` with `workers` processes; a progress bar when show_progress."""
    context = worker_context()
    workers = max(1, min(workers, len(tasks)))
    progress = Progress(context, workers)
    total = sum(len(positions) for _, _, positions in tasks)
    bar = None
    if show_progress and total:
        from tqdm import tqdm
        tqdm.monitor_interval = 0   # no monitor thread: worker processes are forked after this
        bar = tqdm(total=total, unit="img", desc=label, smoothing=0.05, mininterval=1.0, file=sys.stderr)

    def refresh():
        if bar is not None:
            bar.update(progress.total("done") - bar.n)
            bar.set_postfix(skipped=progress.total("skipped"), refresh=False)

    # publisher threads make finished shards durable (fsync, file sha256, receipt, rename)
    # while decoding goes on; both release the GIL, so the wait for the disk is hidden. One
    # per worker: a publisher handles a 1,024-image shard in ~0.5 s, and the shards of more
    # than ~6 workers would queue behind a single one.
    with ThreadPoolExecutor(workers, thread_name_prefix="publish") as publisher:
        published = []
        if workers == 1:
            init_worker(0, out_dir, plan, splits, progress)
            for task in tasks:
                published.append(publisher.submit(publish, pack_shard(task)))
                refresh()
        else:
            with WorkerPool(workers, context, init_worker, (out_dir, plan, splits, progress)) as pool:
                # each shard is handed to a publisher the moment it is done, whichever worker finishes first
                for finished in pool.imap_unordered(pack_shard, tasks):
                    if finished is not None:
                        published.append(publisher.submit(publish, finished[1]))
                    refresh()
        for future in published:
            future.result()
    refresh()
    if bar is not None:
        bar.close()
    return progress.total("done"), progress.total("skipped")


def pack(args, gather):
    """The body of the folder and imagenet commands; returns the exit code."""
    try:
        check_flags(args)
        problem = None
    except InputError as error:
        # some checks look at the file system (--out inside --train, --val a link to --train),
        # which one node may see differently: a rank that stopped here alone left the others
        # waiting in MPI_Init for ever, so it joins them and rank 0 says why every rank stops
        problem = str(error)
    try:
        team = make_team(args.rank, args.size)
    except ValueError as error:   # --rank/--size, or srun's tasks each a world of one
        if first_rank_by_environment():   # every rank has the same flags: said once
            print(f"preprocess: {problem or error}", file=sys.stderr)
        return 2
    problem = team.first_failure(problem)   # every rank, with or without a problem of its own
    if problem:
        if team.comm is None or team.is_root:   # an array task is alone in its log
            print(f"preprocess: {problem}", file=sys.stderr)
        return 2
    # a SIGTERM (kill, scancel) ends the run as ctrl-c does, whatever it is doing: while
    # packing, the workers stopped, unfinished shards removed and finished ones kept
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return plan_and_pack(args, gather, team)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def plan_and_pack(args, gather, team):
    out_dir = os.path.abspath(args.out)
    started = time.perf_counter()

    def plan_everything():
        classes, class_names, splits = gather(args)
        if not classes:
            raise InputError("no classes found; check --train")
        for split, inputs in splits.items():
            if len(inputs) == 0:   # before --out exists: a fixed re-run must find nothing to refuse
                raise NothingToPack(f"no {split} images found under --{split} {getattr(args, split)}; check the path")
        return make_plan(args, classes, class_names, splits), splits

    def write_plan():
        # only once every rank sees the inputs: bad inputs must leave no empty --out folder behind
        try:
            os.makedirs(out_dir, exist_ok=True)
            record_plan(out_dir, plan)
        except OSError as error:
            raise InputError(f"cannot write under --out {out_dir}: {describe_os_error(error, out_dir)}; choose a "
                             f"writable directory with space for the shards") from None

    try:
        plan, splits = team.share(plan_everything)
        problem = team.first_failure(unseen_problem(splits))
        if problem:
            raise InputError(problem)
        team.share(write_plan)
    except (InputError, ValueError) as error:
        if team.is_root:
            print(f"preprocess: {error}", file=sys.stderr)
        return 1 if isinstance(error, NothingToPack) else 2
    except WorkerDied as error:   # indexing archives in processes
        if team.is_root:
            print(f"preprocess: {error} while indexing the inputs; run the same command again (with fewer --workers "
                  f"if memory ran out)", file=sys.stderr)
        return 1
    # this rank's shards, numbered in the whole pack's order (the number is the lock's byte)
    numbered = list(enumerate(shard_tasks(plan, args.seed)))[team.rank::team.size]
    locks, refusal = None, None
    try:
        try:
            locks = ShardLocks(os.path.join(out_dir, WORK_DIR))
            locks.hold([(number, shard_filename(split, shard)) for number, (split, shard, _) in numbered
                        if not is_finished(out_dir, split, shard)])
        except ShardBusy as busy:
            refusal = (f"another preprocess run is packing {busy} into --out {out_dir}; let it finish (or stop it), "
                       f"then run this command again: finished shards are kept")
        except OSError as error:
            refusal = f"cannot write under --out {out_dir}: {describe_os_error(error)}; fix permissions there"
        if team.sum(refusal is not None):   # every rank stops if one must: none may wait for it
            if refusal:
                print(f"preprocess: {rank_prefix(team)}{refusal}", file=sys.stderr)
            return 1
        # looked at again under the locks: another run may have finished some meanwhile
        mine = [task for _, task in numbered if not is_finished(out_dir, task[0], task[1])]
        remove_leftovers(out_dir, mine)
        return pack_and_merge(args, team, out_dir, plan, splits, mine, started)
    finally:
        if locks is not None:
            locks.release()


def unseen_problem(splits):
    """Why this rank cannot pack what rank 0 listed (a node without the inputs), or None."""
    for split, inputs in splits.items():
        path = unseen_input(inputs)
        if path:
            return (f"{path} is not there, though rank 0 listed it under --{split}; every rank must see the inputs "
                    f"at the same path: make them visible on every node, and give --{split} as an absolute path")
    return None


def rank_prefix(team):
    """'rank 1: ' before a message of one rank among several; nothing for a lone packer."""
    return "" if team.size == 1 else f"rank {team.rank}: "


def pack_and_merge(args, team, out_dir, plan, splits, mine, started):
    """Pack this rank's unfinished shards `mine`; the one that finds all shards done merges."""
    label = "packing" if team.size == 1 else f"rank 0 of {team.size}"
    who = rank_prefix(team)
    try:
        done, _ = run_tasks(mine, args.workers, out_dir, plan, splits, team.is_root and not args.no_progress, label)
    except OSError as error:
        # a full disk, a quota, lost permissions: the user's to fix, and nothing is lost
        remove_unfinished(out_dir, mine)
        print(f"preprocess: {who}writing under --out {out_dir} failed: {describe_os_error(error)}; free space "
              f"or fix permissions there (or choose another --out), then run the same command again: finished "
              f"shards are kept", file=sys.stderr)
        team.abort(1)
        return 1
    except WorkerDied as error:
        remove_unfinished(out_dir, mine)
        print(f"preprocess: {who}{error}; finished shards are kept: run the same command again (with fewer "
              f"--workers if memory ran out)", file=sys.stderr)
        team.abort(1)
        return 1
    except KeyboardInterrupt:   # ctrl-c, or SIGTERM through _interrupt
        remove_unfinished(out_dir, mine)
        print(f"preprocess: {who}interrupted; finished shards are kept: run the same command again to pack the rest",
              file=sys.stderr)
        team.abort(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except BaseException as error:
        remove_unfinished(out_dir, mine)
        print(f"preprocess: {who}failed: {type(error).__name__}: {error}", file=sys.stderr)
        team.abort(1)
        raise
    done = team.sum(done)
    team.barrier()
    shard_names = {split: [shard_filename(split, n) for n in range(entry["num_shards"])]
                   for split, entry in plan["splits"].items()}
    missing = missing_shards(out_dir, [name for names in shard_names.values() for name in names])
    if missing:
        # only array tasks get here: the others are still packing
        print(f"preprocess: task {team.rank} of {team.size} done; {len(missing)} shards still being packed by "
              f"other tasks; the last task to finish writes {INDEX_FILE}")
        return 0
    if not team.is_root and team.comm is not None:
        return 0
    try:
        index = merge_dataset(out_dir, plan, shard_names)
    except OSError as error:
        print(f"preprocess: writing under --out {out_dir} failed: {describe_os_error(error)}; free space or fix "
              f"permissions there, then run the same command again: the shards are kept", file=sys.stderr)
        return 1
    except DatasetError as error:   # a finished shard damaged since (a re-run checks its size, not its bytes)
        print(f"preprocess: {error}; delete it and run the same command again to pack it anew", file=sys.stderr)
        return 1
    return report(index, out_dir, done, time.perf_counter() - started, args.strict)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def remove_unfinished(out_dir, tasks):
    """Delete the .tmp files of `tasks` after a failure: a worker stopped mid-shard leaves
    one, which a re-run would overwrite anyway, but on a full disk it holds the space."""
    for split, number, _ in tasks:
        path = os.path.join(out_dir, shard_filename(split, number) + TMP_SUFFIX)
        if os.path.exists(path):
            os.remove(path)


def remove_leftovers(out_dir, tasks):
    """Delete what runs that ended abruptly left for `tasks`' shards, whose locks are ours
    now, so no one writes them: half-written shards (NAME.h5.tmp; an MPI rank aborted by
    another's full disk leaves its own, holding the space the user was told to free) and
    receipts (NAME.h5.json.PID.tmp, a kill while publishing)."""
    remove_unfinished(out_dir, tasks)
    for split, number, _ in tasks:
        pattern = glob.escape(receipt_path(out_dir, shard_filename(split, number))) + ".*" + TMP_SUFFIX
        for path in glob.glob(pattern):
            os.remove(path)


def describe_os_error(error, named=None):
    """'No space left on device', with the file when the error names one (h5py's do not)
    other than `named`, which the message names already."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    return f"{error.filename}: {reason}" if error.filename and error.filename != named else reason


def report(index, out_dir, processed, seconds, strict):
    """Print the one-line summary; the exit code: 1 if nothing usable, or --strict and anything skipped."""
    counts = ", ".join(f"{entry['num_images']} {split}" for split, entry in index["splits"].items())
    shards = sum(len(entry["shards"]) for entry in index["splits"].values())
    rate = f"; this run: {processed} inputs in {seconds:.1f} s ({processed / max(seconds, 1e-9):.0f}/s)" if processed else ""
    print(f"preprocess: packed {counts} images into {shards} shard{'' if shards == 1 else 's'} in {out_dir}; "
          f"skipped {index['skipped']} (listed in skipped.tsv){rate}")
    if index["splits"]["train"]["num_images"] == 0:
        print(f"preprocess: no usable training image; see {os.path.join(out_dir, 'skipped.tsv')}", file=sys.stderr)
        return 1
    if strict and index["skipped"]:
        print(f"preprocess: --strict: {index['skipped']} inputs skipped; see {os.path.join(out_dir, 'skipped.tsv')}",
              file=sys.stderr)
        return 1
    return 0
