"""A synthetic, learnable image set, as class folders or in ImageNet's exact release layout.

    python -m preprocess synth --out /tmp/synth --classes 10 --per-class 100
    python -m preprocess synth --out /tmp/inet --classes 10 --per-class 100 --layout imagenet
    python -m preprocess imagenet --train /tmp/inet/ILSVRC2012_img_train.tar \\
        --val /tmp/inet/ILSVRC2012_img_val.tar --devkit /tmp/inet/ILSVRC2012_devkit_t12.tar.gz --out /tmp/inet-64

Each class is a shape (disc, square, triangle, ring, cross) filled with its own colour and
texture (flat, stripes at a class angle, checks) on a noisy background, at a random
position and scale, so a convnet can learn it but not from one pixel. Image sizes vary
around --size (default 500x375, ImageNet's typical size) with portrait images mixed in.

The imagenet layout reproduces the release: a train tar of per-class tars (member order
not name order), a flat val tar of ILSVRC2012_val_%08d.JPEG, and a devkit tar.gz with
meta.mat and the ground truth in ILSVRC2012_ID order. IDs are assigned in a shuffled
order, and non-leaf synsets (num_children > 0) are interleaved in meta.mat, so a loader
that labels by ID order or forgets the leaf filter gets wrong labels. The train set also
holds ImageNet's traps (a CMYK JPEG, a PNG named .JPEG, a grayscale JPEG) when there are
enough images.
"""
import io
import os
import shlex
import shutil
import sys
import tarfile
import tempfile

import numpy as np

from mpiconvnet.run_lock import topmost_missing
from PIL import Image

SHAPES = ("disc", "square", "triangle", "ring", "cross")
TEXTURES = ("flat", "stripes", "checks")
GOLDEN = 0.618033988749895
LAYOUT_PARTS = {"folder": ("train", "val"),   # what each layout puts into --out
                "imagenet": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")}
# the classes and their max(2, classes // 3) parents are numbered 1.. in a uint16
MAX_IMAGENET_CLASSES = 49151


def class_style(c):
    """(shape, texture, rgb colour, stripe angle) of class c; neighbours differ in all four."""
    hue = (c * GOLDEN) % 1.0
    rgb = np.array(Image.new("HSV", (1, 1), (int(hue * 255), 200, 230)).convert("RGB").getpixel((0, 0)), float)
    return SHAPES[c % len(SHAPES)], TEXTURES[(c // len(SHAPES)) % len(TEXTURES)], rgb, (c * 0.7) % np.pi


def image_size_for(rng, base_width, base_height):
    scale = rng.uniform(0.7, 1.3)
    aspect = rng.uniform(0.85, 1.15)
    width, height = max(8, int(base_width * scale * aspect)), max(8, int(base_height * scale / aspect))
    if rng.random() < 0.25:   # portrait, as about a quarter of ImageNet is
        width, height = height, width
    return width, height


def draw(c, rng, width, height):
    """uint8 (height, width, 3) image of class c."""
    shape, texture, colour, angle = class_style(c)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    side = min(width, height)
    radius = side * rng.uniform(0.22, 0.4)
    cx = rng.uniform(radius, width - radius) if width > 2 * radius else width / 2
    cy = rng.uniform(radius, height - radius) if height > 2 * radius else height / 2
    dx, dy = (x - cx) / radius, (y - cy) / radius
    if shape == "disc":
        mask = dx ** 2 + dy ** 2 <= 1
    elif shape == "square":
        mask = (np.abs(dx) <= 0.8) & (np.abs(dy) <= 0.8)
    elif shape == "triangle":
        mask = (dy <= 0.8) & (dy >= 1.6 * np.abs(dx) - 0.8)
    elif shape == "ring":
        mask = (dx ** 2 + dy ** 2 <= 1) & (dx ** 2 + dy ** 2 >= 0.35)
    else:
        mask = ((np.abs(dx) <= 0.25) & (np.abs(dy) <= 0.9)) | ((np.abs(dy) <= 0.25) & (np.abs(dx) <= 0.9))
    if texture == "stripes":
        pattern = 0.75 + 0.25 * np.sign(np.sin((x * np.cos(angle) + y * np.sin(angle)) * 12.0 / radius))
    elif texture == "checks":
        pattern = 0.75 + 0.25 * np.sign(np.sin(x * 9.0 / radius) * np.sin(y * 9.0 / radius))
    else:
        pattern = np.ones_like(x)
    background = rng.uniform(60, 200, size=3) * rng.uniform(0.8, 1.0, size=(1, 1, 3))
    image = np.broadcast_to(background, (height, width, 3)).copy()
    tint = np.clip(colour + rng.normal(0, 12, size=3), 0, 255)
    image[mask] = tint * pattern[mask][:, None]
    image += rng.normal(0, 14, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(pixels, kind="jpeg"):
    """Bytes of the image as a JPEG, a CMYK JPEG, a grayscale JPEG or a PNG."""
    image = Image.fromarray(pixels)
    stream = io.BytesIO()
    if kind == "cmyk":
        image.convert("CMYK").save(stream, "JPEG", quality=90)
    elif kind == "gray":
        image.convert("L").save(stream, "JPEG", quality=90)
    elif kind == "png":
        image.save(stream, "PNG")
    else:
        import simplejpeg
        return simplejpeg.encode_jpeg(pixels, quality=90, colorspace="RGB", colorsubsampling="420")
    return stream.getvalue()


def make_images(c, count, rng, size, traps):
    """[(bytes, trap kind or None)] for class c."""
    kinds = ["cmyk", "png", "gray"] if traps and count >= 3 else []
    return [encode(draw(c, rng, *image_size_for(rng, *size)), kinds[i] if i < len(kinds) else "jpeg")
            for i in range(count)]


def add_bytes(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    archive.addfile(info, io.BytesIO(data))


def write_folder_layout(out, classes, per_class, val_per_class, size, rng):
    names = [f"class{c:03d}_{class_style(c)[0]}_{class_style(c)[1]}" for c in range(classes)]
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(names):
            folder = os.path.join(out, split, name)
            os.makedirs(folder, exist_ok=True)
            for i, data in enumerate(make_images(c, count, rng, size, traps=False)):
                with open(os.path.join(folder, f"{name}_{i:05d}.jpg"), "wb") as stream:
                    stream.write(data)
    return {"train": os.path.join(out, "train"), "val": os.path.join(out, "val")}


def synthetic_wnids(classes, rng):
    """Distinct wnid-like ids; the leaves, and parents that sort among them."""
    numbers = rng.choice(np.arange(1_000_000, 9_999_999), size=classes + max(2, classes // 3), replace=False)
    wnids = [f"n{n:08d}" for n in numbers]
    return wnids[:classes], wnids[classes:]


def meta_mat_bytes(leaf_ids, parents):
    """meta.mat as the devkit ships it: a (K, 1) struct array 'synsets'; leaves then parents."""
    from scipy.io import savemat
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(synset_id, wnid, f"synthetic class {wnid}", 0, []) for wnid, synset_id in leaf_ids.items()]
    first_parent = len(leaf_ids) + 1
    rows += [(first_parent + k, wnid, f"synthetic group {wnid}", 2, [1, 2]) for k, wnid in enumerate(parents)]
    rows.sort(key=lambda row: row[0])
    synsets = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for k, (synset_id, wnid, words, children, child_ids) in enumerate(rows):
        synsets[k, 0] = (np.array([[synset_id]], np.uint16), np.array([wnid]), np.array([words]),
                         np.array(["a synthetic synset"]), np.array([[children]], np.uint8),
                         np.array([child_ids], np.uint16).reshape(1, -1), np.array([[0]], np.uint8),
                         np.array([[0]], np.uint16))
    stream = io.BytesIO()
    savemat(stream, {"synsets": synsets})
    return stream.getvalue()


def write_imagenet_layout(out, classes, per_class, val_per_class, size, rng):
    leaves, parents = synthetic_wnids(classes, rng)
    # ILSVRC2012_IDs 1..N in a shuffled order: ID order is not sorted-wnid order
    leaf_ids = {wnid: int(i) + 1 for wnid, i in zip(leaves, rng.permutation(classes))}
    train_path = os.path.join(out, "ILSVRC2012_img_train.tar")
    with tarfile.open(train_path, "w", format=tarfile.USTAR_FORMAT) as outer:
        for c in rng.permutation(classes):      # member order is not name order
            wnid = leaves[c]
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.USTAR_FORMAT) as archive:
                numbers = rng.choice(100_000, size=per_class, replace=False)
                for number, data in zip(numbers, make_images(c, per_class, rng, size, traps=(c == 0))):
                    add_bytes(archive, f"{wnid}_{number}.JPEG", data)
            add_bytes(outer, f"{wnid}.tar", inner.getvalue())
    val_classes = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    val_path = os.path.join(out, "ILSVRC2012_img_val.tar")
    with tarfile.open(val_path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for k in rng.permutation(len(val_classes)):
            data = make_images(int(val_classes[k]), 1, rng, size, traps=False)[0]
            add_bytes(archive, f"ILSVRC2012_val_{k + 1:08d}.JPEG", data)
    ground_truth = "".join(f"{leaf_ids[leaves[c]]}\n" for c in val_classes)
    devkit_path = os.path.join(out, "ILSVRC2012_devkit_t12.tar.gz")
    with tarfile.open(devkit_path, "w:gz", format=tarfile.USTAR_FORMAT) as archive:
        add_bytes(archive, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat_bytes(leaf_ids, parents))
        add_bytes(archive, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", ground_truth.encode())
    return {"train": train_path, "val": val_path, "devkit": devkit_path}


def write_set(out, write, *args):
    """write(folder, *args) into a hidden folder inside `out`, then its parts moved into
    `out`: a failure (a full disk) leaves nothing half-written behind, and `out` keeps
    whatever it held. Returns write's paths as they are in `out`."""
    staging = tempfile.mkdtemp(prefix=".synth-", dir=out)
    try:
        paths = write(staging, *args)
        for name in sorted(os.listdir(staging)):
            os.rename(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {key: os.path.join(out, os.path.relpath(path, staging)) for key, path in paths.items()}


def check_out(out, layout):
    """Refuse an --out that is a file, or that holds a part of the set already: an earlier
    set's class folders would mix with this one's, and an ImageNet tar there may be the
    real one."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; give a folder for the set")
    there = [name for name in LAYOUT_PARTS[layout] if os.path.lexists(os.path.join(out, name))]
    if there:
        raise ValueError(f"--out {out} already holds {there[0]}; remove it or choose another --out")


def parse_size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
        if width < 8 or height < 8:
            raise ValueError
    except ValueError:
        raise ValueError(f"--size {text!r}: expected WIDTHxHEIGHT, each at least 8, e.g. 500x375") from None
    return width, height


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="folder to create the image set in")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--per-class", type=int, default=100, help="training images per class (default 100)")
    parser.add_argument("--val-per-class", type=int, help="validation images per class (default per-class / 5, at least 1)")
    parser.add_argument("--layout", choices=("folder", "imagenet"), default="folder",
                        help="folder: train/CLASS/*.jpg and val/CLASS/*.jpg; imagenet: the ILSVRC2012 tars and devkit")
    parser.add_argument("--size", default="500x375", help="typical image size WxH; each image varies around it")
    parser.add_argument("--seed", type=int, default=0, help="the images drawn (default 0)")


def main(args):
    try:
        size = parse_size(args.size)
        if args.classes < 1 or args.per_class < 1:
            raise ValueError(f"--classes {args.classes} --per-class {args.per_class}: both must be at least 1")
        if args.val_per_class is not None and args.val_per_class < 0:
            raise ValueError(f"--val-per-class {args.val_per_class}: must be at least 0")
        if args.seed < 0:
            raise ValueError(f"--seed {args.seed}: must be at least 0")
        if args.layout == "imagenet" and args.classes > MAX_IMAGENET_CLASSES:
            raise ValueError(f"--classes {args.classes}: at most {MAX_IMAGENET_CLASSES} with --layout imagenet "
                             f"(meta.mat holds ILSVRC2012_IDs as uint16, for the classes and a third as many parent "
                             f"synsets; the release has 1000)")
        check_out(args.out, args.layout)
    except ValueError as error:
        print(f"synth: {error}", file=sys.stderr)
        return 2
    val_per_class = args.val_per_class if args.val_per_class is not None else max(1, args.per_class // 5)
    rng = np.random.default_rng(args.seed)
    write = write_imagenet_layout if args.layout == "imagenet" else write_folder_layout
    made = topmost_missing(args.out)
    try:
        os.makedirs(args.out, exist_ok=True)
        paths = write_set(args.out, write, args.classes, args.per_class, val_per_class, size, rng)
    except OSError as error:
        if made:   # the folders this command made for --out go too
            shutil.rmtree(made, ignore_errors=True)
        print(f"synth: cannot write under --out {args.out}: {error.strerror or error}; choose a writable folder "
              f"with space for the images (nothing was left there)", file=sys.stderr)
        return 1
    print(f"synth: {args.classes} classes x {args.per_class} train + {val_per_class} val images in {args.out}")
    q = {name: shlex.quote(path) for name, path in paths.items()}   # a copy-paste that works with spaces
    if args.layout == "imagenet":
        print(f"next: python -m preprocess imagenet --train {q['train']} --val {q['val']} "
              f"--devkit {q['devkit']} --out DIR")
    else:
        print(f"next: python -m preprocess folder --train {q['train']} --val {q['val']} --out DIR")
    return 0
