"""Lightning's Trainer with the methods behind ``cli.py benchmark`` and ``cli.py sweep``.

LightningCLI builds each subcommand's arguments from the Trainer method of the same name, so the
two extra subcommands are declared here and read the same ``--config`` as ``fit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from dynvit.deploy import export_onnx
from dynvit.deploy.onnx import TOLERANCE, ExportError, OnnxCheck, check_onnx, staged
from dynvit.measure.callbacks import networks
from dynvit.measure.throughput import SpeedSettings, random_images
from dynvit.models import load_checkpoint
from dynvit.run.benchmark import (
    DEFAULT_RATIOS,
    LABELS,
    BenchmarkResult,
    benchmark,
    check_comparable,
    check_methods,
    check_precisions,
    check_ratios,
    dynamicvit_at,
    first_images,
    report,
)
from dynvit.run.run_folder import describe_teachers


class DynViTTrainer(L.Trainer):
    """A ``lightning.Trainer`` that can also benchmark a pruned model and declare a keep-ratio sweep."""

    def benchmark(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        ratios: Sequence[float] = DEFAULT_RATIOS,
        out: str | None = None,
        batch_size: int = 64,
        precision: str = "fp32",
        backend: Literal["eager", "onnxruntime"] = "eager",
        latency: bool = True,
        device: str | None = None,
        pairs: int = 30,
        block_time: float = 0.1,
        warmup_time: float = 0.3,
        threads: int | None = None,
        keep_freed_memory: bool = True,
        accuracy: bool = True,
        methods: Sequence[str] = ("dynamicvit",),
        calibration_images: int = 256,
    ) -> BenchmarkResult:
        """Cost, speed and accuracy of one set of weights at several keep ratios, and of the teacher;
        optionally of other token-reduction methods on the teacher's weights at the same GFLOPs, in
        reduced precision and in onnxruntime.

        The student's ``keep_ratio`` is set to each ratio in turn; the weights stay the same. Every
        other method runs training-free on the teacher, set to DynamicViT's GFLOPs at each ratio
        (see :mod:`dynvit.run.benchmark`). Speedups are medians of paired timings with the float32
        teacher, with 95 % intervals. Writes ``results.csv``, ``results.json`` and ``tradeoff.png``
        (with the machine and settings) and prints the table.

        Args:
            ckpt_path: Student weights (a ``.ckpt`` of this toolkit or a released DynamicViT file);
                by default the weights the config builds.
            ratios: Keep ratios in (0, 1], e.g. ``--ratios [0.5,0.7,0.9]``.
            out: Output folder; ``<trainer.default_root_dir>/benchmark`` by default.
            batch_size: Images per timed call.
            precision: Comma-separated precisions of every row, e.g. ``fp32,bf16,int8`` (float32 always).
            backend: ``onnxruntime`` also times every row's exported ONNX file beside eager PyTorch
                (the files go to ``<out>/onnx``).
            latency: Also time every row at batch 1.
            device: ``cpu``, ``cuda``, ``cuda:1``, …; by default the trainer's device.
            pairs: Timing rounds; each gives every row one time ratio to the teacher.
            block_time: Seconds each timed block lasts at least.
            warmup_time: Seconds of untimed calls per row before timing.
            threads: CPU threads while timing (by default torch's setting).
            keep_freed_memory: Make glibc keep freed memory in the heap before timing, so that large
                tensors page-fault in no call rather than in some processes' calls
                (:mod:`dynvit.measure.allocator`); ``false`` times with glibc's default.
            accuracy: Measure validation top-1 (and kept-token recall when batches carry patch
                masks) on the DataModule's validation set.
            methods: What to measure at each ratio, e.g. ``--methods [dynamicvit,tome,evit,ats,topk,random]``:
                ``dynamicvit`` (the student) and the training-free reducers of :mod:`dynvit.reducers`.
            calibration_images: Validation images ATS's K is matched on (its cost varies per image).
        """
        ratios = check_ratios(ratios)
        methods = check_methods(methods)
        precisions = check_precisions(precision)
        if calibration_images < 1:
            raise ValueError(f"calibration_images must be >= 1, got {calibration_images}")
        settings = SpeedSettings(
            batch_size=batch_size,
            device=device or self.strategy.root_device,
            pairs=pairs,
            block_time=block_time,
            warmup_time=warmup_time,
            threads=threads,
            keep_freed_memory=keep_freed_memory,
        )
        student, teacher = networks(model)
        model_at = dynamicvit_at(student)
        check_comparable(student, teacher, methods)
        # Every ratio must fit this model (e.g. keep at least one token per stage) before any measuring.
        original = student.keep_ratio
        for ratio in ratios:
            model_at(ratio)
        model_at(original)
        if ckpt_path is not None:
            load_checkpoint(student, ckpt_path)
        for line in describe_teachers(ckpt_path, getattr(model, "teacher_record", None)):
            print(line)
        loader = calibration = None
        if (accuracy or "ats" in methods) and datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("validate")
            loader = datamodule.val_dataloader()
        if "ats" in methods:
            if loader is None:
                raise ValueError("ATS is matched on validation images: give the config a DataModule")
            calibration = first_images(loader, calibration_images)
        out_dir = Path(out) if out else Path(self.default_root_dir) / "benchmark"
        result = benchmark(
            student,
            teacher,
            ratios,
            methods,
            loader if accuracy else None,
            settings,
            calibration,
            precisions=precisions,
            backend=backend,
            latency=latency,
            onnx_dir=out_dir / "onnx",
        )
        names = ", ".join(LABELS.get(m, m) for m in methods)
        report(result, out_dir, title=f"{type(model).__name__}: {names} vs teacher")
        return result

    def export(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        format: Literal["onnx"] = "onnx",
        out: str = "model.onnx",
        keep_ratio: float | None = None,
        check_images: int = 16,
        check: bool = True,
        check_tolerance: float = TOLERANCE,
    ) -> Path:
        """Write the eval-mode network of this config (the student, or a teacher config's model) as ONNX.

        The batch size is dynamic; a student's token counts are those its keep ratio fixes. The file
        is checked in onnxruntime against eager PyTorch on the first validation images (random
        images without a DataModule; :func:`~dynvit.deploy.onnx.check_onnx`): each image's logits must
        agree, or the two runtimes must have kept different tokens only where their keep scores tie at a
        top-k cut (which the check reports). A file that fails the check, or an op that cannot be
        exported, is refused and no file is left.

        Args:
            ckpt_path: Weights to export (a ``.ckpt`` of this toolkit or a released checkpoint).
            format: ``onnx``.
            out: The file to write.
            keep_ratio: Export a student at this keep ratio instead of its configured one.
            check_images: Validation images the export is checked on.
            check: Check the file in onnxruntime; ``false`` writes it unchecked, with a warning.
            check_tolerance: Largest relative logit difference (to the largest eager logit) the check
                accepts; raising it above the default is warned about.
        """
        if format != "onnx":
            raise ValueError(f"unknown export format {format!r}: choose 'onnx'")
        if not check_tolerance > 0:
            raise ValueError(f"check_tolerance must be > 0, got {check_tolerance}")
        net, _ = networks(model)
        if keep_ratio is not None:
            dynamicvit_at(net)(keep_ratio)
        if ckpt_path is not None:
            load_checkpoint(net, ckpt_path)
        examples = random_images(net, 2)
        if datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("validate")
            examples = torch.cat(first_images(datamodule.val_dataloader(), check_images))
        if check and check_tolerance > TOLERANCE:
            rank_zero_warn(
                f"--check_tolerance {check_tolerance:g} accepts larger differences than the default {TOLERANCE:g}"
            )
        was_training = net.training
        path = Path(out)
        try:
            # Written through a temporary file: a failed export or check leaves `out` as it was.
            with staged(path) as staging:
                export_onnx(net.eval(), staging, images=examples, check=False)
                found = checked_export(net, staging, examples, check_tolerance, path) if check else None
        finally:
            net.train(was_training)
        if found is None:
            print(f"wrote {path}")
            rank_zero_warn(f"{path} was not checked in onnxruntime against eager PyTorch (--check false)")
        else:
            print(f"wrote {path} ({found})")
        return path

    def sweep(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        sweep: str = "experiments/sweep_keep_ratio.yaml",
        out: str | None = None,
    ) -> None:
        """Train one run per point of a W&B grid sweep file, locally, and summarise them.

        Args:
            sweep: A W&B sweep file (``method: grid``) whose parameters are keys of this config,
                e.g. ``model.init_args.keep_ratio``.
            out: Sweep folder; ``<trainer.default_root_dir>/<sweep file name>`` by default.
        """
        # Each point is a fresh `fit` built from the config, which only the CLI can do; DynViTCLI.sweep runs it.
        raise RuntimeError("a sweep builds one training run per point from the config: run `python cli.py sweep`")


def checked_export(net: torch.nn.Module, staging: Path, images: torch.Tensor, tolerance: float, out: Path) -> OnnxCheck:
    """:func:`~dynvit.deploy.onnx.check_onnx` of ``cli.py export``'s file, whose error says how to export anyway."""
    try:
        return check_onnx(net, staging, images, tolerance)
    except ExportError as e:
        raise ExportError(
            f"{e}. {out} was not written; to write it anyway: --check_tolerance <larger> or --check false"
        ) from e
