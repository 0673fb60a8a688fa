"""``mmcontrast embed``: image or text embeddings to a ``.npy`` file with their paths or texts beside it."""

from __future__ import annotations

import argparse

from mmcontrast.cli.common import (
    emit_json,
    errors_list,
    load_for_eval,
    loader_options,
    model_arguments,
    require_dir,
    subcommand,
)
from mmcontrast.errors import UsageError


def _embed_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="folder of images, searched recursively")
    source.add_argument("--texts", metavar="FILE", help="texts to embed, one per line (blank lines left out; CLIP checkpoints)")
    p.add_argument("--output", required=True, metavar="emb.npy",
                   help="(N, d) float32; the N paths (or texts) go to emb.paths.txt (emb.texts.txt) beside it")
    model_arguments(p)
    p.add_argument("--no-normalize", action="store_true", help="keep raw features (default: L2-normalised)")


@subcommand("embed", "write image (or text) embeddings (N, d) to a .npy file and their paths (texts) beside it",
            _embed_arguments)
def _embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not args.output.endswith(".npy"):
        raise UsageError(f"--output {args.output}: name the embeddings file NAME.npy (paths go to NAME.paths.txt)")
    if args.texts is not None:
        return _embed_texts(args)
    require_dir(args.images, "--images")
    import numpy as np

    from mmcontrast import evaluate as ev

    paths = ev.discover_images(args.images)
    options = loader_options(args)
    model, preprocess, _ = load_for_eval(args, options)
    encoded = ev.encode_images(model, preprocess, paths, normalize=not args.no_normalize, desc="embed", **options)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, encoded.features.numpy().astype(np.float32))
    paths_file = out.with_name(out.name[: -len(".npy")] + ".paths.txt")
    paths_file.write_text("".join(f"{paths[i]}\n" for i in encoded.ok), encoding="utf-8")
    result = {"embeddings": str(out), "paths": str(paths_file), "n_images": len(paths), "n_embedded": len(encoded.ok),
              "dim": int(encoded.features.shape[1]) if encoded.ok else 0, "normalized": not args.no_normalize,
              "n_errors": len(encoded.errors), "errors": errors_list(encoded), "checkpoint": args.checkpoint,
              "precision": args.precision}
    return emit_json(result, None)


def _embed_texts(args: argparse.Namespace) -> int:
    """``embed --texts FILE``: one embedding per non-blank line, through the checkpoint's text tower."""
    from pathlib import Path

    if not Path(args.texts).is_file():
        raise UsageError(f"--texts {args.texts}: no such file (give a text file, one text per line)")
    texts = [line.strip() for line in Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UsageError(f"--texts {args.texts} holds no text; write one text per line")
    if args.no_normalize:
        raise UsageError("--no-normalize applies to images; text embeddings are always L2-normalised")
    import numpy as np

    from mmcontrast.evaluate import encode_texts

    options = loader_options(args)
    model, _, tokenizer = load_for_eval(args)
    if tokenizer is None or not hasattr(model, "encode_text"):
        raise UsageError(f"{args.checkpoint} is an image-only encoder; text embeddings need a CLIP checkpoint")
    features = encode_texts(model, tokenizer, texts, options["batch_size"])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, features.numpy().astype(np.float32))
    texts_file = out.with_name(out.name[: -len(".npy")] + ".texts.txt")
    texts_file.write_text("".join(f"{t}\n" for t in texts), encoding="utf-8")
    return emit_json({"embeddings": str(out), "texts": str(texts_file), "n_texts": len(texts),
                       "dim": int(features.shape[1]), "normalized": True, "checkpoint": args.checkpoint}, None)
