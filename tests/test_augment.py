"""SimCLR views: the batched colour stage equals torchvision's, image by image, with the same parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from mmcontrast.augment import _FACTORS, _ORDER, N_PARAMS, simclr_transform

MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def reference(crop: torch.Tensor, p: torch.Tensor, blur_kernel: int) -> torch.Tensor:
    """torchvision's tensor functions, one image, in SimCLR's order, with the parameters in row ``p``."""
    x = crop.float() / 255
    if p[0] > 0:
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        factors = p[_FACTORS].tolist()
        for op in p[_ORDER].long().tolist():
            x = adjust[op](x, factors[op])
    if p[9] > 0:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p[10] > 0:
        x = TF.gaussian_blur(x, [blur_kernel, blur_kernel], [float(p[11])] * 2)
    return TF.normalize(x, MEAN, STD)


def photo(seed: int, size: int) -> Image.Image:
    """A smooth colourful image with some flat grey areas (hue undefined there) and saturated corners."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)), xx * yy], axis=-1)
    rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min())
    rgb[: size // 4, : size // 4] = 0.5  # grey
    rgb[-size // 8 :, -size // 8 :] = [1.0, 0.0, 0.0]  # pure red
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.mark.parametrize("size,blur_p", [(32, 0.5), (96, 0.5)])
def test_batched_views_equal_torchvision_image_by_image(size, blur_p):
    transform = simclr_transform(size, MEAN, STD, blur_p=blur_p, color_jitter_p=0.8, grayscale_p=0.3)
    torch.manual_seed(0)
    samples = [transform.sample(photo(i, size + 7)) for i in range(48)]
    crops, params = torch.stack([c for c, _ in samples]), torch.stack([p for _, p in samples])
    assert crops.dtype == torch.uint8 and crops.shape == (48, 3, size, size) and params.shape == (48, N_PARAMS)
    # every path is exercised: jitter on and off, all 24 orders possible, grey, blur only at >= 64 px
    assert 0 < params[:, 0].sum() < 48 and 0 < params[:, 9].sum() < 48
    assert (params[:, 10].sum() > 0) == (size >= 64)
    batch = transform.finish(crops, params)
    for i in range(48):
        want = reference(crops[i], params[i], transform.blur_kernel)
        torch.testing.assert_close(batch[i], want, rtol=0, atol=2e-5, msg=f"image {i}, params {params[i].tolist()}")


def test_factor_draws_cover_torchvision_ranges():
    transform = simclr_transform(32, MEAN, STD, color_jitter=(0.4, 0.3, 0.2, 0.1))
    torch.manual_seed(1)
    image = photo(0, 40)
    params = torch.stack([transform.sample(image)[1] for _ in range(2000)])
    factors = params[:, _FACTORS]
    lo, hi = torch.tensor([0.6, 0.7, 0.8, -0.1]), torch.tensor([1.4, 1.3, 1.2, 0.1])
    assert (factors >= lo).all() and (factors <= hi).all()
    assert ((factors - lo) < 0.02).any(dim=0).all() and ((hi - factors) < 0.02).any(dim=0).all()  # the whole range
    assert params[:, 0].mean() == pytest.approx(0.8, abs=0.04)  # colour_jitter_p
    assert params[:, 9].mean() == pytest.approx(0.2, abs=0.04)  # grayscale_p
    orders = {tuple(row) for row in params[:, _ORDER].long().tolist()}
    assert len(orders) == 24 and all(sorted(o) == [0, 1, 2, 3] for o in orders)


def test_one_image_call_is_both_stages():
    transform = simclr_transform(32, MEAN, STD, blur_p=0.0)
    image = photo(3, 40)
    torch.manual_seed(5)
    one = transform(image)
    torch.manual_seed(5)
    crop, p = transform.sample(image)
    torch.testing.assert_close(one, transform.finish(crop[None], p[None])[0], rtol=0, atol=0)
    assert one.shape == (3, 32, 32) and one.dtype == torch.float32


def test_quarter_turns_and_vertical_flips_are_exact_and_all_drawn():
    """``rot90`` and ``vflip`` (the overhead preset) move pixels without resampling: every view of a
    full-size crop is one of the image's 8 symmetries, and all 8 are drawn."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    transform = simclr_transform(32, MEAN, STD, crop_scale=(1.0, 1.0), hflip=0.5, vflip=0.5, rot90=True,
                                 color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    base = torch.from_numpy(pixels).permute(2, 0, 1)
    symmetries = [torch.rot90(flipped, k, dims=(1, 2)) for flipped in (base, base.flip(2)) for k in range(4)]
    seen = set()
    torch.manual_seed(0)
    for _ in range(200):
        crop, _ = transform.sample(image)
        matches = [i for i, s in enumerate(symmetries) if torch.equal(crop, s)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))


def test_presets_fill_what_the_config_leaves_unset_and_explicit_fields_win():
    from mmcontrast.config import AUGMENT_PRESETS as PRESETS
    from mmcontrast.config import AugmentConfig, UsageError, resolve_augment

    texture = AugmentConfig(preset="texture")
    resolve_augment(texture)
    assert {k: getattr(texture, k) for k in PRESETS["texture"]} == PRESETS["texture"]
    assert texture.rot90 is False and texture.color_jitter[2:] == [0.0, 0.0] and texture.grayscale_p == 0.0
    mine = AugmentConfig(preset="overhead", crop_scale=[0.5, 1.0], blur_p=0.0)
    resolve_augment(mine)
    assert mine.crop_scale == [0.5, 1.0] and mine.blur_p == 0.0 and mine.vflip == PRESETS["overhead"]["vflip"]
    with pytest.raises(UsageError, match="preset must be one of natural, texture, overhead"):
        resolve_augment(AugmentConfig(preset="satellite"))
    with pytest.raises(UsageError, match="crop_scale must be"):
        resolve_augment(AugmentConfig(crop_scale=[0.9, 0.2]))
