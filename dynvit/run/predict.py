"""``cli.py predict``: what a model predicts on each image, written where a person and a script can read it.

:class:`PredictionWriter` is Lightning's ``BasePredictionWriter``; the module's ``predict_step`` says what
is predicted (class probabilities, and the patches a pruning network kept). For every image it writes
one row of ``predictions.csv`` and ``predictions.json``: the image (its path, or its index in generated
data), the true class when the data has labels, the top-5 classes with their probabilities, and for a
network that drops tokens the patches kept after each stage. Such a network also gets ``masks.pt``,
the kept-patch masks of every image for scripts, and a picture per image of what each stage kept.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import save_image

from dynvit.files import write_text
from dynvit.measure.callbacks import dataset_normalisation, kept_tokens_grid, mask_grid, networks, to_display
from dynvit.models.checkpoint import save_atomic

TOP_K = 5


class PredictionWriter(BasePredictionWriter):
    """Write the predictions of ``trainer.predict`` under the run folder, and say where.

    Files, in ``out`` (``<trainer.default_root_dir>/predictions`` by default):

    - ``predictions.csv`` / ``predictions.json``: one row per image, in the predict set's order;
    - ``masks.pt`` (pruning networks): ``{"masks": (images, stages, N) bool, "images": [...], "grid":
      (rows, columns), "kept": (images, stages) int}``; ``torch.load(path)`` reads it;
    - ``groups.pt`` (merging and clustering networks): ``{"groups": (images, columns, N) int64, "images":
      [...], "grid": (rows, columns)}``, the token each patch went to (-1: none);
    - ``kept_tokens/<index>_<name>.png`` (pruning, merging and clustering networks): the first ``pictures``
      images, each drawn as the input then one column per stage: the patches kept (dropped ones greyed
      out), or, where the network merges or clusters, each patch coloured by the token it went to.

    Class names are the ones stored in the checkpoint at fit time; without them the DataModule's, else
    the class indices.

    Args:
        out: Output folder.
        pictures: How many images get a kept-token picture (0 for none).
    """

    def __init__(self, out: str | None = None, pictures: int = 64) -> None:
        super().__init__(write_interval="batch")
        if pictures < 0:
            raise ValueError(f"pictures must be >= 0, got {pictures}")
        self.out = out
        self.pictures = pictures
        self.folder: Path | None = None
        self.rows: list[dict[str, Any]] = []
        self.masks: list[torch.Tensor] = []
        self.groups: list[torch.Tensor] = []
        self.paths: dict[str, Path] = {}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            raise RuntimeError(
                "cli.py predict writes one table from one process: run it on one device (--trainer.devices 1)"
            )
        self.folder = Path(self.out) if self.out else Path(trainer.default_root_dir) / "predictions"
        self.rows, self.masks, self.groups, self.paths = [], [], [], {}
        self._remove_earlier_outputs()

    def _remove_earlier_outputs(self) -> None:
        """Remove what an earlier predict wrote here and this one may not overwrite (fewer images, a network that
        reports no masks), so that the folder describes one predict; other files are left alone."""
        for name in ("masks.pt", "groups.pt"):
            (self.folder / name).unlink(missing_ok=True)
        for picture in (self.folder / "kept_tokens").glob("[0-9][0-9][0-9][0-9][0-9]_*.png"):
            picture.unlink()

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, torch.Tensor],
        batch_indices: list[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        loader = trainer.predict_dataloaders
        loader = loader[dataloader_idx] if isinstance(loader, (list, tuple)) else loader
        dataset = loader.dataset
        probs = prediction["probs"].float().cpu()
        if batch_indices is None:
            start = len(self.rows)
            batch_indices = list(range(start, start + probs.shape[0]))
        names = class_names(pl_module, trainer.datamodule, probs.shape[1])
        labels = batch[1].tolist() if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        values, classes = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        masks = prediction.get("masks")
        kept = masks.sum(dim=-1).cpu() if masks is not None else None
        for i, index in enumerate(batch_indices):
            row: dict[str, Any] = {"image": image_name(dataset, index)}
            if labels is not None:
                row["label"] = names[int(labels[i])]
            row["top5"] = [
                {"class": names[int(c)], "prob": round(float(p), 6)} for c, p in zip(classes[i], values[i], strict=True)
            ]
            if kept is not None:
                row["kept_per_stage"] = [int(k) for k in kept[i]]
            self.rows.append(row)
        if masks is not None:
            self.masks.append(masks.cpu())
        groups = prediction.get("groups")
        if groups is not None:
            self.groups.append(groups.cpu())
        # A merger's or clustering's groups say more than its masks (which patch went where, not only which stayed).
        shown = groups if groups is not None else masks
        if shown is not None:
            self._draw(trainer, pl_module, batch, shown.cpu(), self.rows[-len(batch_indices) :], dataset)

    def _draw(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        stages: torch.Tensor,
        rows: list[dict[str, Any]],
        dataset: Any,
    ) -> None:
        """Pictures of the batch's first images, up to ``pictures`` in all; ``stages`` (B, columns, N) are
        kept-token masks (bool) or patch groups (int64), as :func:`kept_tokens_grid` draws them."""
        first = len(self.rows) - len(rows)
        wanted = max(0, min(len(rows), self.pictures - first))
        if not wanted:
            return
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        target = batch[2] if isinstance(batch, (tuple, list)) and len(batch) > 2 else None
        net, _ = networks(pl_module)
        grid = mask_grid(net)
        mean, std = dataset_normalisation(trainer.datamodule, dataset)
        display = to_display(images[:wanted], mean, std)
        folder = self.folder / "kept_tokens"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(wanted):
            columns = list(stages[i : i + 1].unbind(dim=1))
            # The data's object mask (the digits') is outlined when it is on the network's patch grid.
            fits = target is not None and target.ndim == 2 and target.shape[1] == stages.shape[-1]
            one_target = target[i : i + 1] if fits else None
            picture = kept_tokens_grid(display[i : i + 1], columns, grid, one_target)
            stem = Path(str(rows[i]["image"])).stem
            save_image(picture, folder / f"{first + i:05d}_{stem}.png")
        self.paths["pictures"] = folder

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths["csv"] = write_csv(self.rows, self.folder / "predictions.csv")
        meta = {"checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None, "model": type(pl_module).__name__}
        self.paths["json"] = write_text(
            self.folder / "predictions.json", json.dumps({**meta, "predictions": self.rows}, indent=1)
        )
        if self.masks:
            masks = torch.cat(self.masks)
            net, _ = networks(pl_module)
            self.paths["masks"] = self.folder / "masks.pt"
            save_atomic(
                {
                    "masks": masks,
                    "kept": masks.sum(dim=-1),
                    "images": [row["image"] for row in self.rows],
                    "grid": list(mask_grid(net)),
                },
                self.paths["masks"],
            )
        if self.groups:
            net, _ = networks(pl_module)
            self.paths["groups"] = self.folder / "groups.pt"
            save_atomic(
                {
                    "groups": torch.cat(self.groups),
                    "images": [row["image"] for row in self.rows],
                    "grid": list(mask_grid(net)),
                },
                self.paths["groups"],
            )
        order = ("csv", "json", "masks", "groups", "pictures")
        print(f"predicted {len(self.rows)} image(s); wrote:")
        print("\n".join(f"  {self.paths[k]}" for k in order if k in self.paths))


def image_name(dataset: Any, index: int) -> str | int:
    """How a predict-set item is named in the table: its file (image folders), else its index."""
    files = getattr(dataset, "files", None)
    if files is not None:
        return files[index]
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return samples[index][0]
    return index


def class_names(pl_module: L.LightningModule, datamodule: Any, num_classes: int) -> list[str]:
    """The checkpoint's class names, else the DataModule's, else the class indices as text."""
    for names in (getattr(pl_module, "class_names", None), getattr(datamodule, "class_names", None)):
        if names is not None and len(names) == num_classes:
            return [str(n) for n in names]
    return [str(k) for k in range(num_classes)]


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """The rows as a flat table: image, label, top1_class, top1_prob, …, kept_s1, …"""
    flat = []
    for row in rows:
        entry = {"image": row["image"]}
        if "label" in row:
            entry["label"] = row["label"]
        for k, top in enumerate(row["top5"], start=1):
            entry[f"top{k}_class"], entry[f"top{k}_prob"] = top["class"], top["prob"]
        for s, kept in enumerate(row.get("kept_per_stage", []), start=1):
            entry[f"kept_s{s}"] = kept
        flat.append(entry)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(flat[0]) if flat else ["image"])
    writer.writeheader()
    writer.writerows(flat)
    return write_text(path, text.getvalue())
