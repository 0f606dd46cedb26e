"""Decoding by content: every odd-but-valid image becomes RGB, every bad one a reason."""
import io
import re
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from preprocess.decode import BadImage, crop_box, decode_image
from preprocess.sources import ArchiveInputs, FileInputs

S = 32


def gradient(width=60, height=40):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], -1).astype(np.uint8)


def saved(image, fmt, **options):
    stream = io.BytesIO()
    image.save(stream, fmt, **options)
    return stream.getvalue()


def expected(pixels, resize="shorter-crop"):
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((S, S), Image.Resampling.BILINEAR, box=crop_box(*image.size, resize)))


@pytest.mark.parametrize("resize", ["shorter-crop", "squash"])
def test_jpeg_fast_path_matches_pillow_path(resize):
    pixels = gradient(500, 375)
    data = saved(Image.fromarray(pixels), "JPEG", quality=95)
    fast = decode_image(data, S, resize)
    slow = expected(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), resize)
    assert fast.shape == (S, S, 3) and fast.dtype == np.uint8
    # DCT-domain scaling averages differently from Pillow's filter; smooth images agree closely
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2.0


@pytest.mark.parametrize("shorter_side, scaled_in_the_dct", [(320, False), (400, True)])
def test_dct_scaling_only_where_it_pays(shorter_side, scaled_in_the_dct):
    # at S=256 a 320 px side would scale by 7/8, slower than decoding whole; 400 px by 6/8
    import simplejpeg
    noise = np.random.default_rng(shorter_side).integers(0, 256, (shorter_side, shorter_side * 4 // 3, 3))
    data = saved(Image.fromarray(noise.astype(np.uint8)), "JPEG", quality=90)
    whole = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    from_whole = np.asarray(whole.resize((256, 256), Image.Resampling.BILINEAR, box=crop_box(*whole.size, "shorter-crop")))
    assert np.array_equal(decode_image(data, 256), from_whole) != scaled_in_the_dct


def test_shorter_side_crop_keeps_the_centre_and_squash_keeps_everything():
    assert crop_box(500, 375, "shorter-crop") == (62.5, 0.0, 437.5, 375.0)
    assert crop_box(375, 500, "shorter-crop") == (0.0, 62.5, 375.0, 437.5)
    assert crop_box(500, 375, "squash") == (0.0, 0.0, 500.0, 375.0)


@pytest.mark.parametrize("kind", ["cmyk-jpeg", "png-named-jpeg", "gray-jpeg", "palette-png", "rgba-png",
                                  "gray16-png", "gif", "bmp", "la-png", "webp"])
def test_valid_images_of_every_kind_decode_to_rgb(kind):
    pixels = gradient()
    image = Image.fromarray(pixels)
    if kind == "cmyk-jpeg":
        data = saved(image.convert("CMYK"), "JPEG", quality=95)
    elif kind in ("png-named-jpeg",):
        data = saved(image, "PNG")
    elif kind == "gray-jpeg":
        data = saved(image.convert("L"), "JPEG", quality=95)
        pixels = np.repeat(np.asarray(image.convert("L"))[..., None], 3, -1)
    elif kind == "palette-png":
        data = saved(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG")
    elif kind == "rgba-png":
        data = saved(image.convert("RGBA"), "PNG")
    elif kind == "la-png":
        data = saved(image.convert("LA"), "PNG")
        pixels = np.repeat(np.asarray(image.convert("L"))[..., None], 3, -1)
    elif kind == "gray16-png":
        # 16-bit samples: value v * 257 must come back as v, not clipped to 255
        gray8 = np.asarray(image.convert("L"))
        data = saved(Image.fromarray((gray8.astype(np.uint16) * 257)), "PNG")
        pixels = np.repeat(gray8[..., None], 3, -1)
    elif kind == "gif":
        data = saved(image.convert("P"), "GIF")
    elif kind == "webp":
        data = saved(image, "WEBP", lossless=True)
    else:
        data = saved(image, "BMP")
    decoded = decode_image(data, S)
    assert decoded.shape == (S, S, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - expected(pixels).astype(int)).mean() < 12, kind


def test_rgba_transparent_pixels_become_white():
    rgba = np.zeros((40, 40, 4), np.uint8)    # fully transparent black
    decoded = decode_image(saved(Image.fromarray(rgba, "RGBA"), "PNG"), S)
    assert decoded.min() == 255


def jpeg_bytes():
    return saved(Image.fromarray(gradient(200, 150)), "JPEG", quality=90)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is a text file, not an image\n", "not an image"),
    (jpeg_bytes()[:len(jpeg_bytes()) // 2], "truncated"),
    (saved(Image.fromarray(gradient(200, 150)), "PNG")[:300], "cannot decode"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "cannot decode"),
])
def test_bad_inputs_raise_with_a_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_image(data, S)


def test_decompression_bombs_are_refused_before_decoding():
    # 3000 x 3000 = 9 M pixels against a 1 M limit, for both decode paths
    big = Image.new("RGB", (3000, 3000))
    for data in (saved(big, "JPEG"), saved(big, "PNG")):
        with pytest.raises(BadImage, match="decompression bomb"):
            decode_image(data, S, max_pixels=1_000_000)


def png_start(width, height):
    """The first bytes of a PNG of width x height: signature, header, start of the data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header
            + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + struct.pack(">I", 1 << 30) + b"IDAT")


def input_of(kind, path, size):
    if kind == "file":
        return FileInputs(["x"], [0], [str(path)])
    return ArchiveInputs(["x"], [0], [str(path)], [0], [0], [size])


@pytest.mark.parametrize("kind", ["file", "archive member"])
@pytest.mark.parametrize("start, reason", ids=["a zip", "a png bomb"], argvalues=[
    (b"PK\x03\x04", "not an image (starts with b'PK\\x03\\x04"),   # a stray zip named huge.jpg
    # past Pillow's own limit (2 x 89 M pixels), where it refuses to say the size
    (png_start(30000, 30000), "decompression bomb: 30000x30000 pixels exceeds --max-pixels 200000000"),
])
def test_a_large_input_is_refused_by_its_first_bytes_without_reading_the_rest(tmp_path, kind, start, reason):
    path = tmp_path / "huge.jpg"
    size = 256 << 20
    with open(path, "wb") as stream:   # sparse: no disk space taken
        stream.write(start)
        stream.truncate(size)
    tracemalloc.start()
    try:
        with pytest.raises(BadImage, match=re.escape(reason)):
            input_of(kind, path, size).read(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak   # its first MiB, not all 256 (a 3 GB file was read whole)


@pytest.mark.parametrize("kind", ["file", "archive member"])
def test_an_image_larger_than_the_first_bytes_read_is_still_read_whole(tmp_path, kind):
    data = saved(Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), np.uint8)), "PNG")
    assert len(data) > 1 << 20   # more than the first MiB that is judged before the rest is read
    (tmp_path / "big.png").write_bytes(data)
    assert input_of(kind, tmp_path / "big.png", len(data)).read(0) == data


def test_unreadable_file_is_a_bad_image(tmp_path):
    inputs = FileInputs(["gone.jpg"], [0], [str(tmp_path / "gone.jpg")])
    with pytest.raises(BadImage, match="unreadable"):
        inputs.read(0)


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", [200, 300, 65535], [1, 1, 255]),        # a dark 16-bit image stays dark
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),           # floats in 0..1
])
def test_wide_samples_keep_their_range(mode, values, expected):
    from preprocess.decode import to_rgb
    array = np.array([values], dtype=np.uint16 if mode == "I;16" else np.float32)
    image = Image.fromarray(array)
    assert image.mode == mode
    rgb = np.asarray(to_rgb(image))
    np.testing.assert_array_equal(rgb[0, :, 0], expected)
