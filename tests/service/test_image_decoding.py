"""Image decoding for predict (worker.imaging): every mode to RGB, any size to 32x32, hostile files refused."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from svc_helpers import image_bytes, raw_png

from service.errors import BadImage, InvalidInput, PayloadTooLarge
from service.serving.decode import decode_b64, decode_image, nested_list_to_array
from worker.imaging import MAX_PIXELS


def test_rgb_png_of_32x32_is_returned_exactly() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = decode_image(image_bytes(Image.fromarray(pixels)), "image 0")
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("size", [(500, 300), (33, 1000), (8, 8), (1, 1), (31, 64)])
def test_any_size_becomes_32x32(size: tuple[int, int]) -> None:
    out = decode_image(image_bytes(Image.new("RGB", size, (10, 200, 30))), "image 0")
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - [10, 200, 30]).max() <= 1


def test_downscaling_averages_instead_of_aliasing() -> None:
    # A 1-pixel checkerboard: a good filter gives mid-grey, point sampling would give black or white.
    board = (np.indices((320, 320)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = decode_image(image_bytes(Image.fromarray(board, mode="L")), "image 0")
    assert np.abs(out.astype(int) - 127.5).max() < 10


def test_palette_png_is_converted_to_its_colours() -> None:
    img = Image.new("P", (32, 32))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (0, 16, 32, 32))  # bottom half uses palette entry 1 (blue)
    out = decode_image(image_bytes(img), "image 0")
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[31, 0]) == (0, 0, 255)


def test_palette_png_with_transparency_is_composited_over_white() -> None:
    img = Image.new("P", (32, 32))
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.paste(1, (0, 0, 32, 16))
    out = decode_image(image_bytes(img, transparency=0), "image 0")
    assert tuple(out[0, 0]) == (0, 255, 0)
    assert tuple(out[31, 0]) == (255, 255, 255)


def test_rgba_is_composited_over_white() -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:16] = (255, 0, 0, 255)  # opaque red on top, fully transparent black below
    out = decode_image(image_bytes(Image.fromarray(rgba, mode="RGBA")), "image 0")
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[31, 0]) == (255, 255, 255)


def test_grey_with_alpha_la() -> None:
    la = Image.new("LA", (32, 32), (100, 255))
    out = decode_image(image_bytes(la), "image 0")
    assert tuple(out[5, 5]) == (100, 100, 100)


def test_16_bit_greyscale_png_is_scaled_not_clipped() -> None:
    values = np.full((32, 32), 32896, dtype=">u2")  # 32896 / 257 = 128
    values[:, :16] = 65535
    png = raw_png(32, 32, 16, 0, b"".join(b"\x00" + row.tobytes() for row in values))
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    out = decode_image(png, "image 0")
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 31]) == (128, 128, 128)


def test_16_bit_rgb_png() -> None:
    values = np.zeros((32, 32, 3), dtype=">u2")
    values[..., 0] = 65535
    values[..., 2] = 257 * 64
    png = raw_png(32, 32, 16, 2, b"".join(b"\x00" + row.tobytes() for row in values))
    out = decode_image(png, "image 0")
    assert tuple(out[3, 3]) == (255, 0, 64)


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # no cyan or black, full magenta and yellow: red
    out = decode_image(image_bytes(cmyk, "JPEG", quality=95), "image 0")
    r, g, b = (int(v) for v in out[16, 16])
    assert r > 200 and g < 60 and b < 60


def test_greyscale_jpeg_bmp_and_webp() -> None:
    grey = decode_image(image_bytes(Image.new("L", (64, 64), 90), "JPEG", quality=95), "image 0")
    assert np.abs(grey.astype(int) - 90).max() <= 2
    bmp = decode_image(image_bytes(Image.new("RGB", (32, 32), (1, 2, 3)), "BMP"), "image 0")
    assert tuple(bmp[0, 0]) == (1, 2, 3)
    webp = decode_image(image_bytes(Image.new("RGB", (48, 48), (0, 0, 250)), "WEBP", lossless=True), "image 0")
    assert tuple(webp[10, 10]) == (0, 0, 250)


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    gif = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    out = decode_image(gif, "image 0")
    assert tuple(out[10, 10]) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left red, right blue, as stored
    pixels[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: left half ends on top
    jpeg = image_bytes(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(jpeg, "image 0").astype(int)
    assert out[2, 16, 0] > 200 and out[2, 16, 2] < 60
    assert out[29, 16, 2] > 200 and out[29, 16, 0] < 60


def test_empty_file_is_a_bad_image_naming_it() -> None:
    with pytest.raises(BadImage, match="image 3 .*empty"):
        decode_image(b"", "image 3 (part 'file' #3)")


def test_wrong_magic_bytes_is_a_bad_image() -> None:
    with pytest.raises(BadImage, match="image 1 is not a PNG, JPEG"):
        decode_image(b"GIF00" + b"\x00" * 100, "image 1")
    with pytest.raises(BadImage):
        decode_image(b"this is text, not an image at all", "image 1")


def test_truncated_png_is_a_bad_image() -> None:
    data = image_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(BadImage, match="image 2 could not be decoded"):
        decode_image(data[: len(data) // 2], "image 2")
    assert BadImage.status == 400


def test_truncated_jpeg_is_a_bad_image() -> None:
    data = image_bytes(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                       "JPEG")
    with pytest.raises(BadImage):
        decode_image(data[:300], "image 0")


def test_formats_outside_the_list_are_refused() -> None:
    with pytest.raises(BadImage, match="not a PNG, JPEG, BMP, GIF or WebP"):
        decode_image(image_bytes(Image.new("RGB", (32, 32)), "TIFF"), "image 0")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("size", [(100_000, 100_000), (8000, 6000), (2**31 - 1, 2)])
def test_decompression_bomb_is_refused_from_its_header(size: tuple[int, int]) -> None:
    # A few bytes that declare a huge image: refused before any pixel is decoded (no memory blow-up).
    bomb = raw_png(size[0], size[1], 8, 2, None)
    assert len(bomb) < 100 and size[0] * size[1] > MAX_PIXELS
    with pytest.raises(PayloadTooLarge, match="image 0 is too large"):
        decode_image(bomb, "image 0")
    assert PayloadTooLarge.status == 413


def test_b64_accepts_standard_urlsafe_unpadded_and_data_urls() -> None:
    data = image_bytes(Image.new("RGB", (32, 32), (9, 8, 7)))
    for text in (base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode().rstrip("="),
                 "data:image/png;base64," + base64.b64encode(data).decode()):
        assert tuple(decode_b64(text, "image 0")[0, 0]) == (9, 8, 7)


def test_b64_that_is_not_base64_is_a_bad_image() -> None:
    with pytest.raises(BadImage, match="image 4 .*not valid base64"):
        decode_b64("@@not base64!!", "image 4 (instances[4])")


def test_nested_list_of_the_right_shape_is_kept_as_floats() -> None:
    pixels = np.random.default_rng(3).uniform(0, 255, (32, 32, 3))
    out = nested_list_to_array(pixels.tolist(), "image 0", ["body", "instances", 0])
    assert out.dtype == np.float32 and out.shape == (32, 32, 3)
    np.testing.assert_allclose(out, pixels, rtol=1e-6)


@pytest.mark.parametrize("value, reason", [
    (np.zeros((32, 32, 4)).tolist(), "shape"),
    (np.zeros((28, 28)).tolist(), "shape"),
    ([[[0, 0, 0]] * 32] * 31 + [[[0, 0]] * 32], "ragged"),
    (np.full((32, 32, 3), 256).tolist(), "outside 0..255"),
    (np.full((32, 32, 3), -1).tolist(), "outside 0..255"),
    (np.full((32, 32, 3), "7").tolist(), "strings"),
    (np.full((32, 32, 3), True).tolist(), "booleans"),
    ([], "shape"),
])
def test_nested_list_not_32x32x3_numbers_0_255_is_invalid(value: list, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as info:
        nested_list_to_array(value, "image 5", ["body", "instances", 5])
    assert info.value.status == 422
    assert info.value.errors and info.value.errors[0]["loc"] == ["body", "instances", 5]
