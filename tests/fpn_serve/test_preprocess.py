from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fpn_serve.contract.images import decode_image, image_to_input, images_to_batch
from fpn_serve.contract.manifest import InputSpec
from fpn_serve.errors import ImageError

SPEC = InputSpec(
    shape=(1, 28, 28),
    dtype="float32",
    layout="NCHW",
    scale=1 / 255,
    mean=(0.1307,),
    std=(0.3081,),
    dark_background=True,
)


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _digit(background: int, ink: int, size: int = 28) -> Image.Image:
    arr = np.full((size, size), background, np.uint8)
    arr[size // 4 : 3 * size // 4, size // 2 - 1 : size // 2 + 2] = ink  # a vertical stroke: a "1"
    return Image.fromarray(arr)


def test_pixels_are_normalised_by_the_manifest() -> None:
    x = image_to_input(_digit(0, 255), SPEC)
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    assert x.min() == pytest.approx((0 - 0.1307) / 0.3081)
    assert x.max() == pytest.approx((1 - 0.1307) / 0.3081)


def test_dark_ink_on_white_paper_is_inverted_to_mnist_polarity() -> None:
    light = image_to_input(_digit(255, 0), SPEC)
    dark = image_to_input(_digit(0, 255), SPEC)
    np.testing.assert_allclose(light, dark, atol=1e-6)


def test_transparent_drawings_and_jpeg_and_resizing() -> None:
    rgba = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (130, 70, 150, 210))  # black stroke on a transparent canvas
    batch = images_to_batch([_encode(rgba), _encode(_digit(0, 255, 56).convert("RGB"), "JPEG")], SPEC)
    assert batch.shape == (2, 1, 28, 28)
    for x in batch:  # both read as a bright stroke on a dark background
        assert x[0, 14, 14] > 1.5 and x[0, 1, 1] < 0


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "empty"),
        (b"GIF89a not allowed", 400, "allowed formats: PNG, JPEG"),
        (_encode(Image.new("1", (5000, 5000))), 413, "at most"),
    ],
)
def test_undecodable_or_oversized_images_are_refused(data: bytes, status: int, message: str) -> None:
    with pytest.raises(ImageError, match=message) as info:
        decode_image(data)
    assert info.value.status == status


def test_a_gif_is_not_an_allowed_format() -> None:
    with pytest.raises(ImageError, match="PNG, JPEG"):
        decode_image(_encode(_digit(0, 255), "GIF"))


def test_sixteen_bit_grayscale_reads_like_eight_bit() -> None:
    eight = np.asarray(_digit(0, 255))
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)  # full 16-bit range, mode I;16
    assert sixteen.mode.startswith("I")
    np.testing.assert_allclose(
        image_to_input(decode_image(_encode(sixteen)), SPEC), image_to_input(_digit(0, 255), SPEC)
    )


def _reference_input(img: Image.Image, spec: InputSpec, dark_background: bool) -> np.ndarray:
    """The normalisation written out plainly in float32 (as image_to_input did it before its lookup table)."""
    channels, height, width = spec.shape
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if dark_background:
        border = np.concatenate(
            [pixels[:, 0].ravel(), pixels[:, -1].ravel(), pixels[:, :, 0].ravel(), pixels[:, :, -1].ravel()]
        )
        if border.mean() > 127:
            pixels = 255.0 - pixels
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((pixels * np.float32(spec.scale) - mean) / std).astype(np.float32)


@settings(max_examples=300, deadline=None)
@given(
    channels=st.sampled_from([1, 3]),
    side=st.integers(2, 40),
    size=st.tuples(st.integers(1, 50), st.integers(1, 50)),
    seed=st.integers(0, 2**32 - 1),
    level=st.one_of(st.none(), st.integers(120, 135)),
    numbers=st.tuples(st.floats(1e-3, 2.0), st.floats(-2.0, 2.0), st.floats(1e-2, 3.0)),
    dark_background=st.booleans(),
)
def test_the_lookup_table_gives_the_formulas_bits(
    channels: int,
    side: int,
    size: tuple[int, int],
    seed: int,
    level: int | None,
    numbers: tuple[float, float, float],
    dark_background: bool,
) -> None:
    scale, mean, std = numbers
    spec = InputSpec(
        shape=(channels, side, side),
        dtype="float32",
        layout="NCHW",
        scale=scale,
        mean=tuple(mean + 0.1 * c for c in range(channels)),
        std=tuple(std * (1 + 0.2 * c) for c in range(channels)),
    )
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if channels == 3 else (size[1], size[0])
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    if level is not None:  # a border right at the inversion threshold
        arr[...] = np.clip(level + rng.integers(-1, 2, shape), 0, 255)
    img = Image.fromarray(arr)
    got = image_to_input(img, spec, dark_background=dark_background)
    want = _reference_input(img, spec, dark_background)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
