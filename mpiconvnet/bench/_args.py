"""Argument types the benchmarks share, so that a bad value is argparse's one-line error
naming the flag (exit 2) before anything runs, not a traceback minutes later."""
import argparse
import math
import os


# the images tests/data_fixtures.py can tell apart by their colour code: the most a
# benchmark's synthetic set holds
SYNTHETIC_MAX = 4096


def synthetic_images_problem(images):
    """The one line for an --images the synthetic set cannot hold, or None."""
    if images > SYNTHETIC_MAX:
        return (f"--images {images}: the synthetic set holds at most {SYNTHETIC_MAX}; lower --images, or pack a "
                f"larger set with python -m preprocess and pass --data")
    return None


def at_least(minimum, kind=int):
    """A number >= minimum: at_least(1) for counts, at_least(0) for counts that may be 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not value >= minimum:   # NaN fails too
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return value
    return parse


def thread_count(text):
    """A thread count from 1 to 4x the machine's cores: more only queue behind each other
    (100000 would start that many threads)."""
    limit = 4 * (os.cpu_count() or 1)
    value = at_least(1)(text)
    if value > limit:
        raise argparse.ArgumentTypeError(f"must be at most {limit} (4x the {os.cpu_count()} cpus here), got {text}")
    return value


def counts(minimum=1):
    """Comma-separated whole numbers >= minimum, e.g. 1,2,4."""
    def parse(text):
        number = at_least(minimum)
        try:
            return [number(part) for part in text.split(",")]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expects comma-separated whole numbers of at least {minimum}, "
                                             f"e.g. {minimum},2,4; got {text!r}") from None
    return parse


def model_names():
    from mpiconvnet.models import MODELS
    return sorted(MODELS)


def directory(text):
    """An existing directory (where the benchmark writes or reads)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is not an existing directory")
    return text
