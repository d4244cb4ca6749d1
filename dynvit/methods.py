"""The method registry: every token-reduction method dynvit runs, declared once beside its code.

A method is one record (:class:`Method`) registered by the file that implements it, the way timm
registers a model with ``@register_model``. Everything that needs to know about methods (benchmark,
sweep, predict, export, the FLOP and throughput callbacks, the docs table) reads this registry
instead of keeping its own list, so adding a method is one file and one :func:`register` call.

This module imports nothing heavy: the records are plain data, and the implementations register
themselves when :mod:`dynvit.reducers` is imported (which :func:`get` and :func:`registered` do).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# What a method can report beyond logits:
# - "counts": real tokens entering each block's attention and MLP (every method);
# - "masks": which original patches are still tokens after each stage (selection methods);
# - "sources": which original patches each merged token stands for (mergers);
# - "assignments": which output token (cluster) each input token went to (clustering methods);
# - "exits": which exit of a cascade each image left at (DVT), its counts then per block of every exit run.
REPORTS = ("counts", "masks", "sources", "assignments", "exits")


@dataclass(frozen=True)
class Knob:
    """The one parameter that sets a method's cost, and how to search it.

    Attributes:
        name: The parameter's name, as the method's ``configure`` takes it (``"keep_rate"``, ``"r"``).
        low: Smallest value allowed.
        high: Largest value allowed, or a function of the model (ToMe's r is at most N // 2).
        integer: Whether only integers are allowed (r, max_tokens) or a fraction (keep rates).
        cheaper: Which direction costs fewer FLOPs: ``"lower"`` (keep rates, max_tokens) or
            ``"higher"`` (merge counts r).
        short: How tables show the setting, when not by ``name`` (``"K"`` for ATS's ``max_tokens``).
    """

    name: str
    low: float
    high: float | Callable[[Any], float]
    integer: bool = False
    cheaper: Literal["lower", "higher"] = "lower"
    short: str = ""

    def bounds(self, model: Any) -> tuple[float, float]:
        """(low, high) for this model."""
        high = self.high(model) if callable(self.high) else self.high
        return self.low, high

    def candidates(self, model: Any, steps: int = 100) -> list[float]:
        """Values to search, from the least reduction (most FLOPs) to the most: every integer in
        [low, high], or ``steps`` evenly spaced fractions in (low, high] (keep rates to two decimals)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        low, high = self.bounds(model)
        if self.integer:
            values = list(range(int(low), int(high) + 1))
        else:
            # A fraction's low end is excluded: a keep rate of 0 keeps nothing.
            values = [round(low + (high - low) * i / steps, 10) for i in range(1, steps + 1)]
        return values if self.cheaper == "higher" else values[::-1]

    def label(self, value: float) -> str:
        """``r=3``, ``keep_rate=0.62``, ``K=20``: a setting as tables show it."""
        return f"{self.short or self.name}={value:g}"


@dataclass(frozen=True)
class Method:
    """One token-reduction method as dynvit runs it.

    Attributes:
        name: Registry key and CLI name (``"tome"``, ``"kmedoids"``).
        summary: One line for the docs table: what it does, and whose code it follows.
        learned: True when the method adds parameters that are trained (DynamicViT's predictors,
            PatchMerger's queries); False when it runs on a trained ViT as is (training-free).
        build: Turns a plain timm ViT into the method's model in place, weights kept, new modules at
            init: ``build(vit, **params) -> model``. For reducers this is ``ReducerClass.from_vit``.
        knob: The parameter that sets the cost, its range and direction.
        cost: How the knob is matched to a GFLOPs target (:mod:`dynvit.reducers.matching`): ``"schedule"``
            when the token counts are fixed by the parameters (fvcore on one forward is exact, counted once
            per token schedule), ``"images"`` when they depend on the image (ATS: the mean over calibration
            images), ``"keep_ratio"`` when the knob is DynamicViT's keep ratio itself and is set to the
            compared keep ratio, not searched (random keep: DynamicViT's token counts, no predictors).
        defaults: The method's default parameters for a given model beyond its locations, or None for none.
        at_stages: The parameters that place the method at given stage blocks of a ``depth``-block ViT,
            ``at_stages(stages, depth)``, so a comparison reduces where the DynamicViT student does (ATS:
            every block from the first stage on); None for a method that acts in every block (ToMe). Its
            default locations are these at DynamicViT's default stage blocks (3, 6, 9 on a 12-block ViT);
            :func:`locations` makes the usual one.
        set_params: Sets parameters on a model this method built: ``set_params(model, **params) -> model``
            (a student's keep ratio); None when ``build`` on the built model does it (reducers reconfigure
            in place).
        fine_tuned_in_paper: The method's paper fine-tunes the reduced model, while dynvit runs it on the
            teacher's weights as they are: its benchmark rows say "training-free".
        reports: What the model reports beyond logits, a subset of :data:`REPORTS`.
        needs_class_token: The method ranks by the class token's attention and refuses a ViT without one.
        onnx: None when the model exports to ONNX; else why it cannot (shown as the refusal).
        reference: Where the authors' code is (``"JoakimHaurum/TokenReduction models/kmedoids.py"``).
        objective: For learned methods, the name of the training objective beyond cross-entropy, or None.
        accepts: Raises ``TypeError`` saying why when the method cannot take a given ViT over, beyond what every
            method needs (:func:`dynvit.reducers.base.check_reducible`): DVT resamples a patch embedding that is
            one convolution. None when the common checks suffice.
        released: The settings its authors released for DeiT-S (224², 12 blocks), by a short name
            (``{"r=13": {"r": 13}}``), as parameters of ``build`` beside :meth:`default_params`; empty for a
            method without one. ``benchmarks/methods_speed.py`` times each.
        wraps: ``build`` returns a new model around the ViT (DVT's cascade) instead of converting it in place, and
            ``build`` on that model sets its knob: matching builds it once, then searches the knob on it.
    """

    name: str
    summary: str
    learned: bool
    build: Callable[..., Any]
    knob: Knob
    cost: Literal["schedule", "images", "keep_ratio"] = "schedule"
    defaults: Callable[[Any], dict[str, Any]] | None = None
    reports: frozenset[str] = field(default_factory=lambda: frozenset({"counts"}))
    needs_class_token: bool = False
    onnx: str | None = None
    reference: str = ""
    objective: str | None = None
    at_stages: Callable[[tuple[int, ...], int], dict[str, Any]] | None = None
    set_params: Callable[..., Any] | None = None
    fine_tuned_in_paper: bool = False
    released: dict[str, dict[str, Any]] = field(default_factory=dict)
    accepts: Callable[[Any], None] | None = None
    wraps: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.reports) - set(REPORTS)
        if unknown:
            raise ValueError(f"method {self.name!r} reports {sorted(unknown)}; known reports are {REPORTS}")
        if "counts" not in self.reports:
            object.__setattr__(self, "reports", frozenset(self.reports) | {"counts"})

    @property
    def kind(self) -> str:
        return "learned" if self.learned else "training-free"

    @property
    def label(self) -> str:
        """How benchmark rows name the method: ``evit (training-free)`` where the paper fine-tunes."""
        return f"{self.name} (training-free)" if self.fine_tuned_in_paper else self.name

    @property
    def at_init_label(self) -> str:
        """How benchmark rows name a learned method built from the teacher with its new modules at init
        (``patchmerger (at init)``): untrained, unlike the student the comparison is about."""
        return f"{self.name} (at init)"

    def default_params(self, model: Any) -> dict[str, Any]:
        """The method's default parameters for ``model`` (a plain timm ViT), locations included
        (``{"pruning_loc": (3, 6, 9)}`` on a 12-block ViT)."""
        params = dict(self.defaults(model)) if self.defaults is not None else {}
        if self.at_stages is None:
            return params
        # Imported here: the registry itself stays free of model code.
        from dynvit.models.factory import default_stage_blocks

        return {**self.stage_params(default_stage_blocks(model), len(model.blocks)), **params}

    def stage_params(self, stages: Sequence[int], depth: int) -> dict[str, Any]:
        """The parameters that place the method at DynamicViT's ``stages`` (none for a method without locations)."""
        return dict(self.at_stages(tuple(stages), depth)) if self.at_stages is not None else {}

    def apply(self, model: Any, **params: Any) -> Any:
        """``model`` (a plain ViT, or one this method built) with ``params`` set, in place."""
        if self.set_params is not None:
            return self.set_params(model, **params)
        return self.build(model, **params)


def locations(name: str) -> Callable[[tuple[int, ...], int], dict[str, Any]]:
    """The usual ``Method.at_stages``: the method's location parameter ``name`` (``"pruning_loc"``,
    ``"reduction_loc"``) set to the stage blocks themselves."""

    def at_stages(stages: tuple[int, ...], depth: int) -> dict[str, Any]:
        return {name: tuple(stages)}

    return at_stages


_REGISTRY: dict[str, Method] = {}
# Modules whose import registers methods; :func:`registered` imports them once.
_IMPLEMENTATIONS = ("dynvit.models.factory", "dynvit.reducers", "dynvit.models.dvt")


def register(method: Method) -> Method:
    """Add ``method`` to the registry (once per name) and return it."""
    if method.name in _REGISTRY and _REGISTRY[method.name] != method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def registered() -> dict[str, Method]:
    """Every registered method by name, in registration order."""
    for module in _IMPLEMENTATIONS:
        importlib.import_module(module)
    return dict(_REGISTRY)


def of(model: Any) -> Method | None:
    """The registered method that built ``model`` (by its ``method`` attribute), or None for a plain model."""
    name = getattr(model, "method", None)
    return registered().get(name) if isinstance(name, str) else None


def controlling(model: Any) -> Method | None:
    """The registered method whose knob sets ``model``'s cost: the method that built it (:func:`of`), DynamicViT's
    for a hierarchical student, None for a plain model.

    Hierarchical students (DynamicCNN on ConvNeXt, DynamicSwin on Swin; ``dynvit.models.factory.FAMILIES``)
    are DynamicViT's method on another backbone: the same learned predictors, keep ratio ρ and objective,
    built by the same ``create_student``. They have no record of their own because a record promises a
    :class:`~dynvit.models.contract.TokenReducingModel` (token counts per block, comparable on a ViT teacher
    by ``benchmark --methods``), and spatial pruning keeps the whole feature map: it skips work per location
    inside one stage, and there are no tokens to count.
    """
    method = of(model)
    if method is not None:
        return method
    # Imported here: the registry itself stays free of model code.
    from dynvit.models.spatial_pruning import SpatialPruningStudent

    return get("dynamicvit") if isinstance(model, SpatialPruningStudent) else None


def get(name: str) -> Method:
    """The method registered as ``name``.

    Raises:
        ValueError: no such method; the message lists the registered ones and the nearest name.
    """
    methods = registered()
    if name not in methods:
        close = difflib.get_close_matches(str(name), methods, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown token-reduction method {name!r}: choose one of {sorted(methods)}{hint}")
    return methods[name]


def markdown_table() -> str:
    """The table of registered methods README shows (a test keeps README's copy equal to this)."""
    costs = {"schedule": "nearest GFLOPs", "images": "nearest mean GFLOPs on images", "keep_ratio": "DynamicViT's ρ"}
    lines = [
        "| method | kind | cost knob | matched by | reports | ONNX | what it does |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in registered().values():
        kind = "int" if m.knob.integer else "fraction"
        knob = f"`{m.knob.name}` ({kind}, {'more' if m.knob.cheaper == 'higher' else 'less'} is cheaper)"
        reports = ", ".join(r for r in REPORTS if r in m.reports)
        onnx = "yes" if m.onnx is None else "no"
        lines.append(f"| `{m.name}` | {m.kind} | {knob} | {costs[m.cost]} | {reports} | {onnx} | {m.summary} |")
    return "\n".join(lines)


__all__ = [
    "REPORTS",
    "Knob",
    "Method",
    "controlling",
    "get",
    "locations",
    "markdown_table",
    "of",
    "register",
    "registered",
]
