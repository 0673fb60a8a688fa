"""The zero-shot script one writes with open_clip alone: the baseline of ``bench/zeroshot_throughput.py --whole-process``.

    python bench/plain_open_clip_zero_shot.py RUN_DIR IMAGE_DIR red,green,blue OUT.csv

Loads a run dir through open_clip's ``local-dir:`` (the model, its preprocess and tokenizer), averages the prompt
embeddings of mmcontrast's default templates per label, then decodes every image under IMAGE_DIR in this process (PIL +
open_clip's preprocess), encodes batches of 128 in fp32 under ``torch.no_grad`` and writes ``path,label,score``.
"""

import sys
from pathlib import Path

import open_clip
import torch
from PIL import Image

TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.",
             "a close-up photo of a {}.", "a good photo of a {}."]
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def main(run: str, folder: str, labels: list[str], out: str) -> None:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run}")
    model.eval()
    rows = []
    with torch.no_grad():
        text = model.encode_text(tokenizer([t.format(label) for label in labels for t in TEMPLATES]))
        text = torch.nn.functional.normalize(text, dim=-1).view(len(labels), len(TEMPLATES), -1).mean(dim=1)
        classes = torch.nn.functional.normalize(text, dim=-1)
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in EXTENSIONS)
        for start in range(0, len(paths), 128):
            batch = paths[start:start + 128]
            images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in batch])
            features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
            score, top = (model.logit_scale.exp() * features @ classes.T).softmax(dim=-1).max(dim=1)
            rows += [f"{p},{labels[i]},{s:.6f}" for p, i, s in zip(batch, top.tolist(), score.tolist())]
    Path(out).write_text("path,label,score\n" + "\n".join(rows) + "\n")
    print(f"{len(rows)} images")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4])
