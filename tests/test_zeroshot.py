"""ZeroShotClassifier and template sets: accuracy of a trained tiny CLIP, open_clip parity, user errors."""

from __future__ import annotations

import open_clip
import pytest
import torch

from mmcontrast import UsageError
from mmcontrast.evaluate import discover_images, folder_names, match_labels, prompt_name
from mmcontrast.loading import load
from mmcontrast.zeroshot import (
    DEFAULT_TEMPLATES,
    OPENAI_TEMPLATES,
    ZeroShotClassifier,
    check_labels,
    load_templates,
)


@pytest.fixture(scope="module")
def tiny(trained_tiny_clip):
    model, preprocess, tokenizer = load(trained_tiny_clip.run_dir)
    return model, preprocess, tokenizer


def test_trained_tiny_clip_is_far_above_chance_zero_shot(trained_tiny_clip, tiny):
    model, preprocess, tokenizer = tiny
    labels = trained_tiny_clip.classes
    clf = ZeroShotClassifier(model, tokenizer, [prompt_name(c) for c in labels], "default", preprocess=preprocess)
    paths = discover_images(trained_tiny_clip.test_dir)
    targets = torch.tensor(match_labels(folder_names(trained_tiny_clip.test_dir, paths), labels))
    from PIL import Image

    probs = clf.predict([Image.open(p) for p in paths])  # (40, 4)
    assert probs.shape == (len(paths), 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(paths)))
    top1 = (probs.argmax(dim=1) == targets).float().mean().item()
    assert top1 >= 0.9, f"top-1 {top1} (chance 0.25)"
    best = clf.top_k(probs[:1], k=2)[0]
    assert len(best) == 2 and best[0][1] >= best[1][1] and best[0][0] in clf.labels


@pytest.mark.parametrize("templates", ["default", "openai"])
def test_class_embeddings_equal_open_clip_builder(tiny, templates):
    model, _, tokenizer = tiny
    labels = [f"class {i}" for i in range(13)]  # > 10: crosses open_clip's class batches
    clf = ZeroShotClassifier(model, tokenizer, labels, templates)
    reference = open_clip.build_zero_shot_classifier(
        model, tokenizer, labels, list(load_templates(templates)), num_classes_per_batch=10, device="cpu", use_tqdm=False
    )  # (d, n_labels)
    assert clf.class_embeddings.shape == (13, 64)
    assert (clf.class_embeddings - reference.T).abs().max().item() <= 1e-6
    legacy = open_clip.zero_shot_classifier.build_zero_shot_classifier_legacy(
        model, tokenizer, labels, list(load_templates(templates)), device="cpu"
    )  # one label at a time: same embeddings up to float rounding
    assert (clf.class_embeddings - legacy.T).abs().max().item() <= 1e-5
    torch.testing.assert_close(clf.class_embeddings.norm(dim=1), torch.ones(13))


def test_logits_use_the_models_learned_temperature(tiny):
    model, _, tokenizer = tiny
    clf = ZeroShotClassifier(model, tokenizer, ["red square", "blue square"])
    assert clf.logit_scale == pytest.approx(model.logit_scale.exp().item())
    features = clf.class_embeddings[[1, 0]]
    logits = clf.logits(features)
    assert logits[0, 1] == pytest.approx(clf.logit_scale, rel=1e-5)


def test_template_sets_and_files(tmp_path):
    assert load_templates("default") == list(DEFAULT_TEMPLATES)
    assert len(OPENAI_TEMPLATES) == 80 and all("{}" in t for t in OPENAI_TEMPLATES)
    assert load_templates("openai")[0] == "a bad photo of a {}."
    good = tmp_path / "templates.txt"
    good.write_text("# mine\na sketch of a {}.\n\n  a {} in the wild.  \n")
    assert load_templates(str(good)) == ["a sketch of a {}.", "a {} in the wild."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a sketch of a {}.\nno placeholder here\n")
    with pytest.raises(UsageError, match="no placeholder here"):
        load_templates(str(bad))
    with pytest.raises(UsageError, match="default, openai"):
        load_templates(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(UsageError, match="no templates"):
        load_templates(str(tmp_path / "empty.txt"))


def test_label_list_errors():
    assert check_labels([" cat", "dog "]) == ["cat", "dog"]
    with pytest.raises(UsageError, match="empty"):
        check_labels([])
    with pytest.raises(UsageError, match="empty"):
        check_labels(["cat", ""])
    with pytest.raises(UsageError, match="repeated: cat"):
        check_labels(["cat", "dog", "cat"])


def test_image_only_encoder_needs_a_text_tower():
    from mmcontrast.models import ImageEncoder, image_encoder_spec

    encoder = ImageEncoder(image_encoder_spec("mmc-tiny", {}, cifar_stem=False))
    with pytest.raises(UsageError, match="text tower"):
        ZeroShotClassifier(encoder, None, ["cat", "dog"])
