"""Images to model inputs, by the manifest: decode, check size, grayscale/RGB, resize, normalise.

Decoding is guarded: only the allowed formats, a pixel limit checked from the header before any
pixel is decoded (decompression bombs), and every Pillow failure turned into an ImageError.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError
from .manifest import InputSpec

ALLOWED_FORMATS = ("PNG", "JPEG")
DEFAULT_MAX_PIXELS = 4096 * 4096


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode PNG or JPEG bytes; raise ImageError (400, or 413 over the pixel limit)."""
    if not data:
        raise ImageError("the image is empty (0 bytes); send a PNG or JPEG image")
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


def image_to_input(img: Image.Image, spec: InputSpec, *, dark_background: bool = True) -> np.ndarray:
    """Turn a decoded image into one normalised input of ``spec.shape`` (float32, NCHW).

    With ``dark_background`` (MNIST-like models: light strokes on black), an image whose border
    is mostly light is inverted, so a dark digit on white paper is read correctly.
    """
    channels, height, width = spec.shape
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        wide = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((wide >> 8).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = _flatten_alpha(img)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # -> [C, H, W]
    if dark_background:
        border = np.concatenate(
            [pixels[:, 0].ravel(), pixels[:, -1].ravel(), pixels[:, :, 0].ravel(), pixels[:, :, -1].ravel()]
        )
        if border.mean() > 127:
            pixels = 255.0 - pixels
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((pixels * np.float32(spec.scale) - mean) / std).astype(np.float32)


def images_to_batch(blobs: list[bytes], spec: InputSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode several images into one batch [N, *spec.shape]."""
    if spec.layout != "NCHW" or len(spec.shape) != 3:
        raise ImageError(f"this model takes {spec.layout} input {list(spec.shape)}, not images", status=415)
    return np.stack([image_to_input(decode_image(b, max_pixels=max_pixels), spec) for b in blobs])
