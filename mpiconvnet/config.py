"""One typed configuration for a training run: defaults < TOML file < command-line flags.

Every field of `Config` is a flag (`--global-batch 256` sets `global_batch`) and a TOML
key (`global_batch = 256`). The resolved config is written to the run directory and
into every checkpoint, so a run can always say how it was made.
"""
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """A bad flag, TOML key or value; the message is one line naming it and the fix."""


@dataclass
class Config:
    # where things are
    data: str = ""                  # data set directory written by python -m preprocess
    out: str = ""                   # run directory: config, metrics.jsonl, checkpoints, plots
    config: str = ""                # optional TOML file of these same keys

    # model and numerics
    model: str = "alexnet"          # alexnet | caffenet | alexnet-owt | alexnet-mini
    backend: str = "numpy"          # numpy | cuda
    dtype: str = "float32"          # float32 | float64 (float64 for exactness tests)
    seed: int = 0                   # weights, sampling, augmentation and dropout all derive from it

    # optimisation (Krizhevsky 2012 defaults)
    epochs: int = 90                # passes over the training set
    global_batch: int = 256         # images per step over all ranks; must divide by the ranks that read data (all, or the async workers; any with --parallel model)
    lr: float = 0.01                # learning rate for global_batch, after warm-up
    lr_scale_by_batch: int = 0      # when > 0: lr *= global_batch / this (the linear scaling rule)
    momentum: float = 0.9           # heavy-ball momentum of SGD
    weight_decay: float = 5e-4      # on weights only, never on biases
    bias_lr_mult: float = 2.0       # Caffe's 2x learning rate for biases
    schedule: str = "step"          # step | multistep | plateau | cosine (to 0 at the last epoch's end) | constant
    lr_step_epochs: int = 30        # step: multiply the lr by lr_gamma every this many epochs
    lr_milestones: str = ""         # multistep: comma-separated epochs, e.g. "30,60,80"
    lr_gamma: float = 0.1           # step, multistep and plateau multiply the lr by this at each drop
    plateau_patience: int = 1       # plateau: evaluations without a better top-1 before a drop
    warmup_epochs: float = 0.0      # linear warm-up from lr/warmup_start_div (Goyal et al. use 5)
    warmup_start_div: float = 10.0  # warm-up starts at lr / this

    # data
    drop_last: bool = True          # False pads the last batch by wrapping around the epoch
    workers: int = 1                # loader processes per rank (0: load in the training process)
    prefetch: int = 2               # batches queued ahead per rank; a rank's loader holds max(prefetch, workers) + 1 batches (1 with workers 0)
    mean: str = "channel"           # channel | image: what augmentation subtracts
    pca_lighting: bool = False      # AlexNet's colour augmentation
    eval_crops: int = 1             # 1 (centre) or 10 (corners, centre and flips)

    # distribution
    parallel: str = "data"          # data: every rank holds the whole model | hybrid: convolutions data-parallel, fc layers split across ranks by output neuron (Krizhevsky 2014) | model: every layer split by output unit, every rank runs the whole batch (Yadan 2013)
    sync: str = "grads"             # grads: average gradients every step (synchronous SGD) | params: each rank steps alone, weights and momentum averaged every --average-every steps | async: rank 0 serves the weights, the others push gradients without waiting for each other (Paine 2013)
    average_every: int = 1          # sync=params: steps between averagings (1 equals sync=grads; theano_alexnet averaged every step)
    async_every: int = 1            # sync=async: batches a worker sums before each push to the server (Downpour's n_push); they must take less than stall_timeout
    bucket_mb: float = 25.0         # gradient bucket size for allreduce (DDP's default); --sync grads with --parallel data or hybrid only
    overlap: bool = True            # reduce buckets while backward runs (false: ~5% faster where ranks fill every core); only where --bucket-mb applies
    threads: int = 1                # BLAS threads per rank
    allow_gpu_sharing: bool = False  # cuda: let ranks on a node share a GPU
    stall_timeout: float = 300.0    # seconds without progress before naming the silent rank; inside blocking collectives the run ends after twice this, so one step, evaluation batch or checkpoint must take less (the async server's checkpoint 1.5x)

    # bookkeeping
    max_steps: int = 0              # stop after this many steps in total (0: run all epochs)
    eval_every: int = 1             # evaluate every this many epochs (0: only at the end)
    log_every: int = 10             # steps between metrics.jsonl lines
    checkpoint_every: int = 0       # steps between checkpoints (0: at each epoch end only)
    keep_checkpoints: int = 3       # how many recent checkpoints to keep
    resume: str = ""                # "", "auto" (newest in out/checkpoints), a checkpoint path or a run directory (its newest); refused for a --data with other classes than the checkpoint's
    init_weights: str = ""          # start from these weights instead of the random init: an .npz (ours or torchvision's names), a checkpoint or a run directory; a run that resumes from a checkpoint ignores it
    init_skip: str = ""             # with --init-weights: comma-separated layers that keep their random init, e.g. fc8 for another class count or class list (a checkpoint's classifier is refused for other classes)
    progress: bool = True           # tqdm bar on rank 0

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


CHOICES = {
    "model": ("alexnet", "caffenet", "alexnet-owt", "alexnet-mini"),
    "backend": ("numpy", "cuda"),
    "dtype": ("float32", "float64"),
    "schedule": ("step", "multistep", "plateau", "cosine", "constant"),
    "mean": ("channel", "image"),
    "eval_crops": (1, 10),
    "sync": ("grads", "params", "async"),
    "parallel": ("data", "hybrid", "model"),
}

FIELD_TYPES = {f.name: f.type for f in fields(Config)}
DEFAULTS = {f.name: f.default for f in fields(Config)}


def _coerce(key, value, where):
    """Convert `value` to the type of field `key`, or raise ConfigError naming `where`."""
    kind = FIELD_TYPES[key]
    flag = "--" + key.replace("_", "-")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(value, bool):   # TOML true/false for a number
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
                raise ValueError
            return int(value)
        if kind is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {flag} expects {kind.__name__}, got {value!r}") from None


def _check(cfg):
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} {getattr(cfg, key)!r} is not one of {', '.join(map(str, allowed))}")
    for key in ("epochs", "global_batch", "log_every", "keep_checkpoints", "threads", "average_every", "async_every",
                "lr_step_epochs", "prefetch"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(cfg, key)}")
    for key in ("seed", "workers", "max_steps", "eval_every", "checkpoint_every", "weight_decay", "bias_lr_mult",
                "warmup_epochs", "lr_scale_by_batch", "plateau_patience"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 0, got {getattr(cfg, key)}")
    for key in ("lr", "bucket_mb", "stall_timeout", "lr_gamma", "warmup_start_div"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(cfg, key)}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.parallel != "data" and cfg.sync != "grads":
        raise ConfigError(f"--parallel {cfg.parallel} needs --sync grads: its ranks hold different parts of the "
                          f"split layers, which neither averaging replicas (params) nor one server's copy (async) fits")
    if cfg.lr_milestones:
        try:
            [int(m) for m in cfg.lr_milestones.split(",")]
        except ValueError:
            raise ConfigError(f"--lr-milestones {cfg.lr_milestones!r}: give comma-separated epochs, e.g. 30,60,80") from None
    return cfg


def reduces_gradient_buckets(cfg):
    """Whether the run reduces gradients in buckets, from a communication thread while
    backward runs (--overlap): --sync grads, but for --parallel model, which replicates
    nothing."""
    return cfg.sync == "grads" and cfg.parallel != "model"


def _ignored_by_the_mode(cfg):
    """(key, what it applies to, the fix, refused) for each setting away from its default
    that this run's --sync/--parallel ignores. The other mode's own settings are refused:
    most likely the mode itself was forgotten. The rest are noted, not refused: a command
    that gave them still runs, a requeued job's included."""
    buckets = "the gradient allreduce of --sync grads with --parallel data or hybrid"
    for key, applies, needs, fix, refused in (
            ("average_every", "--sync params", cfg.sync == "params", "add --sync params", True),
            ("async_every", "--sync async", cfg.sync == "async", "add --sync async", True),
            ("bucket_mb", buckets, reduces_gradient_buckets(cfg), "", False),
            ("overlap", buckets, reduces_gradient_buckets(cfg), "", False),
            ("eval_every", "--sync grads and params (--sync async evaluates once, at the end)",
             cfg.sync != "async" or cfg.eval_every <= 1, "", False)):
        if not needs and getattr(cfg, key) != DEFAULTS[key]:
            yield key, applies, fix, refused


def _setting(cfg, key, origin):
    """How the user gave `key`: "--bucket-mb 5" or "bucket_mb = 5 in run.toml"."""
    value = getattr(cfg, key)
    value = str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else value
    return f"{key} = {value} in {origin[key]}" if key in origin else f"--{key.replace('_', '-')} {value}"


def _check_combinations(cfg, origin=None, notes=None):
    """Flags that run but cannot do what they ask, refused when a user gives them (not
    when a saved config is read: a checkpoint made before these checks still resumes).
    `origin` names the TOML file of the keys that came from one; `notes` (a list) gets
    a line for each setting this run ignores but does not refuse."""
    origin = origin or {}
    if cfg.schedule == "multistep" and not cfg.lr_milestones:
        raise ConfigError("--schedule multistep needs --lr-milestones, e.g. 30,60,80 (the epochs where the lr drops)")
    if cfg.schedule == "plateau" and (cfg.eval_every == 0 or cfg.sync == "async"):
        raise ConfigError("--schedule plateau drops the lr when evaluations stop improving: it needs --eval-every 1 "
                          "or more, and --sync grads or params (async evaluates only at the end)")
    mode = f"--sync {cfg.sync} --parallel {cfg.parallel}"
    for key, applies, fix, refused in _ignored_by_the_mode(cfg):
        if refused:
            raise ConfigError(f"{_setting(cfg, key, origin)} applies to {applies} only, and this run has {mode}; "
                              f"{fix}, or leave it out")
        if notes is not None:
            notes.append(f"{_setting(cfg, key, origin)} has no effect with {mode} (it applies to {applies} only)")
    if cfg.init_skip and not cfg.init_weights:
        raise ConfigError(f"--init-skip {cfg.init_skip} needs --init-weights: the file the other layers start from")
    return cfg


def parse_flags(argv):
    """Turn ['--global-batch', '64', '--overlap', 'false', ...] into {'global_batch': 64, ...}."""
    values = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --global-batch 256")
        key, eq, inline = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in FIELD_TYPES:
            raise ConfigError(f"unknown flag {arg.split('=')[0]}; see --help for the list")
        if eq:
            raw = inline
            i += 1
        elif FIELD_TYPES[key] is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            raw = "true"   # a bare boolean flag switches it on
            i += 1
        elif i + 1 < len(argv):
            raw = argv[i + 1]
            i += 2
        else:
            raise ConfigError(f"flag {arg} needs a value")
        values[key] = _coerce(key, raw, "command line")
    return values


def load_toml(path):
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in FIELD_TYPES or name == "config":
            raise ConfigError(f"{path}: unknown key {key!r}; keys are the flag names, e.g. global_batch = 256")
        values[name] = _coerce(name, value, path)
    return values


def resolve(argv=(), base=None, notes=None):
    """Defaults (or `base`), then the TOML file named by --config, then the flags. `notes`
    (a list) gets a line for each setting the run's mode ignores."""
    flags = parse_flags(list(argv))
    cfg = dataclasses.replace(base) if base is not None else Config()
    toml_path = flags.get("config", "")
    from_toml = load_toml(toml_path) if toml_path else {}
    for key, value in [*from_toml.items(), *flags.items()]:
        setattr(cfg, key, value)
    origin = {key: toml_path for key in from_toml if key not in flags}
    return _check_combinations(_check(cfg), origin, notes)


def from_dict(values):
    """Rebuild a Config saved by to_dict (checkpoints); unknown keys are an error."""
    cfg = Config()
    for key, value in values.items():
        if key not in FIELD_TYPES:
            raise ConfigError(f"saved config has unknown key {key!r}; was it written by a newer mpiconvnet?")
        setattr(cfg, key, _coerce(key, value, "saved config"))
    return _check(cfg)


def help_text():
    """One line per flag with its default and the comment from the dataclass."""
    import inspect
    import re
    source = inspect.getsource(Config)
    lines = []
    for f in fields(Config):
        match = re.search(rf"^[ \t]+{f.name}: [^=\n]+= (.+?)(?:[ \t]+# (.*))?$", source, re.M)
        default, comment = (match.group(1), match.group(2) or "") if match else (repr(f.default), "")
        lines.append(f"  --{f.name.replace('_', '-'):<20} {default:<12} {comment}")
    return "\n".join(lines)
