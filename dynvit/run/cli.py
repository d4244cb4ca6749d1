"""``python cli.py {fit,validate,test,predict,benchmark,sweep,export} --config experiments/<name>.yaml`` on LightningCLI."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dynvit.measure.callbacks import FlopsCallback, ThroughputCallback, networks
from dynvit.run.benchmark import sweep_matches
from dynvit.run.loggers import WandbOptions, default_loggers
from dynvit.run.report import format_matches, write_matches
from dynvit.run.sweep import (
    SweepResult,
    SweepSpec,
    check_parameters,
    check_points_parse,
    fit_config_text,
    fit_point,
    grid,
    load_sweep,
    prepare_folder,
    run_sweep,
    sweep_environment,
    teacher_row,
)
from dynvit.run.trainer import DynViTTrainer

DEFAULT_RUN_DIR = "runs/default"


class DynViTCLI(LightningCLI):
    """LightningCLI with dynvit's defaults.

    - model and data classes are chosen by ``class_path`` in the YAML;
    - the DataModule's ``num_classes``, ``img_size`` and ``in_chans`` are linked into the model;
    - checkpoints of the best ``val/top1`` and the last epoch go to ``<default_root_dir>/checkpoints``
      (Lightning writes them through a temporary file, so a crash never leaves half a checkpoint;
      ``--ckpt_path last`` resumes);
    - metrics go to a CSV log and to W&B, offline unless ``--wandb.online true``;
    - GFLOPs (``flops``) and, at the end of fit, images/s (``throughput``) are measured by default;
    - ``benchmark`` (``--methods`` compares other token reducers, ``--precision``/``--backend`` deployment
      variants), ``sweep`` and ``export`` (ONNX) subcommands (see :class:`~dynvit.run.trainer.DynViTTrainer`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_class", DynViTTrainer)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"callbacks": [LearningRateMonitor(logging_interval="step")]})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        extra = {name: {"model", "datamodule"} for name in ("benchmark", "sweep", "export")}
        return {**LightningCLI.subcommands(), **extra}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Measurement callbacks on by default, configurable as `--flops.*` / `--throughput.*`.
        parser.add_lightning_class_args(FlopsCallback, "flops")
        parser.add_lightning_class_args(ThroughputCallback, "throughput")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.default_root_dir": DEFAULT_RUN_DIR,
            }
        )
        parser.add_class_arguments(WandbOptions, "wandb")
        for name in ("num_classes", "img_size", "in_chans"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        run_dir = Path(trainer_cfg.get("default_root_dir") or DEFAULT_RUN_DIR)
        # Under `wandb agent` every point runs the same config: give each its own run folder.
        if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
            run_dir = run_dir / f"sweep-{os.environ['WANDB_SWEEP_ID']}" / os.environ["WANDB_RUN_ID"]
            trainer_cfg["default_root_dir"] = str(run_dir)
        checkpoint = self._get(self.config_init, "checkpoint")
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(run_dir / "checkpoints")
        # `logger: true` (the default) means "dynvit's loggers"; any explicit choice is the user's.
        if trainer_cfg.get("logger") in (None, True):
            wandb = self._get(self.config_init, "wandb")
            options = wandb if isinstance(wandb, WandbOptions) else WandbOptions(**dict(wandb))
            kwargs["logger"] = default_loggers(run_dir, options)
        return super().instantiate_trainer(**kwargs)

    def sweep(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        sweep: str = "experiments/sweep_keep_ratio.yaml",
        out: str | None = None,
    ) -> SweepResult:
        """``cli.py sweep`` (arguments declared by ``DynViTTrainer.sweep``): check the sweep against this
        config, then train the grid's unfinished points one by one and write the summary, plus, for the
        swept keep ratios, the ToMe r and EViT keep rate of the same GFLOPs (``matched.csv``/``.json``)."""
        spec = load_sweep(sweep)
        check_parameters(spec, self.config["sweep"], networks(model)[0])
        folder = Path(out) if out else Path(self.trainer.default_root_dir) / spec.path.stem
        text = fit_config_text(self._parser("sweep"), self.config["sweep"], self._subcommand_method_arguments["sweep"])
        config_path = prepare_folder(folder, text)
        check_points_parse(self._parser("fit"), config_path, grid(spec))
        self.sweep_result = run_sweep(
            spec,
            folder,
            config_path,
            fit=partial(fit_point, type(self)),
            teacher=lambda: teacher_row(model, datamodule, self.trainer),
            environment=sweep_environment(self.trainer),
        )
        self._write_matches(spec, model, folder)
        return self.sweep_result

    @staticmethod
    def _write_matches(spec: SweepSpec, model: LightningModule, folder: Path) -> None:
        """``matched.csv``/``.json``: the ToMe r and EViT keep rate with the GFLOPs of each swept keep ratio
        (kept from an earlier run of the same sweep, as the points are)."""
        ratios = sorted(
            {float(v) for key, vs in spec.parameters.items() if key.rsplit(".", 1)[-1] == "keep_ratio" for v in vs}
        )
        if not ratios:
            return
        cached = folder / "matched.json"
        matches = json.loads(cached.read_text()) if cached.is_file() else None
        if matches is None or sorted(r["keep_ratio"] for r in matches) != ratios:
            matches = sweep_matches(*networks(model), ratios)
        if matches:
            paths = write_matches(matches, folder)
            print(format_matches(matches))
            print("\n".join(f"wrote {p}" for p in paths.values()))


def main(args: list[str] | None = None) -> None:
    DynViTCLI(args=args)


if __name__ == "__main__":
    main()
