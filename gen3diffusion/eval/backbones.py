"""Pretrained backbones of the learned image metrics, loaded only from files on this machine.

LPIPS, FID and CLIP-FID are only meaningful with their published weights, and the packages that usually provide them
(``lpips``, ``pytorch-fid``, torchvision) download those weights on first use. Here nothing is ever downloaded: each
builder looks for its file in an explicit path, then an environment variable, then the torch hub cache
(``$TORCH_HOME/hub/checkpoints``), and raises :class:`BackboneUnavailable` when none is there. Random weights are only
built when the caller passes ``allow_random=True`` (tests of the plumbing); the returned :class:`LoadedBackbone` says
where its weights came from so a report can never mistake one for the other.

Expected files (names as the upstream projects publish them):

- LPIPS AlexNet trunk: torchvision ``alexnet-owt-7be5be79.pth``; VGG trunk: ``vgg16-397923af.pth``. The LPIPS
  linear heads (``v0.1/alex.pth``, ``v0.1/vgg.pth``) ship inside the ``lpips`` wheel and are read from there.
- FID Inception: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the TF 2015-12-05 graph ported to torch);
  torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` is accepted when its keys load strictly.
- CLIP: a local transformers folder (``config.json`` + weights) of a CLIP model with its visual projection, e.g. a
  copy of ``openai/clip-vit-base-patch32``.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
FID_INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
# environment variables naming a weights file (LPIPS trunk, FID Inception) or a CLIP folder
LPIPS_BACKBONE_ENV = "LPIPS_BACKBONE"
FID_WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"
CLIP_FOLDER_ENV = "CLIP_FEATURES_DIR"
# pytorch-fid feeds Inception 299x299 inputs; pool3 is 2048-d
FID_INPUT_SIZE = 299
FID_FEATURE_DIM = 2048
# OpenAI CLIP preprocessing statistics, used when the folder has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BackboneUnavailable(RuntimeError):
    """The pretrained weights a metric needs are not on this machine, so the metric must not be computed."""


@dataclass
class LoadedBackbone:
    """A metric network in eval mode, and where its weights came from (a path, or "random" for plumbing tests)."""

    module: nn.Module
    source: str

    @property
    def pretrained(self) -> bool:
        return self.source != "random"


def torch_hub_checkpoint_dir() -> Path:
    """The folder torchvision and torch.hub cache downloaded weights in (honours ``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(explicit: str | Path | None, env_var: str, file_names: Sequence[str]) -> Path:
    """Locate a weights file: ``explicit`` path, else ``$env_var``, else one of ``file_names`` in the hub cache.

    Raises:
        FileNotFoundError: ``explicit`` (or the variable) names a file that does not exist - a typo, not absence.
        BackboneUnavailable: nothing was named and no file of those names is in the hub cache.
    """
    named = explicit if explicit is not None else os.environ.get(env_var)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file not found (given {'explicitly' if explicit else env_var})")
        return path
    cache = torch_hub_checkpoint_dir()
    for name in file_names:
        if (cache / name).is_file():
            return cache / name
    raise BackboneUnavailable(
        f"no {' / '.join(file_names)} in {cache}; pass the path or set ${env_var} (weights are never downloaded)"
    )


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (tensors only, on CPU)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module`` requiring the same keys and shapes; the error lists the differences.

    BatchNorm ``num_batches_tracked`` counters may be absent from older files (they do not affect eval outputs). A
    module built on the meta device receives the file's tensors themselves.
    """
    own = module.state_dict()
    state = {**{k: torch.zeros_like(v, device="cpu") for k, v in own.items() if k.endswith("num_batches_tracked")},
             **state}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not fit {type(module).__name__}: missing {missing[:8]} ({len(missing)}), "
            f"unexpected {unexpected[:8]} ({len(unexpected)}), mis-shaped {shapes[:8]}"
        )
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict(state, strict=True, assign=on_meta)


### LPIPS


def build_lpips(
    net: str = "alex",
    version: str = "0.1",
    backbone_path: str | Path | None = None,
    lin_path: str | Path | None = None,
    allow_random: bool = False,
) -> LoadedBackbone:
    """LPIPS (``lpips.LPIPS``) with the ImageNet trunk and the learned linear heads read from local files.

    The package's own constructor would fetch the trunk from torchvision's servers; it is therefore built with
    ``pnet_rand=True`` (torchvision ``weights=None``: no network) and ``pretrained=False`` (no silent ``strict=False``
    head load), and both state dicts are then loaded strictly here. With ``allow_random=True`` and no trunk file the
    trunk stays randomly initialised (plumbing tests only; ``source == "random"``).
    """
    import lpips

    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"LPIPS net {net!r} not supported; use one of {sorted(LPIPS_BACKBONE_FILES)}")
    try:
        trunk: Path | None = find_weights(backbone_path, LPIPS_BACKBONE_ENV, [LPIPS_BACKBONE_FILES[net]])
    except BackboneUnavailable:
        if not allow_random:
            raise
        trunk = None
    heads = Path(lin_path) if lin_path else Path(lpips.__file__).parent / "weights" / f"v{version}" / f"{net}.pth"
    if not heads.is_file():
        raise BackboneUnavailable(f"{heads}: LPIPS linear heads not found (they ship in the lpips wheel)")
    with warnings.catch_warnings():
        # torchvision deprecates the `pretrained=` keyword lpips passes; its value here (False) downloads nothing
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=False, net=net, version=version, pnet_rand=True, verbose=False)
    load_strict(model.lins, _head_keys(load_state_dict_file(heads)), str(heads))
    if trunk is None:
        logger.warning("LPIPS-%s: random trunk (allow_random=True); values are plumbing checks, not metrics", net)
        return LoadedBackbone(model.eval(), "random")
    load_strict(model.net, _torchvision_features_to_lpips(model.net, load_state_dict_file(trunk)), str(trunk))
    return LoadedBackbone(model.eval(), str(trunk))


def _head_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The lpips head files name ``lin0.model.1.weight``; ``model.lins`` (a ModuleList) names ``0.model.1.weight``."""
    return {key.removeprefix("lin"): value for key, value in state.items()}


def _torchvision_features_to_lpips(trunk: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision ``features.{i}.{param}`` keys onto lpips' ``slice{k}.{i}.{param}`` (classifier dropped)."""
    mapped = {}
    for key in trunk.state_dict():
        _, index, param = key.split(".")
        source = f"features.{index}.{param}"
        if source in state:
            mapped[key] = state[source]
    return mapped


### FID Inception (pytorch-fid layout)


def _avg_pool_exclude_pad(x: Tensor) -> Tensor:
    # the TF graph averages border windows over valid pixels only; torchvision counts the zero padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _fid_blocks():
    """torchvision Inception blocks with the pooling of the TF 2015-12-05 graph (same parameters, other forward)."""
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    class FIDInceptionA(InceptionA):
        def _forward(self, x: Tensor) -> list[Tensor]:
            return [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_exclude_pad(x)),
            ]

    class FIDInceptionC(InceptionC):
        def _forward(self, x: Tensor) -> list[Tensor]:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d7 = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                d7 = layer(d7)
            return [self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool_exclude_pad(x))]

    class FIDInceptionE(InceptionE):
        # Mixed_7c of the TF graph max-pools its pool branch; Mixed_7b averages
        def __init__(self, in_channels: int, max_pool: bool = False) -> None:
            super().__init__(in_channels)
            self.max_pool = max_pool

        def _forward(self, x: Tensor) -> list[Tensor]:
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
            d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d3 = torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], dim=1)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_exclude_pad(x)
            return [self.branch1x1(x), b3, d3, self.branch_pool(pooled)]

    return FIDInceptionA, FIDInceptionC, FIDInceptionE


class FIDInceptionV3(nn.Module):
    """Inception-v3 pool3 features as pytorch-fid computes them: [B, 3, H, W] in [0, 1] -> [B, 2048].

    Inputs are resized to 299x299 (bilinear, align_corners=False) and mapped to [-1, 1]; the network is torchvision's
    Inception3 with 1008 classes (the TF graph's) and the TF pooling variants, so pytorch-fid's weights load strictly.
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.inception import BasicConv2d, Inception3, InceptionAux, InceptionB, InceptionD

        block_a, block_c, block_e = _fid_blocks()
        blocks = [BasicConv2d, block_a, InceptionB, block_c, InceptionD, block_e, InceptionAux]
        self.net = Inception3(num_classes=1008, aux_logits=False, transform_input=False,
                              inception_blocks=blocks, init_weights=False)
        self.net.Mixed_7c = block_e(2048, max_pool=True)

    def forward(self, images: Tensor) -> Tensor:  # [B, 3, H, W] in [0, 1]
        x = F.interpolate(images, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        for name, layer in self.net.named_children():
            if name in ("dropout", "fc"):
                break
            x = layer(x)
        return torch.flatten(x, 1)  # [B, 2048]


def build_fid_inception(weights_path: str | Path | None = None, allow_random: bool = False) -> LoadedBackbone:
    """The FID Inception with the pytorch-fid weights from a local file (random only with ``allow_random``)."""
    try:
        path = find_weights(weights_path, FID_WEIGHTS_ENV, FID_INCEPTION_FILES)
    except BackboneUnavailable:
        if not allow_random:
            raise
        logger.warning("FID Inception: random weights (allow_random=True); values are plumbing checks, not metrics")
        with torch.device("meta"):
            model = FIDInceptionV3()
        return LoadedBackbone(_variance_preserving_init(model.to_empty(device="cpu")).eval(), "random")
    with torch.device("meta"):  # no initialisation work: every tensor comes from the file
        model = FIDInceptionV3()
    load_strict(model.net, load_state_dict_file(path), str(path))
    return LoadedBackbone(model.eval(), str(path))


def _variance_preserving_init(module: nn.Module) -> nn.Module:
    """Random weights that keep activations O(1) through the 90-odd layers (He-normal convs, identity BatchNorm).

    PyTorch's default initialisation shrinks Inception's activations to ~1e-8 and into denormal floats, which makes a
    CPU forward several times slower.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            layer.reset_parameters()
    return module


### CLIP image features


class CLIPImageFeatures(nn.Module):
    """Projected CLIP image embeddings (``image_embeds``): [B, 3, H, W] in [0, 1] -> [B, D].

    Preprocessing follows CLIP's: shorter side resized to the model's input size (bicubic, antialiased), centre crop,
    normalisation by the folder's mean/std. ``l2_normalize`` returns unit vectors instead of the raw projections.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], l2_normalize: bool = False):
        super().__init__()
        self.model = model
        self.size = int(model.config.image_size)
        self.l2_normalize = l2_normalize
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:  # [B, 3, H, W] in [0, 1]
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size].clamp(0.0, 1.0)
        x = (x - self.mean.to(x)) / self.std.to(x)
        embeds = self.model(pixel_values=x.to(self.model.dtype)).image_embeds.float()  # [B, D]
        return F.normalize(embeds, dim=-1) if self.l2_normalize else embeds


def build_clip_features(folder: str | Path | None = None, l2_normalize: bool = False) -> LoadedBackbone:
    """CLIP vision tower + projection from a local transformers folder (``folder`` or ``$CLIP_FEATURES_DIR``).

    A folder without the visual projection (or any other weight) is refused rather than completed at random.
    """
    named = folder if folder is not None else os.environ.get(CLIP_FOLDER_ENV)
    if not named:
        raise BackboneUnavailable(f"no CLIP folder given; pass it or set ${CLIP_FOLDER_ENV} (never downloaded)")
    path = Path(named).expanduser()
    if not (path / "config.json").is_file():
        raise BackboneUnavailable(f"{path}: no config.json of a CLIP model")
    from transformers import CLIPVisionModelWithProjection

    model, info = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True,
                                                                output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise BackboneUnavailable(f"{path}: weights missing {sorted(info['missing_keys'])[:8]}, "
                                  f"mis-shaped {sorted(map(str, info['mismatched_keys']))[:8]}")
    mean, std = _clip_statistics(path)
    return LoadedBackbone(CLIPImageFeatures(model.eval(), mean, std, l2_normalize).eval(), str(path))


def _clip_statistics(folder: Path) -> tuple[Sequence[float], Sequence[float]]:
    """Image mean/std of the folder's preprocessor_config.json, else OpenAI CLIP's."""
    config = folder / "preprocessor_config.json"
    if config.is_file():
        import json

        values = json.loads(config.read_text())
        return values.get("image_mean", CLIP_MEAN), values.get("image_std", CLIP_STD)
    return CLIP_MEAN, CLIP_STD
