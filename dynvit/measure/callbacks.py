"""Lightning callbacks that log what pruning buys: FLOPs, throughput and which tokens stay.

They work on any module of this toolkit: the trained network is ``pl_module.net`` and a frozen
teacher, when there is one, is ``pl_module.teacher``. Measurements run and are logged on global
rank 0 only; the other ranks carry on.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from dynvit import methods
from dynvit.measure.flops import count_flops, count_params
from dynvit.measure.groups import GROUP_REPORTS, group_colours, token_groups
from dynvit.measure.throughput import SpeedSettings, keep_rng, measure_speedup, time_model
from dynvit.models.contract import reports

Dtype = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` as a torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def precision_dtype(precision: str) -> torch.dtype:
    """The compute dtype of a Lightning precision setting (``"bf16-mixed"`` → bfloat16, …)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def networks(pl_module: L.LightningModule) -> tuple[nn.Module, nn.Module | None]:
    """The trained network ``pl_module.net`` and the frozen teacher ``pl_module.teacher`` (or None)."""
    net = getattr(pl_module, "net", None)
    if not isinstance(net, nn.Module):
        raise TypeError(
            f"{type(pl_module).__name__} keeps no network in `self.net`: dynvit's measurement callbacks "
            "need the module's trained model there (as ClassifierModule and DynamicViTModule do)"
        )
    teacher = getattr(pl_module, "teacher", None)
    return net, teacher if isinstance(teacher, nn.Module) else None


def mask_grid(net: nn.Module) -> tuple[int, int]:
    """(rows, columns) of the grid a network's kept-token masks and patch groups lie on, row-major: a
    hierarchical student's stage-3 map (``mask_grid``), a ViT's patch grid otherwise."""
    grid = getattr(net, "mask_grid", None) or net.patch_embed.grid_size
    return tuple(grid)


def log_to_all(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Send ``metrics`` to every logger of the trainer at the current global step."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


class FlopsCallback(L.Callback):
    """GFLOPs (fvcore, batch 1) and parameters of the trained network and its teacher.

    Logged as ``cost/gflops``, ``cost/params_m``, ``cost/<knob>``, ``cost/teacher_gflops`` and
    ``cost/teacher_params_m`` when fit, validate or test starts, and again whenever the network's cost
    knob has changed (checked every epoch and before every validation). The knob is the registry's
    (:func:`dynvit.methods.controlling`): ``cost/keep_ratio`` for a DynamicViT or hierarchical student,
    ``cost/r`` for a ToMe model, none for a plain network. Every checkpoint
    carries the latest values, without the prefix, under ``checkpoint["dynvit"]``.
    """

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self._teacher_metrics: dict[str, float] | None = None

    def _refresh(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool) -> None:
        if not trainer.is_global_zero:
            return
        net, teacher = networks(pl_module)
        # The setting that decides the cost is the registry's knob of the net's method (a student's keep ratio,
        # ToMe's r); a plain network has none.
        method = methods.controlling(net)
        knob = method.knob.name if method is not None else None
        value = getattr(net, knob, None) if knob is not None else None
        # A knob set per location (ATS's max_tokens as a list) or left to its default (None) is not one number.
        value = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        key = f"cost/{knob}"
        changed = not self.metrics or self.metrics.get(key) != value
        if changed:
            # fvcore traces with a random input: keep it off the training run's random stream.
            with keep_rng(pl_module.device):
                metrics = {"cost/gflops": count_flops(net), "cost/params_m": count_params(net)}
                if value is not None:
                    metrics[key] = value
                if teacher is not None and self._teacher_metrics is None:
                    self._teacher_metrics = {
                        "cost/teacher_gflops": count_flops(teacher),
                        "cost/teacher_params_m": count_params(teacher),
                    }
            self.metrics = {**metrics, **(self._teacher_metrics or {})}
        if changed or force:
            log_to_all(trainer, self.metrics)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._refresh(trainer, pl_module, force=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._refresh(trainer, pl_module, force=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._refresh(trainer, pl_module, force=trainer.state.fn == TrainerFn.VALIDATING)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._refresh(trainer, pl_module, force=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Only rank 0 writes checkpoints, and only rank 0 has measured.
        if not trainer.is_global_zero:
            return
        self._refresh(trainer, pl_module, force=False)
        meta = checkpoint.setdefault("dynvit", {})
        meta.update({k.removeprefix("cost/"): v for k, v in self.metrics.items()})


class ThroughputCallback(L.Callback):
    """Images/s of the trained network and its teacher in eval mode when fit ends, and the speedup.

    Student and teacher are timed in pairs, as ``cli.py benchmark`` times them
    (:mod:`dynvit.measure.throughput`): the speedup is the median of per-pair ratios, logged with its
    95 % interval. Runs on the training device (GPU 0 of rank 0 under DDP) and logs
    ``throughput/images_per_s``, ``throughput/teacher_images_per_s``, ``throughput/speedup`` and, from
    6 pairs on, ``throughput/speedup_low``/``_high``. The defaults (batch 32, 10 pairs) cost a few
    seconds on a GPU and about a minute for DeiT-S on a 2-core CPU; ``python cli.py benchmark``
    measures more pairs.

    Args:
        batch_size: Images per timed call.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (autocast); by default the trainer's precision.
        pairs: Timing rounds (student and teacher back to back in each).
        block_time: Seconds each timed block lasts at least.
        warmup_time: Seconds of untimed calls per model before timing.
        enabled: Set False to skip the measurement (e.g. ``--throughput.enabled false`` on the CLI).
        latency: Also time one image at a time (batch 1) in pairs with the teacher: logs
            ``throughput/latency_ms`` and ``throughput/latency_speedup`` (with ``_low``/``_high``).
    """

    def __init__(
        self,
        batch_size: int = 32,
        dtype: Dtype | None = None,
        pairs: int = 10,
        block_time: float = 0.1,
        warmup_time: float = 0.3,
        enabled: bool = True,
        latency: bool = False,
    ) -> None:
        # Checked now, so a bad value fails before training rather than at its end.
        self.settings = SpeedSettings(
            batch_size=batch_size, pairs=pairs, block_time=block_time, warmup_time=warmup_time
        )
        self.enabled = enabled
        self.latency = latency
        self.dtype = None if dtype is None else parse_dtype(dtype)
        self.metrics: dict[str, float] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        net, teacher = networks(pl_module)
        # Lightning has already moved the module off the GPU here; measure on the training device anyway.
        settings = dataclasses.replace(self.settings, device=trainer.strategy.root_device)
        dtype = self.dtype or precision_dtype(trainer.precision)
        if teacher is None:
            self.metrics = {"throughput/images_per_s": time_model(net, settings, dtype).images_per_s}
        else:
            timing, teacher_timing = measure_speedup(net, teacher, settings, dtype)
            speedup = timing.speedup
            self.metrics = {
                "throughput/images_per_s": timing.images_per_s,
                "throughput/teacher_images_per_s": teacher_timing.images_per_s,
                "throughput/speedup": speedup.value,
            }
            if speedup.low is not None:
                self.metrics.update({"throughput/speedup_low": speedup.low, "throughput/speedup_high": speedup.high})
            if self.latency:
                one, _ = measure_speedup(net, teacher, dataclasses.replace(settings, batch_size=1), dtype)
                self.metrics["throughput/latency_ms"] = 1000 * one.seconds_per_call
                self.metrics["throughput/latency_speedup"] = one.speedup.value
                if one.speedup.low is not None:
                    self.metrics["throughput/latency_speedup_low"] = one.speedup.low
                    self.metrics["throughput/latency_speedup_high"] = one.speedup.high
        log_to_all(trainer, self.metrics)


def to_display(images: torch.Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> torch.Tensor:
    """Normalised images (B, C, H, W) back to RGB in [0, 1]: undo ``mean``/``std`` if known, else
    stretch each image to its own range. One channel becomes three."""
    images = images.detach().float().cpu()
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        images = images * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    else:
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        hi = images.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - lo) / (hi - lo).clamp_min(1e-8)
    images = images.clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]


def _to_pixels(mask: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch mask (B, N) → pixel mask (B, 1, H, W) of the patches' areas."""
    mask = mask.float().view(mask.shape[0], 1, *grid)
    return F.interpolate(mask, size=size, mode="nearest")


def kept_tokens_grid(
    images: torch.Tensor,
    stages: list[torch.Tensor],
    grid: tuple[int, int],
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """One row per image: the image, then one column per stage.

    A stage is either a kept-token mask (bool: dropped patches greyed out) or the group of every patch
    (int64, :mod:`dynvit.measure.groups`: each patch tinted half-way to its group's colour
    (:func:`~dynvit.measure.groups.group_colours`), so that patches merged into one token, or clustered
    together, share a colour; a patch in no group (-1) greyed out as a dropped one).

    Args:
        images: RGB images in [0, 1], (B, 3, H, W) (see :func:`to_display`).
        stages: Per stage, kept patches (B, N) bool or patch groups (B, N) int64, over the ``grid`` (rows,
            columns) of patches.
        target: Optional object patches (B, N), outlined in red in every column.

    Returns:
        A (3, H', W') image for ``torchvision.utils.save_image`` or W&B.
    """
    # Small inputs (32-64 px) are enlarged, pixel for pixel, so that a grid of them can be read.
    scale = max(1, round(128 / images.shape[-2]))
    images = F.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images
    size = tuple(images.shape[-2:])
    outline = None
    if target is not None:
        inside = _to_pixels(target.cpu(), grid, size)
        width = max(1, size[0] // 64)
        # The object's edge: inside pixels whose neighbourhood reaches outside (a morphological gradient).
        # Beyond the image counts as outside, so an object at the border is outlined there too.
        outside = 1 - F.pad(inside, (width,) * 4, value=0.0)
        eroded = 1 - F.max_pool2d(outside, 2 * width + 1, stride=1)
        outline = (inside - eroded) > 0
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    columns = [images]
    for stage in stages:
        stage = stage.cpu()
        keep = _to_pixels(stage if stage.dtype == torch.bool else stage >= 0, grid, size)
        # Dropped patches fade to mid-grey but stay faintly visible.
        shown = images * keep + (0.25 * images + 0.375) * (1 - keep)
        if stage.dtype != torch.bool:
            colours = group_colours(stage).view(stage.shape[0], *grid, 3).permute(0, 3, 1, 2)
            colours = F.interpolate(colours, size=size, mode="nearest")
            shown = (0.5 * images + 0.5 * colours) * keep + shown * (1 - keep)
        columns.append(shown)
    if outline is not None:
        columns = [torch.where(outline, red, c) for c in columns]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)
    return make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)


def picture_stages(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], str]:
    """What a picture of ``net`` on ``x`` shows per column, as its registry entry's ``reports`` allow: the
    patch groups of a clustering method or merger (:func:`dynvit.measure.groups.token_groups`), else the
    kept-token masks; and a caption.

    Raises:
        TypeError: ``net`` reports neither (a plain model).
    """
    groups = token_groups(net, x)
    if groups is not None:
        return groups, f"input, then each patch coloured by its token in {len(groups)} column(s)"
    if "masks" in reports(net):
        _, masks = net.predict_with_masks(x)
        return masks, "input, then kept after stage " + ", ".join(str(s + 1) for s in range(len(masks)))
    raise TypeError(
        f"{type(net).__name__} reports no kept tokens, merges or clusters (its registry entry's reports): "
        "there is nothing to draw"
    )


def dataset_normalisation(
    datamodule: L.LightningDataModule | None, dataset: Any
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The ``mean``/``std`` the data were normalised with, from the DataModule (attribute or
    hyper-parameter) or the dataset; (None, None) when neither says."""
    for source in (datamodule, getattr(datamodule, "hparams", None), dataset):
        if source is None:
            continue
        get = source.get if isinstance(source, dict) else lambda k, s=source: getattr(s, k, None)
        mean, std = get("mean"), get("std")
        if mean is not None and std is not None:
            as_tuple = lambda v: tuple(float(a) for a in (v if isinstance(v, (list, tuple)) else [v]))
            return as_tuple(mean), as_tuple(std)
    return None, None


class KeptTokensCallback(L.Callback):
    """A picture of what a pruned student keeps, on the first ``num_images`` validation images.

    Every ``every_n_epochs`` validation epochs (not during the sanity check) it draws one row per
    image: the input, then the patches left after each pruning stage, with dropped patches greyed
    out; for a model whose registry entry reports merges or clusters, each patch coloured by the token
    it went to instead (:func:`picture_stages`). When validation batches carry an object patch mask ``(x, y, patch_mask)`` (the cluttered
    digits), the object's patches are outlined in red. The picture is saved as
    ``<default_root_dir>/kept_tokens/epoch_XXX.png`` and logged to W&B as ``val/kept_tokens``.
    Kept-token recall itself is logged by the module (``val/recall_s*``), not here.

    Args:
        num_images: Validation images to draw (the first ones of the set, the same every time).
        every_n_epochs: Draw every that many epochs.
        dirname: Folder under the run folder for the PNG files.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, dirname: str = "kept_tokens") -> None:
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(f"num_images and every_n_epochs must be >= 1, got {num_images}, {every_n_epochs}")
        self.num_images, self.every_n_epochs, self.dirname = num_images, every_n_epochs, dirname
        self._batch: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.last_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        net, _ = networks(pl_module)
        if not {"masks", *GROUP_REPORTS} & reports(net):
            raise TypeError(
                f"KeptTokensCallback draws the tokens a pruned model keeps (or its merges and clusters), but "
                f"{type(net).__name__} reports none; use it with DynamicViTModule or a reduced ViT (or drop it "
                "from trainer.callbacks)"
            )

    def _first_images(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._batch is None:
            loader = trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, (list, tuple)) else loader
            # A plain sequential loader over the same dataset: the first images of the set on every
            # rank and every epoch, whatever sampler or shuffling validation itself uses.
            first = DataLoader(loader.dataset, batch_size=self.num_images, collate_fn=loader.collate_fn)
            x, _, *rest = next(itertools.islice(first, 1))
            self._batch = (x, rest[0] if rest else None)
        return self._batch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.current_epoch % self.every_n_epochs:
            return
        # Drawing must not move the training run's random stream: the first-images loader draws its seed from
        # it once per process, so a resumed run drew it again and trained on other Gumbel noise from then on.
        with keep_rng(pl_module.device):
            self._draw(trainer, pl_module)

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net, _ = networks(pl_module)
        x, target = self._first_images(trainer)
        param = next(net.parameters())
        was_training = net.training
        net.eval()
        try:
            stages, caption = picture_stages(net, x.to(param.device, param.dtype))
        finally:
            net.train(was_training)
        dataset = getattr(trainer.val_dataloaders, "dataset", None)
        mean, std = dataset_normalisation(trainer.datamodule, dataset)
        grid = kept_tokens_grid(to_display(x, mean, std), stages, mask_grid(net), target)
        path = Path(trainer.default_root_dir) / self.dirname / f"epoch_{trainer.current_epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/kept_tokens", images=[grid], step=trainer.global_step, caption=[caption])
