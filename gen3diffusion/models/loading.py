"""Checkpoint loading shared by the models: find weights locally or on the hub, read them, load them strictly.

Released weights must fit our modules exactly; a silent partial load (what the authors' loaders do: copy the tensors
whose name and shape match, print the rest) gives wrong numbers without an error. Here every mismatch raises
:class:`StateDictMismatchError`, which lists the missing, unexpected and mis-shaped keys (with both shapes).

Sources are local paths first; an argument that is not an existing path but looks like a hub id (``owner/name``) is
fetched with ``huggingface_hub.snapshot_download`` (only the files asked for). Nothing here reaches the network for a
local path.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "WEIGHT_NAMES",
    "StateDictMismatchError",
    "find_weights_file",
    "load_state_dict_strict",
    "read_state_dict",
    "resolve_file",
    "resolve_source",
    "state_dict_mismatch",
]

# weight files of a diffusers / transformers / accelerate folder, in the order they are preferred
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_MAX_LISTED = 40  # keys listed per section of a mismatch message; the exception keeps them all


class StateDictMismatchError(RuntimeError):
    """A state dict that does not fit a model key for key and shape for shape.

    ``missing``: keys the model has and the file lacks; ``unexpected``: keys the file has and the model lacks;
    ``mismatched``: ``(key, file_shape, model_shape)`` for keys present in both with different shapes. Missing and
    unexpected keys are given with their shapes where known (None: unknown).
    """

    def __init__(
        self,
        source: str,
        missing: Sequence[tuple[str, tuple[int, ...] | None]],
        unexpected: Sequence[tuple[str, tuple[int, ...] | None]],
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.source = source
        self.missing = [k for k, _ in missing]
        self.unexpected = [k for k, _ in unexpected]
        self.mismatched = list(mismatched)
        lines = [
            f"{source}: the weights do not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} mis-shaped keys)"
        ]
        lines += _section("missing (in the model, not in the file):", [_named(k, s) for k, s in missing])
        lines += _section("unexpected (in the file, not in the model):", [_named(k, s) for k, s in unexpected])
        lines += _section(
            "mis-shaped (file vs model):", [f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in mismatched]
        )
        super().__init__("\n".join(lines))


def _named(key: str, shape: tuple[int, ...] | None) -> str:
    return key if shape is None else f"{key} {list(shape)}"


def _section(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        shown.append(f"    ... and {len(items) - _MAX_LISTED} more")
    return [f"  {title}", *shown]


### finding files


def resolve_source(
    source: str | Path, allow_patterns: Sequence[str] | None = None, revision: str | None = None
) -> Path:
    """A local file or folder, or a hub id downloaded to the local cache -> an existing local path.

    ``allow_patterns`` restricts a hub download to the files needed (e.g. ``["unet/*"]``); it is ignored for local
    paths. Raises ``FileNotFoundError`` naming the source when it is neither.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = str(source)
    if not _HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"{source}: no such file or folder (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    patterns = list(allow_patterns) if allow_patterns else None
    try:
        local = snapshot_download(repo_id=name, allow_patterns=patterns, revision=revision)
    except Exception as err:  # offline, unknown repo, HTTP errors: one message naming the way out
        raise FileNotFoundError(
            f"{source}: not a local path, and fetching it from the hub failed ({type(err).__name__}: {err}); "
            "pass a local folder"
        ) from err
    logger.info("%s: using hub snapshot %s", name, local)
    return Path(local)


def resolve_file(source: str | Path, filename: str, revision: str | None = None) -> Path:
    """A weights file given as its path, as a folder holding ``filename``, or as a hub id holding ``filename``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    root = resolve_source(source, allow_patterns=[filename], revision=revision)
    file = root / filename
    if not file.is_file():
        raise FileNotFoundError(f"{source}: no {filename} in {root}")
    return file


def find_weights_file(folder: str | Path, names: Iterable[str] = WEIGHT_NAMES) -> Path:
    """The first weights file of ``names`` present in ``folder``."""
    folder = Path(folder)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"{folder}: no weights file (looked for {', '.join(names)}; found {present})")


### reading and loading


def read_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` from a .safetensors file, a sharded ``*.index.json`` or a torch file.

    Torch files are read with ``weights_only=True`` (no pickled code runs).
    """
    path = Path(path)
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_state_dict(path.parent / shard, device))
        return state
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        kind = type(state).__name__
        keys = list(state)[:5] if isinstance(state, Mapping) else []
        raise ValueError(f"{path}: not a flat state dict of tensors (a {kind}; first keys {keys})")
    return dict(state)


def state_dict_mismatch(
    model_state: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], source: str = "state dict"
) -> StateDictMismatchError | None:
    """The mismatch between a model's state dict (or any name -> tensor map) and a file's, or None when they fit."""
    missing = [(k, tuple(v.shape)) for k, v in model_state.items() if k not in state_dict]
    unexpected = [(k, tuple(v.shape)) for k, v in state_dict.items() if k not in model_state]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in model_state.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        return StateDictMismatchError(source, missing, unexpected, mismatched)
    return None


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str = "state dict",
    assign: bool = False,
    dtype: torch.dtype | None = None,
    ignore_prefixes: Sequence[str] = (),
) -> None:
    """Load ``state_dict`` into ``model`` only if keys and shapes fit exactly; else raise StateDictMismatchError.

    ``assign=True`` hands the file's tensors to the model instead of copying them, which is how a model built on the
    meta device (``with torch.device("meta"):``) gets real weights without allocating twice. ``dtype`` casts floating
    tensors first. Keys under ``ignore_prefixes`` (e.g. ``"lpips_loss."`` in the authors' 3D-model file) are dropped
    before the comparison.
    """
    state = {k: v for k, v in state_dict.items() if not k.startswith(tuple(ignore_prefixes))}
    error = state_dict_mismatch(model.state_dict(), state, source)
    if error is not None:
        raise error
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
    if assign:  # non-persistent buffers are in no file: a model built on meta would keep them empty
        left = [n for n, t in model.named_buffers() if t.is_meta and n not in state]
        if left:
            raise ValueError(f"{source}: buffers outside the state dict are still on the meta device: {left[:10]}")
