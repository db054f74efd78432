"""Images to model inputs, by the manifest: decode, check size, grayscale/RGB, resize, normalise.

Decoding is guarded: only the allowed formats, a pixel limit checked from the header before any
pixel is decoded (decompression bombs), and every Pillow failure turned into an ImageError.

A plain 8-bit PNG (grey, RGB, grey+alpha or RGBA, not interlaced, nothing but IHDR, IDAT and IEND
with good checksums: what Pillow, browsers and most tools write for a drawing) skips Pillow's
Python chunk reader: its pixel data goes straight to Pillow's own inflate-and-unfilter decoder.
Anything else, and any doubt, takes the general Pillow path, so the pixels are the same either way.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError
from .manifest import InputSpec

ALLOWED_FORMATS = ("PNG", "JPEG")
DEFAULT_MAX_PIXELS = 4096 * 4096


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PLAIN_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # colour type at 8 bits per sample -> mode
_CHUNK = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBBBBB")


def decode_plain_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | None:
    """Decode a plain 8-bit PNG (see the module's doc) within ``max_pixels``; None for anything else."""
    if len(data) < 57 or not data.startswith(PNG_SIGNATURE):  # signature, IHDR, one IDAT, IEND
        return None
    length, kind = _CHUNK.unpack_from(data, 8)
    if kind != b"IHDR" or length != 13:
        return None
    width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack_from(data, 16)
    mode = _PLAIN_PNG_MODES.get(colour)
    pixels = width * height
    bomb = Image.MAX_IMAGE_PIXELS
    if (
        mode is None
        or depth != 8
        or compression
        or filtering
        or interlace
        or not 0 < pixels <= max_pixels
        or (bomb is not None and pixels > bomb)
    ):
        return None
    view = memoryview(data)
    idat = []
    pos, end = 8, len(data)
    while True:  # IHDR (at 8), then IDAT..., then IEND, which ends the data
        if pos + 12 > end:
            return None
        length, kind = _CHUNK.unpack_from(data, pos)
        stop = pos + 8 + length
        if stop + 4 > end or zlib.crc32(view[pos + 4 : stop]) != int.from_bytes(view[stop : stop + 4], "big"):
            return None
        if kind == b"IDAT":
            idat.append(view[pos + 8 : stop])
        elif kind == b"IEND":
            if length or stop + 4 != end or not idat:
                return None
            break
        elif pos != 8:
            return None
        pos = stop + 4
    try:
        return Image.frombytes(mode, (width, height), b"".join(idat), "zip", mode)
    except Exception:  # truncated or corrupt: Pillow's own reader tells what is wrong
        return None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode PNG or JPEG bytes; raise ImageError (400, or 413 over the pixel limit)."""
    if not data:
        raise ImageError("the image is empty (0 bytes); send a PNG or JPEG image")
    plain = decode_plain_png(data, max_pixels)
    if plain is not None:
        return plain
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"the image is {width}x{height} = {width * height} pixels; at most {max_pixels} are allowed",
                    status=413,
                )
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"the image is too large to decode safely: {exc}", status=413) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"the body is not a readable image; allowed formats: {', '.join(ALLOWED_FORMATS)}") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"the image is corrupt or truncated: {exc}") from exc
    return img


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Put a transparent image on the background that keeps its strokes visible."""
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    gray = np.asarray(rgba.convert("L"), dtype=np.float32)
    ink = float((gray * alpha).sum() / max(alpha.sum(), 1e-6))
    background = (0, 0, 0, 255) if ink > 127 else (255, 255, 255, 255)
    canvas = Image.new("RGBA", rgba.size, background)
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def image_to_input(img: Image.Image, spec: InputSpec, *, dark_background: bool | None = None) -> np.ndarray:
    """Turn a decoded image into one normalised input of ``spec.shape`` (float32, NCHW).

    With ``dark_background`` (default: the manifest's ``spec.dark_background``; MNIST-like models,
    light strokes on black), an image whose border is mostly light is inverted, so a dark digit on
    white paper is read correctly. Other models take the pixels as they are.
    """
    if dark_background is None:
        dark_background = spec.dark_background
    channels, height, width = spec.shape
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        wide = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((wide >> 8).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = _flatten_alpha(img)
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    planes = np.asarray(img)  # uint8 [H, W] or [H, W, C]
    planes = planes[None] if planes.ndim == 2 else planes.transpose(2, 0, 1)  # -> [C, H, W]
    inverted = False
    if dark_background:
        border = np.concatenate(
            [planes[:, 0].ravel(), planes[:, -1].ravel(), planes[:, :, 0].ravel(), planes[:, :, -1].ravel()]
        )
        # mean > 127, in whole numbers: exactly the float32 mean's verdict while the sum stays below 2**24
        inverted = int(border.sum(dtype=np.int64)) > 127 * border.size
    table = _normalised_values(spec.scale, spec.mean, spec.std, inverted)
    x: np.ndarray = table[0][planes] if len(table) == 1 else table[np.arange(len(table))[:, None, None], planes]
    return x


@functools.lru_cache(maxsize=64)
def _normalised_values(scale: float, mean: tuple[float, ...], std: tuple[float, ...], inverted: bool) -> np.ndarray:
    """float32 [C, 256]: the input value of each pixel value in each channel, by the very float32
    operations the manifest's formula ``(p * scale - mean) / std`` (on ``255 - p`` when inverted)
    applies to a whole image, so looking it up gives the same bits as computing it."""
    pixels = np.arange(256, dtype=np.float32)[None, None, :]  # [1, 1, 256]: every value, as one image row
    if inverted:
        pixels = 255.0 - pixels
    mean_c = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std_c = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    table = ((pixels * np.float32(scale) - mean_c) / std_c).astype(np.float32, copy=False).reshape(len(mean), 256)
    table.flags.writeable = False
    return table


def images_to_batch(blobs: list[bytes], spec: InputSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode several images into one batch [N, *spec.shape]."""
    if spec.layout != "NCHW" or len(spec.shape) != 3:
        raise ImageError(f"this model takes {spec.layout} input {list(spec.shape)}, not images", status=415)
    inputs = [image_to_input(decode_image(b, max_pixels=max_pixels), spec) for b in blobs]
    return inputs[0][None] if len(inputs) == 1 else np.stack(inputs)
