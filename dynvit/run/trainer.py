"""Lightning's Trainer with the methods behind ``cli.py benchmark`` and ``cli.py sweep``.

LightningCLI builds each subcommand's arguments from the Trainer method of the same name, so the
two extra subcommands are declared here and read the same ``--config`` as ``fit``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from dynvit import methods as registry
from dynvit.deploy import Choice, Tolerance, export_onnx, fastest, speedup_over
from dynvit.deploy.fastest import RECORD_SUFFIX, choice_path
from dynvit.deploy.onnx import TOLERANCE, ExportError, OnnxCheck, check_onnx
from dynvit.files import check_output_file, check_output_folder, staged, write_text
from dynvit.measure.callbacks import networks
from dynvit.measure.evaluate import LimitedLoader
from dynvit.measure.throughput import SpeedSettings, check_device, check_speed_settings, random_images
from dynvit.models import load_checkpoint
from dynvit.reducers.matching import check_methods, on_teacher, student_at
from dynvit.run.benchmark import (
    DEFAULT_RATIOS,
    BenchmarkResult,
    benchmark_plan,
    check_benchmark,
    check_precisions,
    first_images,
    report,
    timing_images,
)
from dynvit.run.run_folder import describe_teachers

# Validation images `export` checks its ONNX file on by default.
CHECK_IMAGES = 16


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
        methods: Sequence[str] | str = ("dynamicvit",),
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
            precision: Comma-separated precisions of every row, e.g. ``fp32,bf16,int8`` (float32 always);
                or ``auto``: at each ratio, every deployment path of the student that applies on this
                machine, checked against float32 and timed (:func:`dynvit.deploy.fastest`), and the
                fastest chosen; ``<out>/rho_<ρ>.choice.json`` records each choice (``backend`` and
                ``latency`` do not apply).
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
            accuracy: Measure validation top-1 (and kept-token recall and merge purity when batches
                carry patch masks) on the DataModule's validation set, every row on the same images: the
                batches ``--trainer.limit_val_batches`` lets fit's validation see.
            methods: What to measure at each ratio, e.g. ``--methods [dynamicvit,tome,evit,ats,topk,random]``,
                or ``--methods all``: any registered method (``dynvit.methods.registered()``). The student's own
                method is the student; other learned methods are built from the teacher with their new modules
                at init (rows ``patchmerger (at init)``), training-free ones run on the teacher's weights.
            calibration_images: Validation images a method whose cost varies per image (ATS) is matched on.
        """
        if precision != "auto":
            try:
                check_precisions(precision)
            except ValueError as e:
                raise ValueError(
                    f"{e} (or --precision auto: every deployment path here, measured, the fastest chosen)"
                ) from None
        elif check_methods(methods) != ["dynamicvit"]:
            raise ValueError(
                f"--precision auto measures the student's deployment paths, not other methods: drop --methods {methods}"
            )
        if calibration_images < 1:
            raise ValueError(f"--calibration_images must be >= 1, got {calibration_images}")
        _check_timing_options(
            device, batch_size=batch_size, pairs=pairs, block_time=block_time, warmup_time=warmup_time, threads=threads
        )
        out_dir = Path(out) if out else Path(self.default_root_dir) / "benchmark"
        check_output_folder(out_dir, "--out")
        student, teacher = networks(model)
        # Every argument is checked against this student and teacher before anything is loaded or measured.
        plan = check_benchmark(student, teacher, ratios, methods, "fp32" if precision == "auto" else precision, backend)
        settings = SpeedSettings(
            batch_size=batch_size,
            device=device or self.strategy.root_device,
            pairs=pairs,
            block_time=block_time,
            warmup_time=warmup_time,
            threads=threads,
            keep_freed_memory=keep_freed_memory,
        )
        if ckpt_path is not None:
            load_checkpoint(student, ckpt_path)
        for line in describe_teachers(ckpt_path, getattr(model, "teacher_record", None)):
            print(line)
        imaged = [m for m in on_teacher(student, plan.methods) if registry.get(m).cost == "images"]
        loader = calibration = None
        if (accuracy or imaged) and datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("validate")
            # Every row is scored on the images fit's validation would see (--trainer.limit_val_batches).
            loader = LimitedLoader(datamodule.val_dataloader(), self.limit_val_batches)
        if imaged:
            if loader is None:
                raise ValueError(f"{imaged} are matched on validation images: give the config a DataModule")
            calibration = first_images(loader, calibration_images)
        if precision == "auto":
            return self._fastest_per_ratio(
                student, teacher, plan.ratios, loader if accuracy else None, settings, out_dir
            )
        result = benchmark_plan(
            student,
            teacher,
            plan,
            loader if accuracy else None,
            settings,
            calibration,
            latency=latency,
            onnx_dir=out_dir / "onnx",
        )
        # A figure's title holds a few names; `--methods all` is counted instead.
        names = ", ".join(plan.methods) if len(plan.methods) <= 6 else f"{len(plan.methods)} methods"
        report(result, out_dir, title=f"{type(model).__name__}: {names} vs teacher")
        return result

    @staticmethod
    def _fastest_per_ratio(
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        ratios: Sequence[float],
        loader,
        settings: SpeedSettings,
        out_dir: Path,
    ) -> dict[float, Choice]:
        """``benchmark --precision auto``: :func:`dynvit.deploy.fastest` of the student at each ratio, and the
        chosen path timed against the float32 eager teacher."""
        model_at, original = student_at(student), student.keep_ratio
        images = timing_images(loader, student, settings.batch_size)
        was_training = student.training, teacher.training
        choices = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            teacher.eval()
            for ratio in sorted(ratios, reverse=True):
                choice = fastest(model_at(ratio).eval(), images, loader, settings=settings)
                over = speedup_over(teacher, choice, images, settings)
                record = out_dir / f"rho_{ratio:g}{RECORD_SUFFIX}"
                data = {**choice.record(), "over_teacher": dataclasses.asdict(over)}
                write_text(record, json.dumps(data, indent=2, default=str) + "\n")
                print(f"\nρ = {ratio:g}, checked on {choice.checked_on}; chosen: {choice.chosen.path.name}")
                print(choice.table())
                print(f"{choice.chosen.path.name} over the float32 eager teacher: {over}")
                print(f"wrote {record}")
                choices[ratio] = choice
        finally:
            model_at(original)
            student.train(was_training[0])
            teacher.train(was_training[1])
        return choices

    def export(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        format: Literal["onnx"] = "onnx",
        out: str = "model.onnx",
        keep_ratio: float | None = None,
        check_images: int = CHECK_IMAGES,
        check: bool = True,
        check_tolerance: float = TOLERANCE,
        auto: bool = False,
        batch_size: int = 32,
        pairs: int = 10,
        compile: bool = False,
        agreement: float = 0.99,
        agreement_images: int = 1000,
        device: str | None = None,
    ) -> Path:
        """Write the eval-mode network of this config (the student, or a teacher config's model) as ONNX,
        or, with ``--auto``, as the fastest deployment path measured on this machine.

        The batch size is dynamic; a student's token counts are those its keep ratio fixes. The file
        is checked in onnxruntime against eager PyTorch on the first validation images (random
        images without a DataModule; :func:`~dynvit.deploy.onnx.check_onnx`): each image's logits must
        agree, or the two runtimes must have kept different tokens only where their keep scores tie at a
        top-k cut (which the check reports). A file that fails the check, or an op that cannot be
        exported, is refused and no file is left.

        With ``--auto`` every path that applies here is checked against float32 (top-1 agreement on
        the validation images, else logits on the timing batch) and timed at ``batch_size``
        (:func:`dynvit.deploy.fastest`); the table is printed and the chosen artifact is written:
        ``<out stem>.onnx`` for an onnxruntime path, else ``<out stem>.pt`` (the stem: ``out`` less an
        ``.onnx`` or ``.pt`` suffix; load either with :func:`dynvit.deploy.load_deployed`), with
        ``<out stem>.choice.json`` beside it.

        Args:
            ckpt_path: Weights to export (a ``.ckpt`` of this toolkit or a released checkpoint).
            format: ``onnx``.
            out: The file to write.
            keep_ratio: Export a student at this keep ratio instead of its configured one.
            check_images: Validation images the export is checked on.
            check: Check the file in onnxruntime; ``false`` writes it unchecked, with a warning.
            check_tolerance: Largest relative logit difference (to the largest eager logit) the check
                accepts; raising it above the default is warned about. ``check``, ``check_tolerance`` and
                ``check_images`` do not apply with ``auto`` (which checks by ``agreement``): given, they are
                warned about.
            auto: Measure every deployment path here and write the fastest within the tolerance.
            batch_size: With ``auto``: images per timed call (the batch the model will serve).
            pairs: With ``auto``: timing rounds.
            compile: With ``auto``: also try ``torch.compile`` paths (minutes of compilation).
            agreement: With ``auto``: least top-1 agreement with float32 on the validation images.
            agreement_images: With ``auto``: validation images predictions are compared on.
            device: With ``auto``: ``cpu`` or a GPU; by default the trainer's device.
        """
        if format != "onnx":
            raise ValueError(f"unknown export format {format!r}: choose 'onnx'")
        if not check_tolerance > 0:
            raise ValueError(f"--check_tolerance must be > 0, got {check_tolerance}")
        if check_images < 1:
            raise ValueError(f"--check_images must be >= 1, got {check_images}")
        check_output_file(out, "--out", writable=True)
        tolerance = _check_auto_options(batch_size, pairs, agreement, agreement_images, device) if auto else None
        if auto:
            _warn_check_options_unused(check, check_tolerance, check_images)
        net, _ = networks(model)
        if keep_ratio is not None:
            student_at(net)(keep_ratio)
        if ckpt_path is not None:
            load_checkpoint(net, ckpt_path)
        examples, loader = random_images(net, 2), None
        if datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("validate")
            loader = datamodule.val_dataloader()
            if not auto:  # --auto checks every path on its own images (--agreement_images)
                examples = torch.cat(first_images(loader, check_images))
        if check and check_tolerance > TOLERANCE and not auto:
            rank_zero_warn(
                f"--check_tolerance {check_tolerance:g} accepts larger differences than the default {TOLERANCE:g}"
            )
        was_training = net.training
        path = Path(out)
        try:
            if auto:
                return self._export_fastest(
                    net.eval(), loader, out, batch_size, pairs, compile, tolerance, agreement_images, device
                )
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

    def _export_fastest(
        self,
        net: torch.nn.Module,
        loader,
        out: str,
        batch_size: int,
        pairs: int,
        compile: bool,
        tolerance: Tolerance,
        agreement_images: int,
        device: str | None,
    ) -> Path:
        """``export --auto``: the fastest path of ``net`` measured here, written with its choice record."""
        settings = SpeedSettings(batch_size=batch_size, device=device or self.strategy.root_device, pairs=pairs)
        images = timing_images(loader, net, batch_size)
        choice = fastest(
            net,
            images,
            loader,
            tolerance,
            settings,
            compile=compile,
            check_images=agreement_images,
        )
        print(f"checked on {choice.checked_on}; every speedup over float32 eager at batch {batch_size}")
        print(choice.table())
        artifact = choice.save(out)
        print(f"chosen: {choice.chosen.path.name}; wrote {artifact} and {choice_path(artifact)}")
        return artifact

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


def _check_timing_options(device: str | None, **settings: Any) -> None:
    """The timing options ``benchmark`` and ``export --auto`` take (``settings``: :class:`SpeedSettings` fields) and
    ``--device``, each error naming its option, before anything is loaded or measured."""
    check_speed_settings("--", **settings)
    if device is not None:
        check_device(device, "--device")


def _check_auto_options(
    batch_size: int, pairs: int, agreement: float, agreement_images: int, device: str | None
) -> Tolerance:
    """``export --auto``'s options checked before anything is loaded or measured (each error names its
    option); returns the tolerance ``--agreement`` sets."""
    _check_timing_options(device, batch_size=batch_size, pairs=pairs)
    if agreement_images < 1:
        raise ValueError(f"--agreement_images must be >= 1, got {agreement_images}")
    try:
        return Tolerance(agreement=agreement)
    except ValueError:
        raise ValueError(
            f"--agreement {agreement}: give the least top-1 agreement with float32 as a fraction in [0, 1], e.g. 0.99"
        ) from None


def _warn_check_options_unused(check: bool, check_tolerance: float, check_images: int) -> None:
    """Warn about the ONNX check's options given with ``--auto``, which checks every path its own way (top-1
    agreement with float32 on ``--agreement_images``; its onnxruntime paths' exports are checked at the
    default tolerance), so they would otherwise be dropped without a word."""
    given = [
        option
        for option, used in (
            ("--check false", not check),
            (f"--check_tolerance {check_tolerance:g}", check_tolerance != TOLERANCE),
            (f"--check_images {check_images}", check_images != CHECK_IMAGES),
        )
        if used
    ]
    if given:
        rank_zero_warn(
            f"ignored with --auto: {', '.join(given)}. --auto checks every path by its top-1 agreement with float32 "
            "(--agreement, on --agreement_images validation images) instead; drop them"
        )


def checked_export(net: torch.nn.Module, staging: Path, images: torch.Tensor, tolerance: float, out: Path) -> OnnxCheck:
    """:func:`~dynvit.deploy.onnx.check_onnx` of ``cli.py export``'s file, whose error says how to export anyway."""
    try:
        return check_onnx(net, staging, images, tolerance)
    except ExportError as e:
        raise ExportError(
            f"{e}. {out} was not written; to write it anyway: --check_tolerance <larger> or --check false"
        ) from e
