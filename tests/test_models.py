"""mmcontrast.models: weights saved from wrapped models (DDP's ``module.``, torch.compile's ``_orig_mod.``) load."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from mmcontrast import models


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_a_checkpoint_of_a_ddp_wrapped_model_loads_as_the_run_dir(one_process_group, tmp_path):
    torch.manual_seed(0)
    bundle = models.create_clip("mmc-tiny")
    run = tmp_path / "run"
    models.save_clip_run_files(bundle.model, bundle.model_cfg, run, bundle.tokenizer, weights=False)  # as at start-up
    wrapped = nn.parallel.DistributedDataParallel(bundle.model)
    state = {k: v.detach().contiguous() for k, v in wrapped.state_dict().items()}
    assert all(k.startswith("module.") for k in state)
    last = run / "checkpoints" / "last"
    last.mkdir(parents=True)
    save_file(state, str(last / models.WEIGHTS_FILE))  # what Accelerate's save_state writes for a DDP model on GPUs

    loaded, _, tokenizer = models.load(run)  # a run still training: checkpoints/last
    images, text = torch.randn(2, 3, 32, 32), tokenizer(["a red circle", "a blue square"])
    bundle.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), bundle.model.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(text), bundle.model.encode_text(text), rtol=0, atol=0)


def test_compiled_and_wrapped_prefixes_are_stripped():
    state = {"module._orig_mod.visual.proj": torch.ones(1), "_orig_mod.logit_scale": torch.zeros(()),
             "encoder._orig_mod.backbone.w": torch.ones(2), "text.proj": torch.ones(1)}  # fmt: skip
    assert sorted(models.strip_wrapper_prefixes(state)) == ["encoder.backbone.w", "logit_scale", "text.proj", "visual.proj"]
