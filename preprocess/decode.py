"""Turn one input file's bytes into an S x S x 3 uint8 RGB image, or say why it cannot be.

Images are recognised by their first bytes, never by their file name: ImageNet's train set
holds 22 CMYK JPEGs and a PNG named .JPEG, and grayscale, palette, RGBA and 16-bit images
turn up in class-folder trees.

Ordinary JPEGs (the bulk) go through simplejpeg (libjpeg-turbo) with DCT-domain scaling:
the decoder itself shrinks by M/8 (M = 1..6) to the smallest size still at least S, which
measured ~1.4x faster than Pillow on 500x375 JPEGs (Pillow's `draft` cannot help there:
it only scales by 1/2, 1/4 and 1/8, and at S=256 none of those fits). Everything else
goes through Pillow.
"""
import io
import warnings

import numpy as np
from PIL import Image

# Pillow resamples with a filter scaled to the reduction, so bilinear is properly antialiased
RESAMPLE = Image.Resampling.BILINEAR
DEFAULT_MAX_PIXELS = 200_000_000   # ~14,000 x 14,000; larger is treated as a decompression bomb


class BadImage(Exception):
    """An input that cannot be packed; str() is the reason written to skipped.tsv."""


def sniff(data):
    """The image kind from the magic bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6"):
        return "pnm"
    return None


def not_an_image(data):
    return f"not an image (starts with {bytes(data[:8])!r})"


def refuse_by_start(head, max_pixels=DEFAULT_MAX_PIXELS):
    """Raise BadImage where the first bytes of an input already show it cannot be packed:
    not an image by its magic bytes, or more pixels than max_pixels by its header. The
    readers call this before reading the rest of a large input, so that a stray 3 GB file
    is never read whole (an image itself must be: it is decoded from all its bytes)."""
    if sniff(head) is None:
        raise BadImage(not_an_image(head))
    size = size_by_header(head)
    if size and size[0] * size[1] > max_pixels:
        raise BadImage(f"decompression bomb: {size[0]}x{size[1]} pixels exceeds --max-pixels {max_pixels}")


def size_by_header(head):
    """(width, height) from an image's first bytes, or None where they do not tell (the
    header reaches past them, or Pillow refuses it: the decoder then judges the whole)."""
    # no limit of Pillow's own here: the caller compares the size with --max-pixels
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(head)) as image:
            return image.size
    except Exception:   # Pillow raises many types for a header cut short
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def crop_box(width, height, resize):
    """The source region that becomes the S x S output: the centred square for shorter-crop
    (resize shorter side to S then centre-crop S x S is the same as cropping the centred
    min(w, h) square and resizing it), the whole image for squash."""
    if resize == "squash":
        return (0.0, 0.0, float(width), float(height))
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return (left, top, left + side, top + side)


def resize_to_square(image, size, resize):
    """PIL RGB image -> uint8 (size, size, 3)."""
    box = crop_box(image.width, image.height, resize)
    return np.asarray(image.resize((size, size), RESAMPLE, box=box), dtype=np.uint8)


def decode_jpeg_fast(data, size, resize, max_pixels):
    """simplejpeg path for YCbCr and grayscale JPEGs; None when Pillow must judge the file
    (CMYK/YCCK, or anything libjpeg-turbo's strict mode refuses)."""
    import simplejpeg
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} pixels exceeds --max-pixels {max_pixels}")
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    # ask for the smallest DCT scale M/8 whose output still covers S along the sides that
    # matter, unless that is 7/8: libjpeg-turbo's 7/8 inverse DCT is plain C, and decoding
    # whole then resizing measured 13 % faster there (1.92 against 2.21 ms at S=256 for
    # shorter sides of 293-341 px) and 5 dB closer to a Lanczos resize of the whole image;
    # at 6/8 and below scaling pays (6/8: 2.49 against 2.67 ms). Both resize modes are
    # bound by the shorter side (docs/benchmarks-preprocess.md).
    if (min(width, height) * 6 + 7) // 8 < size:   # libjpeg rounds scaled sizes up
        min_height, min_width = 0, 0
    elif resize == "squash":
        min_height, min_width = size, size
    elif height <= width:
        min_height, min_width = size, 0
    else:
        min_height, min_width = 0, size
    try:
        # strict: libjpeg's "recoverable" errors (a truncated file, a corrupt segment) would
        # otherwise decode to grey blocks and be packed silently. Pillow then decides: it
        # refuses truncated files but accepts harmless warnings, as the naive pipeline would.
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_height, min_width=min_width,
                                        strict=True)
    except ValueError:
        return None
    return resize_to_square(Image.fromarray(pixels), size, resize)


def to_rgb(image):
    """Any Pillow mode -> RGB, keeping 16-bit and float images in range instead of clipping."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            scale = 257.0     # 16-bit samples, however dark the image: keep the top 8 bits
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            scale = 1 / 255   # floating-point samples in 0..1
        else:
            # 32-bit integers or floats of no stated range: 8-bit data stored wide stays as
            # it is, anything larger is taken as 16-bit
            scale = 257.0 if values.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # composite on white: transparent pixels hold arbitrary colours, often black
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_with_pillow(data, size, resize, max_pixels):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(f"decompression bomb: {width}x{height} pixels exceeds --max-pixels {max_pixels}")
            if width == 0 or height == 0:
                raise BadImage("image has zero width or height")
            # Pillow decodes truncated files as far as they go unless told otherwise
            image.load()
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImage(f"decompression bomb: {error}") from None
        except Exception as error:   # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            raise BadImage(f"cannot decode: {type(error).__name__}: {error}") from None
    return resize_to_square(to_rgb(image), size, resize)


def decode_image(data, size, resize="shorter-crop", max_pixels=DEFAULT_MAX_PIXELS):
    """bytes -> uint8 (size, size, 3) RGB; raises BadImage with the reason."""
    if len(data) == 0:
        raise BadImage("empty file")
    kind = sniff(data)
    if kind is None:
        raise BadImage(not_an_image(data))
    if kind == "jpeg":
        pixels = decode_jpeg_fast(data, size, resize, max_pixels)
        if pixels is not None:
            return pixels
    # Pillow's limit is ours too, so that its own bomb check agrees with --max-pixels
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        return decode_with_pillow(data, size, resize, max_pixels)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def encode_jpeg(pixels, quality):
    """uint8 (S, S, 3) -> JPEG bytes for --format jpeg (4:2:0 as in the source JPEGs)."""
    import simplejpeg
    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB",
                                  colorsubsampling="420")
