"""Image augmentations for image-only contrastive learning (SimCLR's recipe).

Owns the random view transform; the data pipeline applies it twice per image, in the dataloader
workers. Does not own CLIP's preprocessing, which comes from open_clip with the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torchvision import transforms as T

# Gaussian blur helps at ImageNet scale but destroys 32 px images (SimCLR drops it for CIFAR).
MIN_SIZE_FOR_BLUR = 64


def simclr_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
    color_jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
) -> Callable:
    """One random SimCLR view: PIL RGB image → (3, image_size, image_size) normalised tensor.

    RandomResizedCrop(scale) → horizontal flip → colour jitter (brightness, contrast, saturation,
    hue) with probability ``color_jitter_p`` → grayscale → Gaussian blur (kernel ≈ 10% of the
    side, σ ∈ [0.1, 2]) with probability ``blur_p``, off below 64 px.
    """
    steps = [
        T.Lambda(_to_rgb),
        T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=hflip),
        T.RandomApply([T.ColorJitter(*color_jitter)], p=color_jitter_p),
        T.RandomGrayscale(p=grayscale_p),
    ]
    if blur_p > 0 and image_size >= MIN_SIZE_FOR_BLUR:
        kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _to_rgb(image):
    return image.convert("RGB") if image.mode != "RGB" else image
