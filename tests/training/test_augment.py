"""Training-time augmentation: each transform does what its flag says, image by image."""

from __future__ import annotations

import torch

from training.augment import random_affine, random_flip, random_shift


def _images(n: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(1, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen)


def test_flip_mirrors_some_images_exactly_and_leaves_the_rest() -> None:
    images = _images()
    out = random_flip(images, torch.Generator().manual_seed(1))
    flipped = (out == images.flip(3)).flatten(1).all(1)
    same = (out == images).flatten(1).all(1)
    assert bool((flipped | same).all())
    assert 10 < int(flipped.sum()) < 54  # about half of 64


def test_shift_is_a_random_crop_of_the_zero_padded_image() -> None:
    images = _images()
    out = random_shift(images, 2, torch.Generator().manual_seed(2))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(len(images)):  # every output is one of the 25 crops of its own padded image
        crops = [padded[i, :, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(bool((out[i] == c).all()) for c in crops)
    assert not bool((out == images).all())


def test_no_augmentation_returns_the_images_unchanged() -> None:
    images = _images()
    gen = torch.Generator().manual_seed(3)
    assert random_shift(images, 0, gen) is images
    assert random_affine(images, 0.0, 0.0, gen) is images
