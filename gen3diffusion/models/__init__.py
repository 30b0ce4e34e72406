"""Networks with weights: the multi-view UNet, the 3D-GS model, the frozen conditioning networks, and loading helpers.

Names are resolved on first use, so ``import gen3diffusion.models`` stays cheap (diffusers loads with the module
that needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MultiViewUNet": "mv_unet",
    "load_mv_unet": "mv_unet",
    "GaussianUNet": "gaussian_unet",
    "GaussianDiffusionModel": "gaussian_unet",
    "MVConditioning": "conditioning",
    "PromptConfig": "conditioning",
    "build_conditioning": "conditioning",
    "cfg_batch": "conditioning",
    "combine_cfg": "conditioning",
    "load_vae": "conditioning",
    "load_image_encoder": "conditioning",
    "load_prompt_embeddings": "conditioning",
    "StateDictMismatchError": "loading",
    "load_state_dict_strict": "loading",
    "read_state_dict": "loading",
    "resolve_source": "loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
