"""The fine-tuned track: any registered token-reduction method, built on the teacher's weights and trained.

:class:`MethodFineTuning` builds the teacher, turns a copy of it into the method's model through the
registry (:mod:`dynvit.methods`: ``build``, default parameters, the stage blocks), optionally sets the
method to a GFLOPs budget given as DynamicViT's keep ratio ρ (matched as ``cli.py benchmark`` matches,
:mod:`dynvit.reducers.matching`), and trains *every* parameter: the backbone through the reduction, and
whatever the method adds (DynamicViT's predictors, the clustering layers, DTEM's embedding).

The loss is cross-entropy unless the method's registry entry names an objective (``Method.objective``);
every objective is one entry of :data:`OBJECTIVES`, and an objective the table lacks, refuses, or whose
arguments are missing or unknown stops the module before anything trains. Logit distillation from the
frozen teacher (``distill_weight``) can be added to any objective.

``fine_tune=False`` is the training-free point of the same configuration: the module is built exactly
as for fine-tuning (same teacher, same method and budget) and ``fit`` trains nothing, so a grid's two
tracks differ only in training.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torchmetrics import MeanMetric

from dynvit import methods as registry
from dynvit.lightning.base import model_build_args
from dynvit.lightning.pruning import FrozenTeacherModule, build_teacher, teacher_record
from dynvit.measure.flops import count_flops
from dynvit.measure.recall import source_purity, stage_recall
from dynvit.models import forward_with_tokens
from dynvit.models.contract import reports
from dynvit.models.dynamic_vit import StudentOutput, validate_pruning
from dynvit.models.factory import default_stage_blocks
from dynvit.models.masked_attention import set_keep_gradient
from dynvit.objectives.dynamicvit import classification_loss, logit_distillation_loss
from dynvit.objectives.spatial_pruning import pruning_objective
from dynvit.reducers.diffrate import DiffRateViT
from dynvit.reducers.matching import match_gflops

# What the budget is measured in: the GFLOPs of this method's student at keep ratio ρ, at the stage blocks.
BUDGET_METHOD = "dynamicvit"
# Validation images a method whose cost depends on the image (ATS) is matched on.
CALIBRATION_IMAGES = 64

Terms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """A training objective of the fine-tuned track.

    Attributes:
        name: The name a registry entry gives as ``Method.objective``.
        summary: What it minimises, for the docs.
        build: ``build(net, label_smoothing, **args) -> loss``; ``loss(out, targets, teacher) -> terms`` with
            ``terms["total"]`` the loss to minimise; ``teacher`` is ``(logits, tokens)`` of the frozen teacher
            on the same images, or None when the objective does not need it. Required arguments are the
            keyword-only ones without a default; a ``ValueError`` from ``build`` is a refusal.
        needs_teacher: Whether ``loss`` reads the teacher's outputs.
        setting: What a grid row's setting says for a point it trained, when training replaces what the
            method's knob set (DiffRate's search replaces the schedule); None: the knob's value.
    """

    name: str
    summary: str
    build: Callable[..., Callable[[Any, torch.Tensor, Any], Terms]]
    needs_teacher: bool = False
    setting: str | None = None

    def arguments(self) -> tuple[list[str], list[str]]:
        """(required, optional) argument names of ``build`` beyond ``net`` and ``label_smoothing``."""
        params = list(inspect.signature(self.build).parameters.values())[2:]
        required = [p.name for p in params if p.default is inspect.Parameter.empty]
        return required, [p.name for p in params if p.default is not inspect.Parameter.empty]

    def check(self, args: Mapping[str, Any]) -> None:
        """``ValueError`` naming what to add or drop when ``args`` are not this objective's."""
        required, optional = self.arguments()
        missing = [a for a in required if a not in args]
        unknown = sorted(set(args) - set(required) - set(optional))
        if missing:
            raise ValueError(
                f"objective {self.name!r} needs objective_args {missing}: give them, e.g. "
                f"--model.init_args.objective_args '{{{self.name}: {{{missing[0]}: ...}}}}'"
            )
        if unknown:
            raise ValueError(
                f"objective {self.name!r} takes no objective_args {unknown}; it takes {required + optional}"
            )


def logits_of(out: Any) -> torch.Tensor:
    """Class logits of a training-mode forward: a DynamicViT student returns a :class:`StudentOutput`, a DVT
    cascade every exit's logits (its answer is the last exit's)."""
    if isinstance(out, StudentOutput):
        return out.logits
    return out[-1] if isinstance(out, (list, tuple)) else out


def cross_entropy(net: nn.Module, label_smoothing: float) -> Callable[[Any, torch.Tensor, Any], Terms]:
    def loss(out: Any, targets: torch.Tensor, teacher: Any) -> Terms:
        cls = classification_loss(logits_of(out), targets, label_smoothing)
        return {"total": cls, "cls": cls}

    return loss


def dynamicvit_objective(
    net: nn.Module,
    label_smoothing: float,
    ratio_weight: float | None = None,
    distill_weight: float = 0.5,
    token_weight: float = 0.5,
    keep_gradient: str = "tangent",
    start_at_target: bool = False,
) -> Callable[[Any, torch.Tensor, Any], Terms]:
    """DynamicViT's CE + keep-ratio MSE + logit KL + token distillation (:class:`~dynvit.objectives.DynamicViTLoss`).

    ``keep_gradient`` and ``start_at_target`` are :class:`~dynvit.lightning.DynamicViTModule`'s options (the
    reference: tangent, predictors at 1/2); the digits recipes take secant and ρ, without which the predictors
    saturate there and the tangent's gradient, clipped, steers the whole network (BENCHMARKS.md).
    """
    set_keep_gradient(net, keep_gradient)
    if start_at_target:
        net.start_predictors_at_target()
    objective = pruning_objective(net, ratio_weight, distill_weight, token_weight, label_smoothing)

    def loss(out: StudentOutput, targets: torch.Tensor, teacher: Any) -> Terms:
        terms = objective(out, targets, net.stage_keep_ratios, *teacher)
        return {k: v for k, v in terms._asdict().items() if v is not None}

    return loss


def dtem_objective(
    net: nn.Module, label_smoothing: float, freeze_backbone: bool = False
) -> Callable[[Any, torch.Tensor, Any], Terms]:
    """DTEM: cross-entropy through its training-mode soft merging (the model's own). With ``freeze_backbone``,
    DTEM's own recipe: only the decoupled embedding (``metric_layer``) trains; by default every parameter
    trains, as the common fine-tuning recipe does."""
    if freeze_backbone:
        for name, p in net.named_parameters():
            p.requires_grad_(".metric_layer." in name)
    return cross_entropy(net, label_smoothing)


def dvt_objective(net: nn.Module, label_smoothing: float) -> Callable[[Any, torch.Tensor, Any], Terms]:
    """DVT: the sum of every exit's cross-entropy, as the paper trains its cascades (``DVTModule`` also
    distils each exit; here ``distill_weight`` distils the last exit, as for every method)."""

    def loss(out: Sequence[torch.Tensor], targets: torch.Tensor, teacher: Any) -> Terms:
        terms = {f"cls{k + 1}": classification_loss(o, targets, label_smoothing) for k, o in enumerate(out)}
        return {"total": sum(terms.values()), **terms}

    return loss


@runtime_checkable
class SetsLearningRates(Protocol):
    """A loss that gives some parameters their own learning rate: ``{name prefix: lr}``, before the schedule."""

    learning_rates: Mapping[str, float]


@dataclass
class DiffRateSearchLoss:
    """DiffRate's search loss: cross-entropy + ``weight`` · ((FLOPs − target) / ``unit``)², FLOPs by DiffRate's
    formula (:meth:`~dynvit.reducers.diffrate.DiffRateViT.formula_flops`) of the schedule the rates give."""

    net: nn.Module
    label_smoothing: float
    target_flops: float
    weight: float
    unit: float
    learning_rates: Mapping[str, float]

    def __call__(self, out: Any, targets: torch.Tensor, teacher: Any) -> Terms:
        cls = classification_loss(logits_of(out), targets, self.label_smoothing)
        flops = self.net.formula_flops()
        penalty = ((flops - self.target_flops) / self.unit) ** 2
        return {
            "total": cls + self.weight * penalty,
            "cls": cls,
            "flops_penalty": penalty,
            "gflops": flops.detach() / 1e9,
        }


def diffrate_objective(
    net: nn.Module,
    label_smoothing: float,
    target_gflops: float | None = None,
    flops_weight: float = 5.0,
    flops_unit: float = 1e9,
    granularity: int = 4,
    rate_lr: float = 0.01,
    freeze_backbone: bool = False,
) -> DiffRateSearchLoss:
    """DiffRate's rate search (OpenGVLab/DiffRate ``engine.py``): learnable kept-count distributions in every
    block after the first (:meth:`~dynvit.reducers.diffrate.DiffRateViT.learn_rates`), trained on
    cross-entropy + ``flops_weight`` · ((FLOPs − target) / ``flops_unit``)².

    Args:
        target_gflops: The FLOPs target in GFLOPs as DiffRate's formula counts them (its ``--target_flops``);
            None: the formula's count of the schedule the budget set (the released schedule bent to the
            budget), so the search moves the rates, not the cost.
        flops_weight, flops_unit: DiffRate's 5 on GFLOPs (unit 1e9). A model far smaller than DeiT-S needs a
            smaller unit for the constraint to weigh as much against cross-entropy.
        granularity: Gap between candidate kept counts (DiffRate's 4).
        rate_lr: The rates' learning rate before the schedule (DiffRate's ``--arch-lr`` 0.01); no weight decay.
        freeze_backbone: DiffRate's own recipe: only the rates train. By default every parameter trains, as the
            common fine-tuning recipe does.
    """
    if not isinstance(net, DiffRateViT):
        raise ValueError(
            f"objective 'diffrate' searches DiffRate's per-block rates, and {type(net).__name__} has none: use it "
            "with method diffrate"
        )
    for name, value in (("flops_weight", flops_weight), ("flops_unit", flops_unit), ("rate_lr", rate_lr)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if target_gflops is None:
        target = float(net.formula_flops([m for _, m in net.token_schedule()]))
    elif isinstance(target_gflops, bool) or not isinstance(target_gflops, int | float) or not target_gflops > 0:
        raise ValueError(f"target_gflops must be a positive number (GFLOPs as DiffRate counts), got {target_gflops!r}")
    else:
        target = target_gflops * 1e9
    net.learn_rates(granularity)
    if freeze_backbone:
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith(net.new_param_prefixes))
    rates = dict.fromkeys(net.new_param_prefixes, rate_lr)
    return DiffRateSearchLoss(net, label_smoothing, target, flops_weight, flops_unit, rates)


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("ce", "cross-entropy (label smoothing, or soft mixup/cutmix targets)", cross_entropy),
        Objective(
            "dynamicvit",
            "CE + 2·keep-ratio MSE + 0.5·logit KL + 0.5·token MSE to the teacher (DynamicViT)",
            dynamicvit_objective,
            needs_teacher=True,
        ),
        Objective("dtem", "CE through DTEM's soft merging; freeze_backbone: DTEM's own recipe", dtem_objective),
        Objective("dvt", "the sum of every exit's CE (DVT's cascade)", dvt_objective),
        Objective(
            "diffrate",
            "DiffRate's rate search: learnable kept counts per block, CE + 5·(GFLOPs − target)²",
            diffrate_objective,
            setting="searched rates",
        ),
    )
}


def objective_of(method: registry.Method, name: str | None) -> Objective:
    """The objective ``name``, else the one ``method``'s registry entry names, else cross-entropy.

    Raises:
        ValueError: the name is not in :data:`OBJECTIVES`.
    """
    name = name or method.objective or "ce"
    if name not in OBJECTIVES:
        source = "model.init_args.objective" if name != method.objective else f"the registry entry of {method.name!r}"
        raise ValueError(
            f"objective {name!r} (from {source}) is not one dynvit's fine-tuning has: choose one of "
            f"{sorted(OBJECTIVES)}, or add it to dynvit.lightning.finetune.OBJECTIVES"
        )
    return OBJECTIVES[name]


def objective_arguments(by_objective: Mapping[str, Any] | None, objective: Objective) -> dict[str, Any]:
    """``objective``'s entry of ``by_objective`` (arguments keyed by objective name), checked; ``ValueError``
    for a name that is no objective, an entry that is not a mapping, or arguments the objective does not take."""
    by_objective = dict(by_objective or {})
    unknown = sorted(set(by_objective) - set(OBJECTIVES))
    if unknown:
        raise ValueError(
            f"objective_args is keyed by objective name ({sorted(OBJECTIVES)}), got {unknown}: nest the "
            f"arguments under their objective, e.g. {{dynamicvit: {{ratio_weight: 2.0}}}}"
        )
    for name, args in by_objective.items():
        if not isinstance(args, Mapping):
            raise ValueError(f"objective_args.{name} must map argument names to values, got {args!r}")
    own = dict(by_objective.get(objective.name) or {})
    objective.check(own)
    return own


def budget_gflops(vit: nn.Module, keep_ratio: float, stages: Sequence[int]) -> float:
    """GFLOPs of DynamicViT's student of ``vit`` at keep ratio ρ before ``stages`` (``vit`` is not changed)."""
    student = registry.get(BUDGET_METHOD).build(copy.deepcopy(vit), keep_ratio=keep_ratio, pruning_loc=tuple(stages))
    return count_flops(student)


def check_budget(keep_ratio: float, stages: Sequence[int], vit: nn.Module) -> None:
    """``ValueError`` unless ρ is in (0, 1] and DynamicViT's student at ρ keeps a token at every stage."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, int | float) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep ratios must be in (0, 1], got keep_ratio={keep_ratio!r}")
    validate_pruning(keep_ratio, tuple(stages), len(vit.blocks), vit.patch_embed.num_patches)


class MethodFineTuning(FrozenTeacherModule):
    """Any registered method on the teacher's weights, fine-tuned (or, with ``fine_tune=False``, not).

    Args:
        method: A registered method (``dynvit.methods.registered()``): ``tome``, ``evit``, ``dynamicvit``, …
        keep_ratio: The GFLOPs budget, as DynamicViT's keep ratio ρ at the stage blocks: the method's knob is
            set to the value whose GFLOPs are nearest those of DynamicViT's student at ρ (ρ itself for
            DynamicViT and random keep; ATS on the mean over validation images). None: the knob as
            ``method_params`` give it, or the method's default.
        method_params: The method's own parameters (``{r: 8}``, ``{prop_attn: false}``); the knob may only be
            given here when ``keep_ratio`` is None.
        pruning_loc: Stage blocks where methods with locations reduce, and where the budget's student prunes;
            None: the backbone's default (3, 6, 9 on 12 blocks).
        fine_tune: False: the training-free point (``fit`` trains nothing, validation and timing still run).
        model_name, num_classes, img_size, in_chans, model_kwargs: The backbone, as for the teacher
            (``model_kwargs.drop_path_rate`` 0.1 in TokenReduction's recipe; the frozen teacher runs in eval).
        teacher_checkpoint, pretrained: Where the teacher's weights come from; the method starts from them.
        objective: Overrides the registry entry's objective (:data:`OBJECTIVES`); None takes the entry's.
        objective_args: Arguments by objective name (``{dynamicvit: {ratio_weight: 2.0}}``); the point's
            objective takes its own entry, so one grid config can carry every method's.
        distill_weight: Weight of the logit KL to the frozen teacher added to any objective (0: off).
        backbone_lr_scale: Backbone learning rate relative to ``lr``; what the method adds
            (``new_param_prefixes``) learns at ``lr``. 1.0 in TokenReduction's recipe.
        Remaining arguments: see :class:`~dynvit.lightning.base.ImageClassification`; the defaults are
            TokenReduction's recipe (lr 1e-3 at batch 1024, AdamW wd 0.05, 20 warm-up epochs, cosine to 1e-5).

    Raises:
        ValueError: unknown method or objective, a refused objective, missing or unknown objective
            arguments, a ρ outside (0, 1] or keeping no token, the knob given twice, a ``distill_weight`` or
            ``backbone_lr_scale`` below 0 or no number (NaN).
    """

    def __init__(
        self,
        method: str = "tome",
        keep_ratio: float | None = 0.7,
        method_params: dict[str, Any] | None = None,
        pruning_loc: Sequence[int] | None = None,
        fine_tune: bool = True,
        model_name: str = "deit_small_patch16_224",
        num_classes: int = 1000,
        img_size: int | None = None,
        in_chans: int = 3,
        teacher_checkpoint: str | None = None,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        objective: str | None = None,
        objective_args: dict[str, dict[str, Any]] | None = None,
        distill_weight: float = 0.0,
        backbone_lr_scale: float = 1.0,
        lr: float = 1e-3,
        lr_base_batch_size: int | None = 1024,
        weight_decay: float = 0.05,
        warmup_epochs: float = 20.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
    ) -> None:
        super().__init__(num_classes, label_smoothing, mixup, cutmix)
        self.save_hyperparameters()
        # Every argument is checked before the teacher is built or loaded.
        record = registry.get(method)
        self.objective = objective_of(record, objective)
        own_args = objective_arguments(objective_args, self.objective)
        # Written so that NaN fails too: it compares False with everything, and would turn every loss NaN.
        if not 0 <= distill_weight < math.inf:
            raise ValueError(f"distill_weight must be >= 0 (0 switches distillation off), got {distill_weight}")
        if not 0 <= backbone_lr_scale < math.inf:
            raise ValueError(
                f"backbone_lr_scale must be >= 0 (a share of lr; 0 freezes the backbone), got {backbone_lr_scale}"
            )
        params = dict(method_params or {})
        if keep_ratio is not None and record.knob.name in params:
            raise ValueError(
                f"{method}'s {record.knob.name} is given twice: by keep_ratio={keep_ratio} (a GFLOPs budget) and by "
                f"method_params.{record.knob.name}; set keep_ratio to null to give the knob itself"
            )
        build = model_build_args(num_classes, img_size, in_chans, model_kwargs)
        self.teacher = build_teacher(model_name, pretrained, teacher_checkpoint, build)
        self.teacher_record = teacher_record(teacher_checkpoint, model_name if pretrained else None)
        self.teacher.requires_grad_(False).eval()
        # The copy is in train mode: Lightning keeps each module's mode, and the teacher's is eval.
        vit = copy.deepcopy(self.teacher).requires_grad_(True).train()
        stages = tuple(pruning_loc) if pruning_loc is not None else default_stage_blocks(vit)
        params = {**record.default_params(vit), **record.stage_params(stages, len(vit.blocks)), **params}
        # ATS's cost depends on the image: its knob is matched on validation images in setup().
        self._pending_budget: float | None = None
        self.matched_gflops: float | None = None
        if keep_ratio is not None:
            check_budget(keep_ratio, stages, vit)
            if record.name == BUDGET_METHOD or record.cost == "keep_ratio":
                params[record.knob.name] = keep_ratio
            elif record.cost == "images":
                self._pending_budget = budget_gflops(vit, keep_ratio, stages)
            else:
                target = budget_gflops(vit, keep_ratio, stages)
                others = {k: v for k, v in params.items() if k != record.knob.name}
                params[record.knob.name] = match_gflops(record, copy.deepcopy(vit), target, **others).value
        self.method = record
        self.method_params = params
        self.net = record.build(vit, **params)
        # The training-free point trains nothing, so its model stays as built (an objective may add modules).
        self.loss = self.objective.build(self.net, label_smoothing, **own_args) if fine_tune else None
        self.val_purity = MeanMetric()
        self.val_recall = nn.ModuleList(MeanMetric() for _ in range(len(stages)))

    # -- the grid's view of this point ------------------------------------------------------------
    def point_fields(self) -> dict[str, Any]:
        """What a grid's row says of this point: method, budget ρ, the method's setting and the track."""
        knob = self.method.knob
        value = self.method_params.get(knob.name)
        param = None if value is None else knob.label(value)
        if self.hparams.fine_tune and self.objective.setting is not None:
            param = self.objective.setting
        fields = {
            "method": self.method.name,
            "keep_ratio": float(self.hparams.keep_ratio) if self.hparams.keep_ratio is not None else 1.0,
            "param": param,
            "track": "fine-tuned" if self.hparams.fine_tune else "training-free",
        }
        if self.matched_gflops is not None:
            fields["gflops"] = self.matched_gflops
        return fields

    def check_point(self, keep_ratio: float | None, method: str | None) -> None:
        """Check a grid point's method and budget on this teacher without building the method (the sweep
        calls it for every point before anything trains)."""
        if method is not None:
            record = registry.get(method)
            if record.accepts is not None:
                try:
                    record.accepts(self.teacher)
                except TypeError as e:
                    raise ValueError(f"{method} cannot take this teacher over: {e}") from e
        if keep_ratio is not None:
            stages = self.hparams.pruning_loc or default_stage_blocks(self.teacher)
            check_budget(keep_ratio, stages, self.teacher)

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._pending_budget is None:
            return
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None:
            raise ValueError(
                f"{self.method.name} is matched to the budget on validation images: give the config a DataModule"
            )
        datamodule.setup("validate")
        images, seen = [], 0
        for x, *_ in datamodule.val_dataloader():
            images.append(x[: CALIBRATION_IMAGES - seen])
            seen += images[-1].shape[0]
            if seen >= CALIBRATION_IMAGES:
                break
        self.match_budget(images)

    def match_budget(self, images: Sequence[torch.Tensor]) -> None:
        """Set a method whose cost depends on the image (ATS) to the budget, by its mean GFLOPs on ``images``."""
        if self._pending_budget is None:
            raise ValueError(f"{self.method.name} at keep_ratio={self.hparams.keep_ratio} has no budget left to match")
        knob = self.method.knob.name
        others = {k: v for k, v in self.method_params.items() if k != knob}
        match = match_gflops(self.method, copy.deepcopy(self.teacher), self._pending_budget, images, **others)
        self.method_params[knob] = match.value
        self.method.apply(self.net, **self.method_params)
        self._pending_budget = None
        # What the grid's row reports for it: the mean GFLOPs over the calibration images.
        self.matched_gflops = match.gflops

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.hparams.fine_tune:
            # The training-free point: the fit loop is done before its first epoch; validation and the
            # throughput callback still run on the model as built.
            self.trainer.fit_loop.max_epochs = 0

    def lr_scales(self) -> Mapping[str, float]:
        scales = dict.fromkeys(getattr(self.net, "new_param_prefixes", ()), 1.0)
        if isinstance(self.loss, SetsLearningRates):
            scales.update({prefix: lr / self.peak_lr() for prefix, lr in self.loss.learning_rates.items()})
        return {**scales, "": self.hparams.backbone_lr_scale}

    # -- steps -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.net(x))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = self.training_inputs(batch)
        teacher = None
        if self.objective.needs_teacher or self.hparams.distill_weight:
            with torch.no_grad():
                teacher = forward_with_tokens(self.teacher, x)
        out = self.net(x)
        terms = self.loss(out, y, teacher)
        if self.hparams.distill_weight:
            terms["teacher_kl"] = logit_distillation_loss(logits_of(out), teacher[0])
            terms["total"] = terms["total"] + self.hparams.distill_weight * terms["teacher_kl"]
        self.check_finite(terms["total"], terms)
        total = terms.pop("total")
        self.log("train/loss", total, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in terms.items()})
        return total

    def _eval_step(self, batch: tuple, stage: str) -> None:
        x, y, *rest = batch
        offers = reports(self.net)
        if "masks" in offers:
            logits, masks = self.net.predict_with_masks(x)
        else:
            logits, masks = logits_of(self.net(x)), []
        self.evaluate(logits, y, stage)
        if not rest or stage != "val":
            return
        target = rest[0]
        for s, (recall, metric) in enumerate(zip(stage_recall(masks, target), self.val_recall, strict=False)):
            metric.update(recall)
            self.log(f"val/recall_s{s + 1}", metric, sync_dist=True)
        if "sources" in offers:
            self.val_purity.update(source_purity(self.net.predict_with_sources(x)[1], target))
            self.log("val/purity", self.val_purity, sync_dist=True)

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        self._eval_step(batch, "test")


__all__ = ["OBJECTIVES", "MethodFineTuning", "Objective", "budget_gflops", "objective_of"]
