"""Training losses: the 3D-GS model's render loss (paper Eq. 7), the multi-view diffusion loss, their sum (Eq. 9),
and a network-free LPIPS (VGG) factory.

The 3D loss follows the authors' training code: MSE of the render against the ground truth on white, MSE of the
accumulated alpha against the mask, LPIPS-VGG on both images bilinearly resized to 256 and mapped to [-1, 1], and a
depth-distortion regulariser (weights 1.0 and 100 in the authors' scripts).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from gen3diffusion.render import RenderOutput

logger = logging.getLogger(__name__)

# torchvision's file name for VGG16_Weights.IMAGENET1K_V1, as its downloader stores it under <hub dir>/checkpoints
VGG16_FILE = "vgg16-397923af.pth"
# prefix of the LPIPS tensors inside the authors' model_1.safetensors
LPIPS_PREFIX = "lpips_loss."


@dataclass
class LossWeights:
    """Weights of the 3D loss terms (MSE(rgb) and MSE(alpha) have weight 1); defaults: the authors' scripts."""

    # LPIPS-VGG between render and ground truth; 0 disables LPIPS (no VGG needed)
    lambda_lpips: float = 1.0
    # mean depth distortion of the render (keeps the Gaussians along a ray close together)
    lambda_distortion: float = 100.0
    # both images are bilinearly resized to this size before LPIPS (the authors: 256)
    lpips_resolution: int = 256


### losses


def loss_3d(render: RenderOutput, gt_rgb: Tensor, gt_mask: Tensor, lpips: nn.Module | None,
            weights: LossWeights | None = None) -> dict[str, Tensor]:
    """Eq. 7: render loss of the predicted Gaussians at the supervision views.

    Args:
        render: the renderer's output at V supervision views (rgb composited on white).
        gt_rgb: [B, V, 3, H, W] ground truth in [0, 1], already composited on a white background.
        gt_mask: [B, V, 1, H, W] ground-truth alpha in [0, 1].
        lpips: the module from ``build_lpips``; may be None only when ``weights.lambda_lpips`` is 0.
        weights: term weights (``LossWeights()`` if None).

    Returns:
        ``loss_rgb``, ``loss_alpha``, ``loss_lpips``, ``loss_distortion`` (unweighted), their weighted sum ``loss``,
        and ``psnr`` (detached, of the batch RGB MSE, for logging).
    """
    weights = weights or LossWeights()
    if gt_rgb.ndim != 5 or gt_rgb.shape[2] != 3 or tuple(render.rgb.shape) != tuple(gt_rgb.shape):
        raise ValueError(f"gt_rgb must be [B, V, 3, H, W] like the render {tuple(render.rgb.shape)}, "
                         f"got {tuple(gt_rgb.shape)}")
    if tuple(gt_mask.shape) != tuple(render.alpha.shape):
        raise ValueError(f"gt_mask must be [B, V, 1, H, W] like the render alpha {tuple(render.alpha.shape)}, "
                         f"got {tuple(gt_mask.shape)}")
    loss_rgb = F.mse_loss(render.rgb, gt_rgb)
    loss_alpha = F.mse_loss(render.alpha, gt_mask)
    loss_distortion = render.distortion.mean()
    if weights.lambda_lpips > 0:
        if lpips is None:
            raise ValueError(f"lambda_lpips={weights.lambda_lpips} needs an LPIPS module: pass build_lpips(...) "
                             "or set lambda_lpips=0")
        loss_lpips = lpips_distance(lpips, render.rgb, gt_rgb, weights.lpips_resolution).mean()
    else:
        loss_lpips = loss_rgb.new_zeros(())
    loss = loss_rgb + loss_alpha + weights.lambda_lpips * loss_lpips + weights.lambda_distortion * loss_distortion
    psnr = -10.0 * torch.log10(loss_rgb.detach().clamp_min(1e-10))
    return {"loss": loss, "loss_rgb": loss_rgb, "loss_alpha": loss_alpha, "loss_lpips": loss_lpips,
            "loss_distortion": loss_distortion, "psnr": psnr}


def lpips_distance(lpips: nn.Module, pred: Tensor, gt: Tensor, resolution: int = 256) -> Tensor:
    """LPIPS between [..., 3, H, W] images in [0, 1], both bilinearly resized to ``resolution``; [prod(...)]."""
    pred = pred.reshape(-1, *pred.shape[-3:])
    gt = gt.reshape(-1, *gt.shape[-3:])
    if pred.shape[-2:] != (resolution, resolution):
        pred = F.interpolate(pred, size=(resolution, resolution), mode="bilinear", align_corners=False)
        gt = F.interpolate(gt, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return lpips(pred * 2.0 - 1.0, gt * 2.0 - 1.0).flatten()  # [N]


def loss_mvd(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """Multi-view diffusion loss: MSE between predicted and true noise of the V target frames.

    ``eps`` is [B, V, C, h, w]; ``eps_pred`` is [B, V, C, h, w] or [B, V + 1, C, h, w] with the input frame last,
    whose prediction is not a target (its latent is overwritten by the clean one) and is left out.
    """
    if eps.ndim != 5 or eps_pred.ndim != 5 or eps_pred.shape[1] - eps.shape[1] not in (0, 1) \
            or eps_pred.shape[:1] + eps_pred.shape[2:] != eps.shape[:1] + eps.shape[2:]:
        raise ValueError(f"eps_pred must be [B, V or V+1, C, h, w] for eps [B, V, C, h, w]; got eps_pred "
                         f"{tuple(eps_pred.shape)} and eps {tuple(eps.shape)}")
    return F.mse_loss(eps_pred[:, : eps.shape[1]], eps)


def loss_joint(mvd: Tensor, losses_3d: dict[str, Tensor]) -> dict[str, Tensor]:
    """Eq. 9: the sum of the diffusion loss and the 3D loss, with every term kept for logging.

    ``losses_3d`` is ``loss_3d``'s dict; its total is renamed ``loss_3d``, and ``loss`` becomes the joint total.
    """
    terms = {k: v for k, v in losses_3d.items() if k != "loss"}
    return {**terms, "loss_mvd": mvd, "loss_3d": losses_3d["loss"], "loss": mvd + losses_3d["loss"]}


### LPIPS without network access


def build_lpips(weights_path: str | Path | None = None, allow_random: bool = False,
                lambda_lpips: float = 1.0) -> nn.Module | None:
    """A frozen LPIPS-VGG (``lpips`` package, v0.1) built from local files only; None when ``lambda_lpips`` is 0.

    The ``lpips`` package would have torchvision download VGG16; here the VGG is built empty and filled from, in order:
    ``weights_path`` (torchvision's VGG16 state dict, or an LPIPS state dict such as the ``lpips_loss.*`` tensors of
    the authors' model_1.safetensors; ``.pth`` or ``.safetensors``), else ``<torch hub dir>/checkpoints/`` +
    ``VGG16_FILE``. The linear heads come from the weights shipped inside the ``lpips`` package (or from an LPIPS
    state dict that holds them). Without any VGG weights this raises, unless ``allow_random`` (tests only).
    """
    if lambda_lpips == 0:
        return None
    source = Path(weights_path) if weights_path is not None else Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if weights_path is not None and not source.is_file():
        raise FileNotFoundError(f"{source}: no such LPIPS/VGG16 weights file")
    if not source.is_file() and not allow_random:
        raise FileNotFoundError(
            f"{source}: no VGG16 weights for LPIPS. Copy torchvision's {VGG16_FILE} there (torchvision saves it there "
            f"when it downloads VGG16_Weights.IMAGENET1K_V1), or pass weights_path=FILE, or set lambda_lpips=0"
        )
    import lpips as lpips_pkg

    with warnings.catch_warnings():  # lpips passes torchvision the deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if source.is_file():
        _load_lpips_backbone(model, source)
    else:
        logger.warning("LPIPS with a RANDOM VGG16 backbone (allow_random=True): for tests only")
    model.requires_grad_(False)
    return model.eval()


def _load_lpips_backbone(model: nn.Module, path: Path) -> None:
    """Fill the LPIPS VGG slices (and, if the file has them, the linear heads) from ``path``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # torchvision index `features.{i}.*` -> LPIPS slice `net.slice{k}.{i}.*`
    slice_of = {name.split(".")[1]: name.split(".")[0] for name, _ in model.net.named_parameters()}
    mapped = {}
    for key, value in state.items():
        key = key.removeprefix(LPIPS_PREFIX)
        parts = key.split(".")
        if parts[0] == "features" and parts[1] in slice_of:
            mapped[f"net.{slice_of[parts[1]]}.{parts[1]}.{parts[2]}"] = value
        elif parts[0] == "net" or parts[0].startswith("lin"):
            mapped[key] = value
    expected = {f"net.{name}": p.shape for name, p in model.net.named_parameters()}
    missing = sorted(k for k in expected if k not in mapped)
    bad = sorted(f"{k} {list(mapped[k].shape)} vs {list(s)}" for k, s in expected.items()
                 if k in mapped and mapped[k].shape != s)
    if missing or bad:
        raise ValueError(f"{path}: not a VGG16 / LPIPS-VGG state dict; missing {missing[:4]}"
                         f"{'...' if len(missing) > 4 else ''}, mis-shaped {bad[:4]}")
    model.load_state_dict(mapped, strict=False)
    logger.info("LPIPS VGG16 loaded from %s (%d tensors)", path, len(mapped))
