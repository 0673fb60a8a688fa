"""Image augmentations for image-only contrastive learning (SimCLR's recipe), split for speed.

Owns the random view transform; the data pipeline applies it twice per image, in the dataloader
workers. Does not own CLIP's preprocessing, which comes from open_clip with the model.

SimCLR's views are RandomResizedCrop → flip → colour jitter (p=0.8; brightness, contrast, saturation
and hue in a random order) → grayscale (p=0.2) → Gaussian blur (p=0.5) → normalise. Done one image at
a time on PIL images (torchvision's ``ColorJitter``, what lightly and most SimCLR code run), the
colour steps cost several times the crop for small images: four PIL passes with format conversions,
each with Python overhead per image. ``SimclrTransform`` therefore works in two stages:

* ``sample(image)`` — per image: the crop and flip on the PIL image, then the image as a uint8 tensor,
  and a row of random parameters for everything else (drawn from torch's global RNG, which the
  loader seeds per sample, so a sample's views do not depend on its batch).
* ``finish(images, params)`` — per batch: the colour jitter, grayscale, blur and normalisation of a
  (B, 3, H, W) stack, vectorised across the batch with each image's own factors and jitter order.

The result equals torchvision's tensor implementation applied image by image with the same
parameters (``tests/test_augment.py`` checks it to 2e-5), at a fraction of the cost
(``bench/simclr_augment.py``). Calling the transform on one image runs both stages, so it is also an
ordinary ``PIL image -> tensor`` transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from mmcontrast.config import CROP_MODES

# Gaussian blur helps at ImageNet scale but destroys 32 px images (SimCLR drops it for CIFAR).
MIN_SIZE_FOR_BLUR = 64
BLUR_SIGMA = (0.1, 2.0)
FINISH_CHUNK_ELEMENTS = 1 << 20  # floats per slice of the batch in finish() (4 MiB): fewest op calls that stay cache-friendly


def view_transform(aug, image_size: int, mean: Sequence[float], std: Sequence[float]) -> SimclrTransform:
    """The view transform ``aug`` (a resolved ``config.AugmentConfig``: every field set) describes, at ``image_size``."""
    return SimclrTransform(image_size, mean, std, aug.crop_scale, aug.hflip, aug.color_jitter, aug.color_jitter_p,
                           aug.grayscale_p, aug.blur_p, aug.vflip, aug.rot90, aug.crop_mode, aug.crop_ratio,
                           Recompression(aug.downscale, aug.jpeg_quality, aug.recompress_p))


# columns of the per-image parameter row
_JITTER, _ORDER, _FACTORS, _GRAY, _BLUR, _SIGMA = 0, slice(1, 5), slice(5, 9), 9, 10, 11
N_PARAMS = 12
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


class SimclrTransform:
    """One random SimCLR view: PIL RGB image → (3, image_size, image_size) normalised float tensor.

    With a ``recompression`` (the copies preset): first a copy as collections hold them (``Recompression``). Then
    RandomResizedCrop(``crop_scale``, ``crop_ratio``, bicubic) — or, with ``crop_mode="fixed"``, a random ``image_size`` window of the
    image at its own scale, never resampled (reflected where the image is smaller) — → horizontal flip (``hflip``) → vertical flip (``vflip``) → a
    random multiple of 90° (``rot90``) → colour jitter
    (brightness, contrast, saturation, hue = ``color_jitter``, in a random order) with probability
    ``color_jitter_p`` → grayscale (``grayscale_p``) → Gaussian blur (kernel ≈ 10% of the side,
    σ ∈ [0.1, 2]) with probability ``blur_p``, off below 64 px → normalise with ``mean``/``std``.
    The data loader calls ``sample`` per image and ``finish`` per batch (see the module docstring).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        vflip: float = 0.0,
        rot90: bool = False,
        crop_mode: str = "resized",
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        recompression: Recompression | None = None,
    ):
        if crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        crop = (T.RandomResizedCrop(image_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio), interpolation=T.InterpolationMode.BICUBIC)
                if crop_mode == "resized" else T.RandomCrop(image_size, pad_if_needed=True, padding_mode="reflect"))
        self.geometry = T.Compose([
            *([recompression] if recompression is not None and recompression.p > 0 else []),
            crop,
            T.RandomHorizontalFlip(p=hflip),
            T.RandomVerticalFlip(p=vflip),
            *([_RandomQuarterTurns()] if rot90 else []),
        ])  # fmt: skip
        b, c, s, h = color_jitter
        # the factor ranges of torchvision's ColorJitter(b, c, s, h)
        self.ranges = torch.tensor([[max(0.0, 1 - b), 1 + b], [max(0.0, 1 - c), 1 + c], [max(0.0, 1 - s), 1 + s], [-h, h]])
        self.color_jitter_p, self.grayscale_p = color_jitter_p, grayscale_p
        self.blur_p = blur_p if image_size >= MIN_SIZE_FOR_BLUR else 0.0
        self.blur_kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)

    # -- per image

    def sample(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 (3, S, S) crop, float (N_PARAMS,) parameters) for one view; draws from torch's global RNG."""
        crop = TF.pil_to_tensor(self.geometry(_to_rgb(image)))
        u = torch.rand(8)  # one draw for the coins and factors, one for the jitter order
        factors = self.ranges[:, 0] + u[1:5] * (self.ranges[:, 1] - self.ranges[:, 0])
        coins = torch.stack([u[0] < self.color_jitter_p, u[5] < self.grayscale_p, u[6] < self.blur_p]).float()
        sigma = BLUR_SIGMA[0] + u[7:8] * (BLUR_SIGMA[1] - BLUR_SIGMA[0])
        p = torch.cat([coins[:1], torch.randperm(4).float(), factors, coins[1:], sigma])  # the column layout above
        return crop, p

    # -- per batch

    def finish(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) and (B, N_PARAMS) → normalised float (B, 3, S, S), every image with its own parameters."""
        out = torch.empty(images.shape, dtype=torch.float32)
        step = max(1, FINISH_CHUNK_ELEMENTS // max(1, images[0].numel()))  # a cache-sized slice of the batch at a time
        for start in range(0, images.shape[0], step):
            out[start : start + step] = self._finish(images[start : start + step], params[start : start + step])
        return out

    def _finish(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255)
        jitter = params[:, _JITTER] > 0
        order = params[:, _ORDER].long()
        factors = params[:, _FACTORS]
        for slot in range(4):  # torchvision applies the four adjustments in a random order per image
            for op, adjust in enumerate((_brightness, _contrast, _saturation, _hue)):
                idx = torch.nonzero(jitter & (order[:, slot] == op)).flatten()
                if len(idx):
                    x[idx] = adjust(x[idx], factors[idx, op].view(-1, 1, 1, 1))
        gray = torch.nonzero(params[:, _GRAY] > 0).flatten()
        if len(gray):
            x[gray] = _grey(x[gray]).expand(-1, 3, -1, -1)
        blur = torch.nonzero(params[:, _BLUR] > 0).flatten()
        if len(blur):
            x[blur] = _gaussian_blur(x[blur], self.blur_kernel, params[blur, _SIGMA])
        return (x - self.mean) / self.std

    def __call__(self, image) -> torch.Tensor:
        crop, p = self.sample(image)
        return self.finish(crop[None], p[None])[0]

    def __repr__(self) -> str:
        return (f"SimclrTransform(size={self.image_size}, {self.geometry}, jitter ranges={self.ranges.tolist()} "
                f"p={self.color_jitter_p}, grayscale p={self.grayscale_p}, blur p={self.blur_p})")  # fmt: skip


# SimCLR's view transform with these settings: the name the trainer and diagnostics build it by.
simclr_transform = SimclrTransform


# ---------------------------------------------------------------- batched adjustments, torchvision's formulas
# x: float (n, 3, H, W) in [0, 1]; f: (n, 1, 1, 1) per-image factors.


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (_GREY_WEIGHTS[0] * r + _GREY_WEIGHTS[1] * g + _GREY_WEIGHTS[2] * b).unsqueeze(1)  # (n, 1, H, W)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1.0 - f) * b).clamp_(0, 1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), f)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _grey(x), f)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by f (in turns): Pillow's RGB→HSV (as torchvision), then HSV→RGB in closed form."""
    r, g, b = x.unbind(dim=1)
    v, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = v - minc
    flat = chroma == 0  # grey pixels: hue and saturation 0, no division by zero
    safe = torch.where(flat, torch.ones_like(chroma), chroma)
    s = chroma / torch.where(flat, torch.ones_like(v), v)
    rc, gc, bc = (v - r) / safe, (v - g) / safe, (v - b) / safe
    is_r, is_g = v == r, (v == g) & (v != r)
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h6 = torch.remainder(torch.fmod(h / 6.0 + 1.0, 1.0) + f[:, 0], 1.0) * 6.0  # hue in sextants, [0, 6)
    # HSV → RGB: channel = v − v·s·clamp(min(k, 4 − k), 0, 1), k = (offset + 6h) mod 6, offsets 5, 3, 1 for R, G, B
    vs = v * s
    out = []
    for offset in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + offset, 6.0)
        out.append(v - vs * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(out, dim=1).clamp_(0, 1)


def _gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with per-image σ (n,), reflect padding: torchvision's ``gaussian_blur``."""
    n, c, height, width = x.shape
    half = (kernel - 1) * 0.5
    grid = torch.linspace(-half, half, kernel)
    weights = torch.exp(-0.5 * (grid[None] / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n·c, k)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, height, width), [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, weights[:, None, None, :], groups=n * c)  # along the width
    y = F.conv2d(y, weights[:, None, :, None], groups=n * c)  # along the height
    return y.reshape(n, c, height, width)


class Recompression:
    """A copy of a PIL image as collections hold them: with probability ``p`` shrunk by a factor in ``downscale`` and
    blown up again (bilinear), and independently with probability ``p`` re-encoded as a JPEG of a quality in
    ``jpeg_quality`` (``dedup.plant_copy``'s kinds). Draws from torch's RNG like the other steps."""

    def __init__(self, downscale: Sequence[float], jpeg_quality: Sequence[int], p: float):
        self.downscale, self.jpeg_quality, self.p = tuple(downscale), tuple(int(q) for q in jpeg_quality), p

    def __call__(self, image):
        import io

        from PIL import Image

        u = torch.rand(4).tolist()
        if u[0] < self.p:
            f = self.downscale[0] + u[1] * (self.downscale[1] - self.downscale[0])
            w, h = image.size
            image = image.resize((max(8, round(w * f)), max(8, round(h * f))), Image.BILINEAR).resize((w, h), Image.BILINEAR)
        if u[2] < self.p:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=self.jpeg_quality[0] + round(u[3] * (self.jpeg_quality[1] - self.jpeg_quality[0])))
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return image

    def __repr__(self) -> str:
        return f"Recompression(downscale={self.downscale}, jpeg_quality={self.jpeg_quality}, p={self.p})"


class _RandomQuarterTurns:
    """Rotate a PIL image by 0, 90, 180 or 270 degrees, drawn from torch's RNG like the other steps (exact: no resampling)."""

    _TURNS = (None, "ROTATE_90", "ROTATE_180", "ROTATE_270")

    def __call__(self, image):
        k = int(torch.randint(4, ()))
        if k == 0:
            return image
        from PIL import Image

        return image.transpose(getattr(Image.Transpose, self._TURNS[k]))

    def __repr__(self) -> str:
        return "RandomQuarterTurns()"


def _to_rgb(image):
    return image.convert("RGB") if image.mode != "RGB" else image
