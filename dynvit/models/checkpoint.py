"""Load the checkpoint files users have: released DynamicViT/DeiT/timm weights and our Lightning runs."""

from __future__ import annotations

import hashlib
import math
import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from dynvit.files import staged

# Lightning modules of this toolkit keep the trained network as ``self.net``; other Lightning code
# commonly names it ``student`` (distillation) or ``model``.
_LIGHTNING_PREFIXES = ("net.", "student.", "model.")
# Classifier heads sized by the class count, which ``reset_head`` may replace (LV-ViT has two).
_HEAD_PREFIXES = ("head.", "aux_head.")

# Maps a checkpoint's keys onto a model's: (state dict, model) -> state dict. Registered per model class.
LayoutFilter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
LAYOUTS: dict[type[nn.Module], LayoutFilter] = {}


def register_layout(model_class: type[nn.Module], layout_filter: LayoutFilter) -> None:
    """Load checkpoints into instances of ``model_class`` (and its subclasses) through ``layout_filter``,
    which turns other key layouts (e.g. a backbone's original release) into the model's own and must
    leave the model's own layout unchanged."""
    LAYOUTS[model_class] = layout_filter


def own_layout(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` in ``model``'s key layout, through the filter registered for its class (if any)."""
    layout_filter = next((f for cls, f in LAYOUTS.items() if isinstance(model, cls)), None)
    return state_dict if layout_filter is None else layout_filter(state_dict, model)


class LoadReport(NamedTuple):
    """What :func:`load_checkpoint` did: keys left at their init, keys ignored, keys reset on purpose,
    keys resampled to the model's patch grid (the position embedding of a checkpoint of another size)."""

    missing: list[str]
    unexpected: list[str]
    reset: list[str]
    resampled: list[str]


class CheckpointMismatch(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


class UnreadableCheckpoint(ValueError):
    """A checkpoint path that names a folder, a file that cannot be read, or one torch cannot load."""


# How the files torch.save writes begin: a zip archive (torch >= 1.6) or a pickle (the legacy format).
_ZIP, _PICKLE = b"PK", b"\x80"


def read_checkpoint_file(path: str | Path, mmap: bool = False, what: str = "checkpoint") -> Any:
    """What ``torch.save`` wrote to ``path``, on the CPU.

    Tensors only are unpickled where they suffice; a file that also pickles objects (Lightning checkpoints
    may hold a config namespace among their hyper-parameters) is loaded whole, as a local file of the user's.

    Args:
        path: The file.
        mmap: Map the tensors rather than read them (they are read when touched); zip-format files only.
        what: How messages name the path, e.g. ``--ckpt_path``.

    Raises:
        FileNotFoundError: there is no ``path``.
        UnreadableCheckpoint: a folder, a file that cannot be read, or one that is not a whole checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        raise UnreadableCheckpoint(f"{what} {path} is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise UnreadableCheckpoint(f"{what} {path} cannot be read: {e.strerror}") from e
    size = path.stat().st_size
    if not head.startswith((_ZIP, _PICKLE)):
        raise UnreadableCheckpoint(
            f"{what} {path} is not a PyTorch checkpoint: its {size} bytes are neither a torch.save archive nor a "
            "pickle. Is it another kind of file?"
        )
    zipped = head == _ZIP
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
        except pickle.UnpicklingError:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap and zipped)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise UnreadableCheckpoint(
            f"{what} {path} is truncated or damaged: torch cannot read its {size} bytes as a checkpoint. Was its "
            "saving or copying interrupted? Save or copy it again"
        ) from e


def is_lightning_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded checkpoint) is what Lightning's ``Trainer.save_checkpoint`` writes."""
    return isinstance(obj, Mapping) and "state_dict" in obj and "pytorch-lightning_version" in obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in ``path`` (``.safetensors``, ``.pth``/``.pth.tar`` or Lightning ``.ckpt``)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise UnreadableCheckpoint(f"checkpoint {path} is not a readable safetensors file: {e}") from e
    return _unwrap(read_checkpoint_file(path), path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if is_lightning_checkpoint(obj):
        sd = obj["state_dict"]
        counts = {p: sum(k.startswith(p) for k in sd) for p in _LIGHTNING_PREFIXES}
        prefix = max(counts, key=counts.get)
        if counts[prefix]:
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        # A LightningModule that holds the network's layers itself: its keys are the network's.
        obj = sd
    # "model_state_dict": the released DVT checkpoints.
    for key in ("model", "state_dict", "model_ema", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"{path} holds no state dict (expected a dict of tensors or {{'model': ...}})")
    # DataParallel/DDP wrappers prefix every key.
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(
    model: nn.Module, path: str | Path, strict: bool = True, reset_head: bool = False, offer_reset_head: bool = True
) -> LoadReport:
    """Load weights from ``path`` into ``model``.

    Reads released DynamicViT checkpoints, DeiT/timm checkpoints (``{"model": sd}`` or a plain state
    dict, ``.pth``/``.pth.tar``/``.safetensors``) and Lightning ``.ckpt`` files of this toolkit, and
    the layouts registered with :func:`register_layout` (the original FB ConvNeXt and released
    DynamicCNN files). A teacher checkpoint loads into a student: what pruning adds (keep predictors,
    fast paths: the model's ``new_param_prefixes``) keeps its fresh init.

    A checkpoint trained on another patch grid (e.g. 224-px weights into a model built at 384) has a
    position embedding of another length: it is resampled to the model's grid as timm does for its
    pretrained weights (bicubic over the square grid; class/register entries kept as they are), with a
    warning, and listed in ``LoadReport.resampled``. A fixed (non-trainable) position code, such as
    T2T-ViT's sinusoid, is the model's own instead. Any other shape clash is an error.

    Args:
        strict: Raise :class:`CheckpointMismatch` listing missing/unexpected keys and shape clashes.
            Otherwise load what fits and report the rest.
        reset_head: Keep the model's own (fresh) classifier head when the checkpoint's has another
            class count, e.g. to fine-tune on a new dataset. Without it, that clash is an error.
        offer_reset_head: Suggest ``reset_head=True`` when only the class count clashes; callers that do
            not offer it (a teacher must keep its classes) turn the suggestion off.
    """
    sd = read_state_dict(path)
    return load_weights(
        model, sd, strict=strict, reset_head=reset_head, source=str(path), offer_reset_head=offer_reset_head
    )


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    reset_head: bool = False,
    source: str = "state dict",
    offer_reset_head: bool = True,
) -> LoadReport:
    """Load an in-memory state dict with the checks and head handling of :func:`load_checkpoint`."""
    sd = own_layout(model, dict(state_dict))
    own = model.state_dict()
    resampled = _fit_position_embedding(model, sd, own, source)
    reset = []
    head_keys = [k for k in sd if k.startswith(_HEAD_PREFIXES) and k in own and sd[k].shape != own[k].shape]
    if head_keys and reset_head:
        reset = head_keys
        sd = {k: v for k, v in sd.items() if k not in head_keys}
    clashes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    missing = [k for k in own if k not in sd and k not in reset]
    unexpected = [k for k in sd if k not in own]
    fresh = tuple(getattr(model, "new_param_prefixes", ()))
    hard_missing = [k for k in missing if not (fresh and k.startswith(fresh))]
    if clashes or (strict and (hard_missing or unexpected)):
        problems = []
        if clashes:
            problems.append("shape clashes:\n  " + "\n  ".join(clashes))
            problems.extend(_class_count_clash(sd, own, head_keys, clashes, offer_reset_head))
        if strict and hard_missing:
            problems.append(f"missing keys ({len(hard_missing)}): {_short(hard_missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        raise CheckpointMismatch(f"{source} does not fit {type(model).__name__}:\n" + "\n".join(problems))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadReport(missing, unexpected, reset, resampled)


def _fit_position_embedding(
    model: nn.Module, sd: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str
) -> list[str]:
    """Resample ``sd["pos_embed"]`` in place to the model's patch grid when the checkpoint's is another
    square grid of the same width; returns the keys changed. Anything else is left for the shape check."""
    key = "pos_embed"
    if key not in sd or key not in own or sd[key].shape == own[key].shape:
        return []
    old, new = sd[key], own[key]
    grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", ()) or ())
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
    if old.ndim != 3 or old.shape[-1] != new.shape[-1] or len(grid) != 2 or new.shape[1] != prefix + math.prod(grid):
        return []
    side = math.isqrt(old.shape[1] - prefix)
    if side * side != old.shape[1] - prefix:
        return []
    fixed = not dict(model.named_parameters()).get(key, new).requires_grad
    if fixed:
        sd[key] = new.clone()
    else:
        sd[key] = resample_abs_pos_embed(old, new_size=grid, old_size=(side, side), num_prefix_tokens=prefix)
    how = "kept the model's own fixed position code" if fixed else "resampled it (bicubic, as timm does)"
    warnings.warn(
        f"{source} has a {side}x{side} position embedding, the model a {grid[0]}x{grid[1]} patch grid: {how}",
        stacklevel=3,
    )
    return [key]


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    with staged(path) as staging:
        torch.save(obj, staging)


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", … (+{len(keys) - n})" if len(keys) > n else "")


def _class_count_clash(
    sd: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    head_keys: list[str],
    clashes: list[str],
    offer: bool,
) -> list[str]:
    """The line naming both class counts when only the classifier's output rows clash (another class
    count, not another architecture), with the ``reset_head`` suggestion where the caller offers it."""
    keys = [c.split(":", 1)[0] for c in clashes]
    if not keys or not all(k in head_keys and sd[k].shape[1:] == own[k].shape[1:] for k in keys):
        return []
    counts = f"{sd[keys[0]].shape[0]} classes in the checkpoint, {own[keys[0]].shape[0]} in the model"
    return [
        f"the classifier head has another class count ({counts})"
        + (": pass reset_head=True for a new head" if offer else "")
    ]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
