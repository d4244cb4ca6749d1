"""``python cli.py {fit,validate,test,predict,benchmark,sweep,export} --config experiments/<name>.yaml`` on LightningCLI."""

from __future__ import annotations

import itertools
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from dynvit.data.imagefolder import ImageFolderDataModule, use_stored_preprocessing
from dynvit.files import check_output_folder
from dynvit.lightning.base import ImageClassification
from dynvit.measure.callbacks import FlopsCallback, ThroughputCallback, networks
from dynvit.models.checkpoint import is_lightning_checkpoint
from dynvit.run.benchmark import sweep_matches
from dynvit.run.errors import TRACEBACK_ENV, run_reporting_errors, short_parser_error
from dynvit.run.loggers import WandbOptions, default_loggers, quiet_known_noise
from dynvit.run.predict import PredictionWriter
from dynvit.run.report import format_matches, write_matches
from dynvit.run.run_folder import (
    LAST,
    LastCheckpoint,
    check_fit_folder,
    read_checkpoint,
    read_ckpt_path,
    read_progress,
    resolve_last,
)
from dynvit.run.sweep import (
    SweepResult,
    SweepSpec,
    check_parameters,
    check_points,
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
# Subcommands whose --ckpt_path restores a Lightning run (the others load weights from any checkpoint).
RUN_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# --ckpt_path values that name no file: Lightning's own, and dynvit's `last` (resolved before the run).
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")


class DynViTArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose errors end the run with one line: the option, what is wrong with it and,
    for a typo, the nearest valid option or value (:func:`~dynvit.run.errors.short_parser_error`), instead
    of the usage and jsonargparse's tree of subtypes tried. ``DYNVIT_TRACEBACK=1`` shows jsonargparse's own."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # While jsonargparse tries subtypes it raises instead of exiting: that error is not the user's yet.
        if not self.exit_on_error or os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [option for action in parser._actions for option in action.option_strings]
        sys.stdout.flush()
        print(f"error: {short_parser_error(message, options)}", file=sys.stderr)
        sys.exit(2)


class DynViTCLI(LightningCLI):
    """LightningCLI with dynvit's defaults.

    - model and data classes are chosen by ``class_path`` in the YAML;
    - the DataModule's ``num_classes`` and ``in_chans`` are linked into the model; the model decides its
      input size (its own resolution unless ``img_size`` is given) and the DataModule follows it: right
      after both are built, ``datamodule.follow(model)`` gives it the size and the preprocessing of the
      model's weights, so the backbone is named once, in the model;
    - checkpoints go to ``<default_root_dir>/checkpoints``: ``best-*.ckpt``, the best ``val/top1``, and
      ``last.ckpt``, the end of the most recent epoch whatever the metric did (both written through a
      temporary file, so a crash never leaves half a checkpoint);
    - a run folder holds one run: ``fit`` into a folder that holds one continues it with
      ``--ckpt_path last`` or is refused; ``--ckpt_path last`` needs a ``last.ckpt``, and on a finished
      run trains nothing;
    - metrics go to a CSV log and to W&B, offline unless ``--wandb.online true``: a fit's into the run folder
      (a resumed fit goes on in the same ``metrics.csv`` and W&B run), any other subcommand's into
      ``<run folder>/<subcommand>/`` (:func:`~dynvit.run.loggers.default_loggers`);
    - ``--ckpt_path`` is checked before Lightning reads it, a parser error is one line naming the option
      (:class:`DynViTArgumentParser`), and more CPU processes than cores are warned about;
    - a config or data mistake stops the run before its run folder is made: an image folder's checks
      (its ``setup()``) run right after it is built, and trainer options Lightning would refuse with a
      traceback (``max_epochs`` below -1, a GPU accelerator without a GPU) are checked before the Trainer;
    - GFLOPs (``flops``) and, at the end of fit, images/s (``throughput``) are measured by default;
    - ``predict`` writes a table of predictions (and kept-token masks and pictures) under the run
      folder (:class:`~dynvit.run.predict.PredictionWriter`, configurable as ``--prediction.*``);
    - ``benchmark`` (``--methods`` compares other token reducers, ``--precision``/``--backend`` deployment
      variants), ``sweep`` and ``export`` (ONNX) subcommands (see :class:`~dynvit.run.trainer.DynViTTrainer`).
    """

    finished: Path | None = None
    """After ``fit --ckpt_path …`` on a run that had already finished: that checkpoint (nothing was trained)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", DynViTArgumentParser)
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_class", DynViTTrainer)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"callbacks": [LearningRateMonitor(logging_interval="step")]})
        quiet_known_noise()
        command_line = kwargs.get("args")
        command_line = sys.argv[1:] if command_line is None else command_line
        self.typed_model_options = typed_model_options(command_line)
        overridden = options_before_config(command_line)
        if overridden:
            rank_zero_warn(
                f"{', '.join(overridden)} given before --config, which sets {'it' if len(overridden) == 1 else 'them'} "
                "too: the config's value wins. Give options after --config to override the config"
            )
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Lightning rebuilds the model from a ``--ckpt_path`` checkpoint's hyperparameters, which replace
        the parsed config; a model option typed on this command line (another ``keep_ratio``, a moved
        ``teacher_checkpoint``) still wins, since it is what the user asked for now.

        The file is checked first (:meth:`_check_ckpt_path`); plain weights given to ``export`` or
        ``benchmark`` have no hyperparameters to read."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return super()._parse_ckpt_path()
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        named = ckpt_path is None or ckpt_path in LIGHTNING_CKPT_NAMES
        if not named and not is_lightning_checkpoint(self._check_ckpt_path(subcommand, ckpt_path)):
            return None
        if not self.typed_model_options:
            return super()._parse_ckpt_path()
        typed = {key: config.get(key) for key in self.typed_model_options if config.get(key) is not None}
        super()._parse_ckpt_path()
        config = self.config[subcommand]
        for key, value in typed.items():
            config[key] = value

    def _check_ckpt_path(self, subcommand: str, ckpt_path: str) -> Any:
        """``--ckpt_path``'s contents, or an error naming the fix (:func:`~dynvit.run.run_folder.read_ckpt_path`)."""
        init_args = self.config[subcommand].get("model.init_args") or {}
        option = next((name for name in ("student_checkpoint", "checkpoint") if name in init_args), None)
        return read_ckpt_path(
            ckpt_path, run=subcommand in RUN_SUBCOMMANDS, weights_option=option and f"--model.init_args.{option}"
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        extra = {name: {"model", "datamodule"} for name in ("benchmark", "sweep", "export")}
        return {**LightningCLI.subcommands(), **extra}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Measurement callbacks on by default, configurable as `--flops.*` / `--throughput.*`.
        parser.add_lightning_class_args(FlopsCallback, "flops")
        parser.add_lightning_class_args(ThroughputCallback, "throughput")
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                # last.ckpt is LastCheckpoint's (see dynvit.run.run_folder), and a rerun never writes -v1 files.
                "checkpoint.save_last": False,
                "checkpoint.enable_version_counter": False,
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.default_root_dir": DEFAULT_RUN_DIR,
            }
        )
        parser.add_class_arguments(WandbOptions, "wandb")
        for name in ("num_classes", "in_chans"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    @staticmethod
    def _run_dir(default_root_dir: str | None) -> Path:
        run_dir = Path(default_root_dir or DEFAULT_RUN_DIR)
        # Under `wandb agent` every point runs the same config: give each its own run folder.
        if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
            run_dir = run_dir / f"sweep-{os.environ['WANDB_SWEEP_ID']}" / os.environ["WANDB_RUN_ID"]
        return run_dir

    def before_instantiate_classes(self) -> None:
        """Before anything is built: resolve ``--ckpt_path last`` to the run's ``last.ckpt`` (an error if
        there is none), refuse a ``fit`` that would mix two runs in one folder, give an image-folder
        DataModule the normalisation stored in the checkpoint where it sets none, and size a DataModule
        that cannot count its classes (predicting on a bare image folder) from the checkpoint."""
        config = self.config[self.subcommand]
        if "ckpt_path" not in config:
            return
        run_dir = self._run_dir(config["trainer.default_root_dir"])
        folder = Path(config["checkpoint.dirpath"] or run_dir / "checkpoints")
        if config["ckpt_path"] == "last":
            config["ckpt_path"] = str(resolve_last(folder))
            self._check_ckpt_path(self.subcommand, config["ckpt_path"])
        ckpt_path = config["ckpt_path"]
        if self.subcommand == "fit":
            check_fit_folder(folder, run_dir, ckpt_path)
        data_args = config.get("data.init_args")
        if self.subcommand != "fit" and data_args is not None and ckpt_path is not None and Path(ckpt_path).is_file():
            # Evaluate and predict with the normalisation the network was trained with.
            use_stored_preprocessing(data_args, read_checkpoint(ckpt_path))
        # ImageFolderDataModule with predict_root and no root cannot count the classes: the checkpoint can.
        if (
            self.subcommand == "predict"
            and data_args is not None
            and "root" in data_args
            and data_args["root"] is None
            and data_args.get("num_classes") is None
        ):
            if ckpt_path is None or not Path(ckpt_path).is_file():
                raise ValueError(
                    "predicting without data.init_args.root: give --ckpt_path (the class count is read from the "
                    "checkpoint) or data.init_args.num_classes"
                )
            data_args["num_classes"] = read_checkpoint(ckpt_path).get("hyper_parameters", {}).get("num_classes")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The model decides the input; a link cannot say so, since data → model (num_classes) comes first.
        follow = getattr(self.datamodule, "follow", None)
        if follow is not None:
            follow(self.model)
        # timm's Mixup refuses an odd batch only at the first training step, after the run folder is made.
        if isinstance(self.model, ImageClassification) and self.subcommand == "fit":
            self.model.check_batch_size(getattr(self.datamodule, "batch_size", None))
        # An image folder's checks (layout, classes, images that do not decode) run in its setup(), which
        # Lightning calls after the loggers have made the run folder: run them now, before anything is
        # written. Its setup() keeps the splits it built, so Lightning's call does not repeat the work.
        if isinstance(self.datamodule, ImageFolderDataModule) and self.subcommand in RUN_SUBCOMMANDS:
            self.datamodule.setup(self.subcommand)

    def instantiate_trainer(self, **kwargs: Any):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        check_trainer_options(trainer_cfg)
        run_dir = self._run_dir(trainer_cfg.get("default_root_dir"))
        trainer_cfg["default_root_dir"] = str(run_dir)
        checkpoint = self._get(self.config_init, "checkpoint")
        if checkpoint.save_last:
            raise ValueError(
                "checkpoint.save_last: dynvit writes last.ckpt itself at the end of every epoch (Lightning's "
                "save_last would overwrite it with the last improvement only): drop checkpoint.save_last"
            )
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(run_dir / "checkpoints")
        # `logger: true` (the default) means "dynvit's loggers"; any explicit choice is the user's.
        if trainer_cfg.get("logger") in (None, True):
            wandb = self._get(self.config_init, "wandb")
            options = wandb if isinstance(wandb, WandbOptions) else WandbOptions(**dict(wandb))
            job = self.subcommand or "fit"
            resume = job == "fit" and self._resumes(Path(checkpoint.dirpath))
            # Under `wandb agent` the agent names each run.
            loggers = default_loggers(run_dir, options, job, resume, wandb_id="WANDB_RUN_ID" not in os.environ)
            kwargs["logger"] = loggers
            config = Path(loggers[0].log_dir) / self.save_config_kwargs.get("config_filename", "config.yaml")
            if resume and config.exists():
                # The resumed run logs beside its start: its config goes beside the first one's, which stays.
                self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": free_name(config, "resumed")}
        trainer = super().instantiate_trainer(**kwargs)
        # Appended after the best-k callback, so that it stays Lightning's `trainer.checkpoint_callback`.
        trainer.callbacks.append(LastCheckpoint(checkpoint.dirpath))
        warn_if_oversubscribed(trainer)
        return trainer

    def _resumes(self, folder: Path) -> bool:
        """Whether this command continues the run of the checkpoint folder ``folder`` (from its ``last.ckpt``)."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        return ckpt_path is not None and Path(ckpt_path).resolve() == (folder / LAST).resolve()

    def fit(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        """``cli.py fit``: Lightning's, except that a run that already reached its limits is not trained again."""
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path is not None and Path(ckpt_path).is_file():
            progress = read_progress(ckpt_path)
            limits = self.trainer.fit_loop.max_epochs, self.trainer.max_steps
            if progress.reached(*limits):
                shown = f"max_epochs={limits[0]}" + (f", max_steps={limits[1]}" if limits[1] != -1 else "")
                print(
                    f"The run of {ckpt_path} is finished ({progress}; {shown}): nothing to train. Evaluate it "
                    f"with `validate --ckpt_path {ckpt_path}`; to train further, raise --trainer.max_epochs "
                    "(or max_steps) and resume with --ckpt_path last."
                )
                self.finished = Path(ckpt_path)
                return
        self.trainer.fit(model, datamodule=datamodule, **kwargs)

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
        folder = check_output_folder(
            Path(out) if out else Path(self.trainer.default_root_dir) / spec.path.stem, "--out"
        )
        check_parameters(spec, self.config["sweep"], networks(model)[0])
        check_points(spec, model)
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


def free_name(path: Path, tag: str) -> str:
    """The first of ``<stem>-<tag>-1<suffix>``, ``<stem>-<tag>-2<suffix>``, … not in ``path``'s folder."""
    names = (f"{path.stem}-{tag}-{n}{path.suffix}" for n in itertools.count(1))
    return next(name for name in names if not (path.parent / name).exists())


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a container's share), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def oversubscription(processes: int, threads: int, cores: int) -> str | None:
    """A warning when ``processes`` training processes of ``threads`` threads each need more than ``cores``
    cores (they then take turns on them, and run slower together than one process would), else None."""
    if processes * threads <= cores:
        return None
    fits = max(1, cores // threads)
    return (
        f"--trainer.devices {processes} starts {processes} training processes of {threads} thread(s) each on "
        f"{cores} CPU core(s): they take turns on the cores and train slower than one process. Use "
        f"--trainer.devices {fits}" + (" or fewer" if fits > 1 else "") + " on this machine"
    )


def warn_if_oversubscribed(trainer: Trainer) -> None:
    """Warn when a CPU trainer's processes, times their threads, exceed this machine's cores."""
    if not isinstance(trainer.accelerator, CPUAccelerator) or trainer.num_devices < 2:
        return
    cores = cpu_cores()
    omp = os.environ.get("OMP_NUM_THREADS", "")
    # Without OMP_NUM_THREADS Lightning gives each of n CPU processes max(1, cores // n) threads
    # (lightning.fabric.utilities.distributed._suggested_max_num_threads).
    threads = int(omp) if omp.isdigit() and int(omp) > 0 else max(1, cores // trainer.num_devices)
    message = oversubscription(trainer.num_devices, threads, cores)
    if message is not None:
        rank_zero_warn(message)


def check_trainer_options(trainer_cfg: Any) -> None:
    """``ValueError`` for trainer options Lightning refuses only with a traceback: a negative
    ``max_epochs`` other than -1, no devices (``devices`` 0 or below -1), or a GPU accelerator on a machine
    without one."""
    max_epochs = trainer_cfg.get("max_epochs")
    if max_epochs is not None and max_epochs < -1:
        raise ValueError(f"--trainer.max_epochs {max_epochs}: give a number of epochs >= 0, or -1 for no limit")
    devices = trainer_cfg.get("devices")
    count = devices.strip() if isinstance(devices, str) else devices
    if isinstance(count, str) and count.lstrip("-").isdigit():
        count = int(count)
    if isinstance(count, int) and not isinstance(count, bool) and (count == 0 or count < -1):
        raise ValueError(
            f"--trainer.devices {devices}: give a number of devices >= 1, -1 or auto for all of them, "
            "or a list of device indices"
        )
    accelerator = trainer_cfg.get("accelerator")
    if isinstance(accelerator, str) and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--trainer.accelerator {accelerator}: this machine has no GPU that torch can use "
            "(torch.cuda.is_available() is False): use --trainer.accelerator cpu, or auto to take a GPU when there is one"
        )


def typed_model_options(command_line: Any) -> list[str]:
    """Config keys of the ``--model.…`` options in a command line, as ``model.init_args.<name>``
    (``--model.init_args.keep_ratio=0.5`` and ``--model.keep_ratio 0.5`` both give
    ``model.init_args.keep_ratio``; a nested option gives its top-level argument)."""
    if not isinstance(command_line, (list, tuple)):
        return []
    keys = []
    for token in command_line:
        if not isinstance(token, str) or not token.startswith("--model."):
            continue
        name = token[len("--model.") :].split("=", 1)[0].removeprefix("init_args.").split(".", 1)[0]
        if name and name not in {"class_path", "init_args", "dict_kwargs"}:
            keys.append(f"model.init_args.{name}")
    return keys


def options_before_config(command_line: Any) -> list[str]:
    """The ``--options`` of a command line that come before its first ``--config`` and that this config also
    sets: jsonargparse applies arguments in order, so the config's values silently replace them."""
    if not isinstance(command_line, (list, tuple)):
        return []
    tokens = [t for t in command_line if isinstance(t, str)]
    at = next((i for i, t in enumerate(tokens) if t == "--config" or t.startswith("--config=")), None)
    if at is None:
        return []
    path = tokens[at].split("=", 1)[1] if "=" in tokens[at] else (tokens[at + 1] if at + 1 < len(tokens) else "")
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return []  # the parser itself reports a config it cannot read
    return [
        t.split("=", 1)[0]
        for t in tokens[:at]
        if t.startswith("--") and _sets(config, t[2:].split("=", 1)[0].split("."))
    ]


def _sets(config: Any, keys: list[str]) -> bool:
    """Whether a loaded config sets the option at ``keys``, ``init_args`` optional (``--model.keep_ratio``)."""
    for key in keys:
        if not isinstance(config, dict):
            return False
        if key not in config and isinstance(config.get("init_args"), dict):
            config = config["init_args"]
        if key not in config:
            return False
        config = config[key]
    return True


def main(args: list[str] | None = None) -> None:
    """The ``cli.py`` entry point: an error dynvit raises for the user ends the run with its message alone
    (``DYNVIT_TRACEBACK=1`` shows the traceback; see :mod:`dynvit.run.errors`)."""
    run_reporting_errors(DynViTCLI, args=args)


if __name__ == "__main__":
    main()
