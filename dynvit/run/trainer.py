"""Lightning's Trainer with the methods behind ``cli.py benchmark`` and ``cli.py sweep``.

LightningCLI builds each subcommand's arguments from the Trainer method of the same name, so the
two extra subcommands are declared here and read the same ``--config`` as ``fit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L

from dynvit.measure.callbacks import Dtype, networks, parse_dtype
from dynvit.models import load_checkpoint
from dynvit.run.benchmark import DEFAULT_RATIOS, SpeedSettings, check_ratios, dynamicvit_at
from dynvit.run.compare import LABELS, check_comparable, check_methods, compare, first_images
from dynvit.run.report import ResultRow, format_table, write_report
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
        dtype: Dtype = "fp32",
        device: str | None = None,
        warmup: int = 3,
        repeats: int = 10,
        rounds: int = 3,
        accuracy: bool = True,
        methods: Sequence[str] = ("dynamicvit",),
        calibration_images: int = 256,
    ) -> list[ResultRow]:
        """Cost, speed and accuracy of one set of weights at several keep ratios, and of the teacher;
        optionally of other token-reduction methods on the teacher's weights at the same GFLOPs.

        The student's ``keep_ratio`` is set to each ratio in turn; the weights stay the same. Every
        other method runs training-free on the teacher, set to DynamicViT's GFLOPs at each ratio
        (see :mod:`dynvit.run.compare`). Writes ``results.csv``, ``results.json`` and ``tradeoff.png``
        and prints the table.

        Args:
            ckpt_path: Student weights (a ``.ckpt`` of this toolkit or a released DynamicViT file);
                by default the weights the config builds.
            ratios: Keep ratios in (0, 1], e.g. ``--ratios [0.5,0.7,0.9]``.
            out: Output folder; ``<trainer.default_root_dir>/benchmark`` by default.
            batch_size: Images per timed forward pass.
            dtype: ``fp32``, ``bf16`` or ``fp16`` (autocast) for timing and accuracy.
            device: ``cpu``, ``cuda``, ``cuda:1``, …; by default the trainer's device.
            warmup: Untimed passes before timing.
            repeats: Timed passes per round (the median is reported).
            rounds: Rounds over all rows in turn; each row reports its median round.
            accuracy: Measure validation top-1 (and kept-token recall when batches carry patch
                masks) on the DataModule's validation set.
            methods: What to measure at each ratio, e.g. ``--methods [dynamicvit,tome,evit,ats,topk,random]``:
                ``dynamicvit`` (the student) and the training-free reducers of :mod:`dynvit.reducers`.
            calibration_images: Validation images ATS's K is matched on (its cost varies per image).
        """
        ratios = check_ratios(ratios)
        methods = check_methods(methods)
        if calibration_images < 1:
            raise ValueError(f"calibration_images must be >= 1, got {calibration_images}")
        settings = SpeedSettings(
            batch_size=batch_size,
            dtype=parse_dtype(dtype),
            device=device or self.strategy.root_device,
            warmup=warmup,
            repeats=repeats,
            rounds=rounds,
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
        rows, _ = compare(student, teacher, ratios, methods, loader if accuracy else None, settings, calibration)
        model_at(original)
        out_dir = Path(out) if out else Path(self.default_root_dir) / "benchmark"
        names = ", ".join(LABELS.get(m, m) for m in methods)
        paths = write_report(rows, out_dir, title=f"{type(model).__name__}: {names} vs teacher")
        print(format_table(rows))
        print("\n".join(f"wrote {p}" for p in paths.values()))
        return rows

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
