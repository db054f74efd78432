"""The plain-PNG decoder against Pillow: the same pixels for every PNG it takes, None for the rest,
and through ``decode_image`` the same answer or the same error as Pillow's own reader.

The PNGs are written here by a small encoder that chooses each row's filter (all five types),
the colour type and bit depth, Adam7 interlacing, how the data is split into IDAT chunks and which
extra chunks come along, so that every variant is covered, not only what Pillow's writer makes.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fpn_serve.contract import images as preprocess
from fpn_serve.contract.images import PNG_SIGNATURE, decode_image, decode_plain_png, image_to_input
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
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _filter_row(raw: np.ndarray, prior: np.ndarray, kind: int, bpp: int) -> bytes:
    """One scanline filtered with PNG filter ``kind`` (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth)."""
    x = raw.astype(np.int32)
    b = prior.astype(np.int32)
    a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
    c = np.concatenate([np.zeros(bpp, np.int32), b[:-bpp]])
    predictor = [np.zeros_like(x), a, b, (a + b) // 2, _paeth(a, b, c)][kind]
    return bytes([kind]) + ((x - predictor) % 256).astype(np.uint8).tobytes()


def _scanlines(samples: np.ndarray, depth: int) -> list[np.ndarray]:
    """Rows of ``samples`` [h, w, channels] packed as PNG bytes at ``depth`` bits per sample."""
    rows = []
    for y in range(samples.shape[0]):
        flat = samples[y].reshape(-1)
        if depth == 16:
            rows.append(flat.astype(">u2").view(np.uint8))
        elif depth == 8:
            rows.append(flat.astype(np.uint8))
        else:
            bits = np.unpackbits(flat.astype(np.uint8)[:, None], axis=1)[:, 8 - depth :].reshape(-1)
            rows.append(np.packbits(bits))
    return rows


def encode_png(
    samples: np.ndarray,
    colour: int,
    depth: int,
    filters: list[int],
    *,
    interlace: bool = False,
    split: int = 0,
    before_idat: tuple[tuple[bytes, bytes], ...] = (),
    level: int = 6,
) -> bytes:
    """A PNG of ``samples`` [h, w, channels] (already within ``depth`` bits), row filters cycling
    through ``filters``, the zlib stream cut into IDATs of ``split`` bytes (0: one IDAT)."""
    h, w, ch = samples.shape
    bpp = max(1, ch * depth // 8)
    passes = [samples] if not interlace else [samples[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
    raw, k = b"", 0
    for image in passes:
        if image.shape[0] == 0 or image.shape[1] == 0:
            continue
        lines = _scanlines(image, depth)
        prior = np.zeros_like(lines[0])
        for line in lines:
            raw += _filter_row(line, prior, filters[k % len(filters)], bpp)
            prior, k = line, k + 1
    stream = zlib.compress(raw, level)
    pieces = [stream[i : i + split] for i in range(0, len(stream), split)] if split else [stream]
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, int(interlace))
    out = PNG_SIGNATURE + chunk(b"IHDR", ihdr)
    for kind, data in before_idat:
        out += chunk(kind, data)
    for piece in pieces:
        out += chunk(b"IDAT", piece)
    return out + chunk(b"IEND", b"")


@st.composite
def pngs(draw: Any, plain_only: bool = False) -> tuple[bytes, bool]:
    """(PNG bytes, whether it is plain: 8-bit grey/RGB/grey+alpha/RGBA, not interlaced, no extra chunks)."""
    colour = draw(st.sampled_from([0, 2, 4, 6] if plain_only else [0, 2, 3, 4, 6]))
    depth = 8 if plain_only else draw(st.sampled_from(DEPTHS[colour]))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    top = (1 << depth) - 1
    seed = draw(st.integers(0, 2**32 - 1))
    samples = np.random.default_rng(seed).integers(0, top + 1, (h, w, CHANNELS[colour]), dtype=np.int64)
    if draw(st.booleans()):  # smooth images too, where Sub/Up/Paeth predict well
        samples = (np.add.outer(np.arange(h), np.arange(w))[..., None] * (top // 40 + 1) + samples // 8) % (top + 1)
    filters = draw(st.lists(st.integers(0, 4), min_size=1, max_size=6))
    interlace = False if plain_only else draw(st.booleans())
    extra: list[tuple[bytes, bytes]] = []
    if colour == 3:
        extra.append((b"PLTE", bytes(range(256)) * 3))
    if not plain_only and draw(st.booleans()):
        extra.append(
            draw(
                st.sampled_from(
                    [
                        (b"gAMA", struct.pack(">I", 45455)),
                        (b"tEXt", b"Comment\0drawn by a test"),
                        (b"pHYs", struct.pack(">IIB", 2835, 2835, 1)),
                    ]
                    + ([(b"tRNS", {0: b"\0\0", 2: b"\0" * 6, 3: b"\0"}[colour])] if colour in (0, 2, 3) else [])
                )
            )
        )
    split = draw(st.sampled_from([0, 0, 1, 7, 64]))
    data = encode_png(
        samples.astype(np.uint16),
        colour,
        depth,
        filters,
        interlace=interlace,
        split=split,
        before_idat=tuple(extra),
        level=draw(st.integers(0, 9)),
    )
    plain = depth == 8 and colour in (0, 2, 4, 6) and not interlace and not any(k != b"PLTE" for k, _ in extra)
    return data, plain


def _pillow(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _same_image(a: Image.Image, b: Image.Image) -> None:
    assert (a.mode, a.size) == (b.mode, b.size)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_encoder_writes_what_pillow_reads() -> None:
    samples = np.random.default_rng(1).integers(0, 256, (9, 13, 3))
    for filt in range(5):
        for interlace in (False, True):
            data = encode_png(samples, 2, 8, [filt], interlace=interlace)
            np.testing.assert_array_equal(np.asarray(_pillow(data)), samples)


@EXAMPLES
@given(png=pngs())
def test_plain_pngs_decode_to_pillows_pixels_and_the_rest_fall_back(png: tuple[bytes, bool]) -> None:
    data, plain = png
    fast = decode_plain_png(data)
    assert (fast is not None) == plain
    reference = _pillow(data)
    if fast is not None:
        _same_image(fast, reference)
    _same_image(decode_image(data), reference)
    np.testing.assert_array_equal(image_to_input(decode_image(data), SPEC), image_to_input(reference, SPEC))


def test_every_filter_type_alone_and_mixed() -> None:
    rng = np.random.default_rng(2)
    for colour in (0, 2, 4, 6):
        samples = rng.integers(0, 256, (17, 23, CHANNELS[colour]))
        for filters in ([0], [1], [2], [3], [4], [0, 1, 2, 3, 4], [4, 3, 2, 1]):
            data = encode_png(samples, colour, 8, filters)
            fast = decode_plain_png(data)
            assert fast is not None
            _same_image(fast, _pillow(data))


def _mutations(data: bytes, rng: np.random.Generator) -> list[bytes]:
    """Damaged variants: some with their checksums repaired, so that they reach the pixel decoder."""
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length

    def build(parts: list[tuple[bytes, bytes]]) -> bytes:
        return PNG_SIGNATURE + b"".join(chunk(k, d) for k, d in parts)

    out = []
    for _ in range(6):
        i = int(rng.integers(0, len(data)))
        out.append(data[:i] + bytes([data[i] ^ int(rng.integers(1, 256))]) + data[i + 1 :])  # bad checksum
        out.append(data[: int(rng.integers(0, len(data)))])  # truncated
    idat = next(i for i, (k, _) in enumerate(chunks) if k == b"IDAT")
    kind, payload = chunks[idat]
    for _ in range(6):  # damaged pixel data with a good checksum
        j = int(rng.integers(0, len(payload)))
        broken = payload[:j] + bytes([payload[j] ^ int(rng.integers(1, 256))]) + payload[j + 1 :]
        out.append(build([*chunks[:idat], (kind, broken), *chunks[idat + 1 :]]))
        out.append(build([*chunks[:idat], (kind, payload[:j]), *chunks[idat + 1 :]]))
    out.append(build([*chunks[:idat], (kind, payload + b"trailing"), *chunks[idat + 1 :]]))
    out.append(build([*chunks[:idat], (kind, payload), (kind, payload), *chunks[idat + 1 :]]))
    out.append(build([c for c in chunks if c[0] != b"IEND"]))
    out.append(build(chunks) + b"after the end")
    w, h, depth, colour, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
    for fields in [
        (w + 1, h, depth, colour, comp, filt, inter),
        (w, max(h - 1, 0), depth, colour, comp, filt, inter),
        (0, h, depth, colour, comp, filt, inter),
        (w, h, depth, colour, 1, filt, inter),
        (w, h, depth, colour, comp, 1, inter),
        (w, h, depth, 5, comp, filt, inter),
        (w, h, 7, colour, comp, filt, inter),
        (100_000, 100_000, depth, colour, comp, filt, inter),
    ]:
        out.append(build([(b"IHDR", struct.pack(">IIBBBBB", *fields)), *chunks[1:]]))
    return out


def _outcome(data: bytes) -> tuple[str, Any]:
    try:
        img = decode_image(data, max_pixels=64 * 64)
    except ImageError as exc:
        return "error", (exc.status, str(exc))
    return "image", (img.mode, img.size, np.asarray(img).tobytes())


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(png=pngs(plain_only=True), seed=st.integers(0, 2**32 - 1))
def test_damaged_pngs_get_the_same_answer_or_error_as_pillow_alone(
    png: tuple[bytes, bool], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    for data in _mutations(png[0], np.random.default_rng(seed)):
        with_fast_path = _outcome(data)
        with monkeypatch.context() as m:
            m.setattr(preprocess, "decode_plain_png", lambda *a, **k: None)
            pillow_only = _outcome(data)
        assert with_fast_path == pillow_only


def test_the_pixel_limit_is_checked_before_decoding() -> None:
    data = encode_png(np.zeros((50, 60, 1), np.uint8), 0, 8, [0])
    assert decode_plain_png(data, max_pixels=50 * 60) is not None
    assert decode_plain_png(data, max_pixels=50 * 60 - 1) is None
    with pytest.raises(ImageError, match="at most 2999") as info:
        decode_image(data, max_pixels=50 * 60 - 1)
    assert info.value.status == 413
