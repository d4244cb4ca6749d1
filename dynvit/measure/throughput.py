"""Speed that repeats: paired, interleaved timings, and speedups as medians of ratios with intervals.

On a shared machine the speed of *every* model drifts together (other jobs, clocks, heat): the same
teacher ran at 464 and at 880 images/s in two calls minutes apart. A ratio of two models timed
back to back barely moves with that drift, so speedups are estimated from many such pairs:

1. every model is warmed up for ``warmup_time`` (:func:`warm_up`), which also measures its time per
   call; each model's timed *block* is then as many calls as last ``block_time`` (at least one);
2. each round times every model once, each next to a fresh block of the reference, in pairs
   whose order alternates from round to round (reference first, then the model first: an ABBA
   design), and the models' order reverses every other round;
3. a pair's ratio is the reference's time per call divided by the model's. Drift between the two
   blocks of a pair pushes the ratio up in one order and down in the other, so it cancels in the
   median, and no block serves two pairs, so the ratios are independent;
4. the speedup is the median of the ``pairs`` ratios, with a distribution-free 95 % interval for
   that median from the order statistics of the ratios (:func:`median_interval`). A slow spell that
   hits one block spoils one ratio, up or down with equal odds, which the median ignores.

Images/s are the median over a model's blocks: they move with the machine; the speedups do not.

Pairing cannot cancel what differs from one process to the next and hits the models unequally.
glibc's ``malloc`` was such a thing (:mod:`dynvit.measure.allocator`), so timing first makes it keep
freed memory (``SpeedSettings.keep_freed_memory``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import timeit
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dynvit.measure.allocator import keep_freed_memory
from dynvit.models.dynamic_vit import input_size

# A call that runs one batch through one model (eager, compiled or another runtime).
Call = Callable[[], object]


@dataclass
class SpeedSettings:
    """How speed is measured.

    Args:
        batch_size: Images per timed call.
        device: Where the models run.
        pairs: Rounds of the paired design; each gives every model one ratio to the reference
            (two blocks per model per round).
            At least 6 for a 95 % interval (with fewer, the speedup comes without one).
        block_time: Seconds each timed block lasts at least (one call if a call takes longer).
        warmup_time: Seconds of untimed calls per model before the first round (:func:`warm_up`).
        threads: CPU threads while timing; by default torch's current setting.
        keep_freed_memory: Make glibc keep freed memory in the heap for the rest of the process
            before timing (:func:`~dynvit.measure.allocator.keep_freed_memory`), so that large
            tensors do not page-fault on some processes' calls and not on others'.
    """

    batch_size: int = 64
    device: torch.device | str = "cpu"
    pairs: int = 30
    block_time: float = 0.1
    warmup_time: float = 0.3
    threads: int | None = None
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        check_speed_settings(
            batch_size=self.batch_size,
            pairs=self.pairs,
            block_time=self.block_time,
            warmup_time=self.warmup_time,
            threads=self.threads,
        )
        # A GPU that is not here fails now, naming the fix, not in the first model moved there.
        check_device(self.device)

    @property
    def num_threads(self) -> int:
        return self.threads or torch.get_num_threads()


def check_speed_settings(prefix: str = "", **settings: Any) -> None:
    """A ValueError naming the first of ``settings`` (:class:`SpeedSettings` fields, by name) out of its range.

    ``prefix`` goes before the name: ``cli.py`` passes ``--``, since its options share the fields' names, and
    checks them before it loads or measures anything.
    """
    for name, value in settings.items():
        if name in ("batch_size", "pairs") and value < 1:
            raise ValueError(f"{prefix}{name} must be >= 1, got {value}")
        if name in ("block_time", "warmup_time") and value < 0:
            raise ValueError(f"{prefix}{name} must be >= 0, got {value}")
        if name == "threads" and value is not None and value < 1:
            raise ValueError(f"{prefix}{name} must be >= 1, got {value}")


def check_device(device: torch.device | str, option: str | None = None) -> torch.device:
    """``device`` as a ``torch.device`` this machine has, or a ValueError naming it (and the ``option`` it came
    from) with the fix: a name torch does not know, or a GPU that is not here. Without this, torch's own error
    comes as a traceback from the first model moved there."""
    name = f"{option} {device}" if option else f"device {device!r}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}: not a device torch knows: give cpu, cuda or cuda:<index>") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"{name}: this machine has no GPU that torch can use (torch.cuda.is_available() is False): use cpu"
            )
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
        return parsed
    # mps, xpu, …: torch.<type>.is_available() where torch has such a module.
    available = getattr(getattr(torch, parsed.type, None), "is_available", None)
    if not callable(available) or not available():
        raise ValueError(f"{name}: torch cannot run models on {parsed.type} on this machine: use cpu or cuda")
    return parsed


def format_speedup(value: float, low: float | None = None, high: float | None = None) -> str:
    """``1.52× (1.50–1.54)``, or ``1.52×`` without both ends of an interval: how every table writes a speedup."""
    interval = f" ({low:.2f}–{high:.2f})" if low is not None and high is not None else ""
    return f"{value:.2f}×{interval}"


@dataclass(frozen=True)
class Speedup:
    """A speedup (the median of per-pair ratios) and its 95 % interval (None below 6 pairs)."""

    value: float
    low: float | None
    high: float | None
    pairs: int

    def __str__(self) -> str:
        return format_speedup(self.value, self.low, self.high)


@dataclass
class Timing:
    """One model's timed blocks in a paired run.

    Attributes:
        batch_size: Images per call.
        seconds: Seconds per call of each timed block, in the order taken.
        ratios: Per round, the paired reference block's seconds per call ÷ this model's (empty for
            the reference itself and when there is none).
    """

    batch_size: int
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def seconds_per_call(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.seconds_per_call

    @property
    def speedup(self) -> Speedup | None:
        if not self.ratios:
            return None
        interval = median_interval(self.ratios)
        low, high = interval if interval else (None, None)
        return Speedup(statistics.median(self.ratios), low, high, len(self.ratios))


def median_interval(samples: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median: ``(x_(k), x_(n+1-k))`` of the sorted samples.

    ``k`` is the largest rank with ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2``, so the interval
    covers the true median with probability at least ``level`` whatever the distribution (the
    samples need only be independent). None when ``n`` is too small for any such ``k`` (below 6 at 95 %).
    """
    n = len(samples)
    tail = (1.0 - level) / 2
    k, below = 0, 0.0  # below = P(Binomial(n, 1/2) <= k - 1)
    while k < n // 2:
        nxt = below + math.comb(n, k) / 2**n
        if nxt > tail:
            break
        k, below = k + 1, nxt
    if k == 0:
        return None
    ordered = sorted(samples)
    return ordered[k - 1], ordered[n - k]


@contextlib.contextmanager
def quiet_logs(*names: str) -> Iterator[None]:
    """Silence the warnings of the named loggers (the root logger for ``""``) inside the ``with``."""
    loggers = [logging.getLogger(name or None) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def synchronised_clock() -> Callable[[], float]:
    """``torch.utils.benchmark``'s clock, which synchronises an accelerator before reading the time;
    imported on first use: the import pulls in torch's C++-extension builder, which logs a warning
    on machines without CUDA."""
    with quiet_logs("torch.utils.cpp_extension"):
        from torch.utils.benchmark.utils.timer import timer
    return timer


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``n`` inside the block, restored after it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def warm_up(call: Call, warmup_time: float, clock: Callable[[], float]) -> float:
    """Run ``call`` for about ``warmup_time`` seconds and return its seconds per call.

    Blocks of 1, 2, 4, … calls until the time is spent, so the warm-up lasts less than twice
    ``warmup_time`` plus two calls; with a positive ``warmup_time`` the estimate never comes from the
    first call alone (it pays for one-off set-up such as kernel selection). ``warmup_time=0`` makes
    one call. ``torch.utils.benchmark``'s ``blocked_autorange`` is not used here: its block-size probe
    grows tenfold, so for a 2 ms model it ran about 4 s whatever time it was given.
    """
    runner = timeit.Timer(call, timer=clock)
    number, spent = 1, 0.0
    while True:
        seconds = runner.timeit(number)
        spent += seconds
        if spent >= warmup_time and (warmup_time == 0 or number > 1):
            return seconds / number
        number *= 2


def time_calls(
    calls: Sequence[Call],
    settings: SpeedSettings,
    reference: bool = True,
    setups: Sequence[Callable[[], object] | None] | None = None,
    clock: Callable[[], float] | None = None,
) -> list[Timing]:
    """Time ``calls`` in the paired, interleaved design of this module.

    Args:
        calls: One call per model; ``calls[0]`` is the reference when ``reference`` is True.
        settings: Rounds, block and warm-up times, threads, batch size (for images/s).
        reference: Whether ``calls[0]`` is the reference the others' ratios are taken to. Without
            one, each round times every model once, in alternating order, and no ratios are taken.
        setups: Per call, something to run (untimed) before each of its blocks, e.g. setting the
            keep ratio of a model that several calls share; None for nothing.
        clock: The clock blocks are read with; by default ``torch.utils.benchmark``'s, which
            synchronises an accelerator before reading the time.

    Returns:
        One :class:`Timing` per call, in the order given.
    """
    if not calls:
        raise ValueError("nothing to time")
    clock = clock or synchronised_clock()
    if settings.keep_freed_memory:
        keep_freed_memory()
    threads = settings.num_threads
    setups = list(setups) if setups is not None else [None] * len(calls)
    if len(setups) != len(calls):
        raise ValueError(f"{len(setups)} setups for {len(calls)} calls")
    numbers = []
    for call, setup in zip(calls, setups, strict=True):
        if setup is not None:
            setup()
        with intra_op_threads(threads):
            per_call = warm_up(call, settings.warmup_time, clock)
        numbers.append(max(1, math.ceil(settings.block_time / per_call)))
    # The paired blocks themselves: one timeit block each, with torch.utils.benchmark's clock, which
    # synchronises an accelerator before reading the time (Timer.timeit would add warm-up calls to
    # every block, doubling the cost of a large model's one-call blocks).
    clocks = [timeit.Timer(call, timer=clock) for call in calls]
    timings = [Timing(settings.batch_size) for _ in calls]

    def block(i: int) -> float:
        if setups[i] is not None:
            setups[i]()
        seconds = clocks[i].timeit(numbers[i]) / numbers[i]
        timings[i].seconds.append(seconds)
        return seconds

    others = list(range(1, len(calls))) if reference else list(range(len(calls)))
    with intra_op_threads(threads):
        for round_ in range(settings.pairs):
            for i in others if round_ % 2 == 0 else others[::-1]:
                if not reference:
                    block(i)
                elif (round_ + i) % 2 == 0:  # each model alternates: reference first, then itself first
                    reference_time = block(0)
                    timings[i].ratios.append(reference_time / block(i))
                else:
                    own = block(i)
                    timings[i].ratios.append(block(0) / own)
    return timings


def keep_rng(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Measuring must not move the caller's random stream (fvcore and timing draw random inputs)."""
    device = torch.device(device)
    return torch.random.fork_rng([device.index or 0] if device.type == "cuda" else [])


def check_measurable(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters, or a ValueError naming the fix when they hold no data (the
    ``meta`` device): without this, fvcore and the timing fail deep inside torch with messages about
    tensors, not about the model."""
    device = next(model.parameters()).device
    if device.type == "meta":
        raise ValueError(
            f"the {type(model).__name__} is on the meta device (shapes only, no weights): "
            "nothing can be counted or timed on it; materialise it first (model.to_empty(device='cpu') "
            "and load its weights)"
        )
    return device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype a model's inputs should have: that of its first plain floating parameter."""
    for p in model.parameters():
        if type(p.data) is torch.Tensor and p.is_floating_point():
            return p.dtype
    return torch.float32


def random_images(model: nn.Module, batch_size: int, img_size: int | Sequence[int] | None = None) -> torch.Tensor:
    """Random images (B, C, H, W) of the size the model was built for (or ``img_size``)."""
    in_chans, *own_size = input_size(model)
    size = own_size if img_size is None else img_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(batch_size, in_chans, *size)


@contextlib.contextmanager
def inference_call(
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device | str = "cpu",
    autocast: torch.dtype | None = None,
    compile: bool = False,
    channels_last: bool = False,
) -> Iterator[Call]:
    """A call that runs ``images`` through ``model`` in eval mode under ``torch.inference_mode``.

    Inside the ``with`` the model is in eval mode on ``device``; afterwards its mode, device and
    memory format are as before.

    Args:
        images: The batch, cast to the model's dtype (bf16 for a bf16 model) and moved to ``device``.
        autocast: ``torch.bfloat16``/``torch.float16`` to run a float32 model under autocast.
        compile: Run ``torch.compile(model, dynamic=False)``; it compiles in the warm-up, untimed.
        channels_last: Feed channels-last images and convert the model's 4-D weights (the patch
            embedding convolution) to channels-last, which GPU convolution kernels prefer.
    """
    device = torch.device(device)
    was_training, old_device = model.training, check_measurable(model)
    try:
        # Inside the try: a move that fails part-way must still put the model back as it was.
        model.eval().to(device)
    except BaseException:
        model.train(was_training).to(old_device)
        raise
    x = images.to(device, model_dtype(model))
    # Only a model that was in the default format is put back into it afterwards.
    restore_format = channels_last and all(p.is_contiguous() for p in model.parameters() if p.ndim == 4)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model, dynamic=False) if compile else model
    cast = (
        torch.autocast(device.type, dtype=autocast)
        if autocast in (torch.float16, torch.bfloat16)
        else contextlib.nullcontext()
    )

    def call() -> object:
        with torch.inference_mode(), cast:
            return run(x)

    try:
        yield call
    finally:
        model.train(was_training).to(old_device)
        if restore_format:
            model.to(memory_format=torch.contiguous_format)


def measure_throughput(
    model: nn.Module,
    batch_size: int = 64,
    img_size: int | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    pairs: int = 10,
    threads: int | None = None,
    compile: bool = False,
    channels_last: bool = False,
) -> float:
    """Images/s of ``model`` in eval mode: the median over ``pairs`` timed blocks after a warm-up.

    The same timing as every speed figure of this toolkit (:func:`time_calls`); for a speedup
    over another model, time both in one call of :func:`measure_speedup` instead of dividing two
    of these. The model's mode, device and memory format are restored afterwards.

    Args:
        img_size: Input resolution; by default the model's own.
        dtype: ``torch.float32``, or ``torch.bfloat16``/``torch.float16`` to run under autocast.
        pairs: Timed blocks.
        threads: CPU threads while timing; by default torch's current setting.
        compile: Time ``torch.compile(model, dynamic=False)``; it compiles during the warm-up.
        channels_last: See :func:`inference_call`.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        # Anything else would be timed as float32 without a word (autocast takes only these two).
        raise ValueError(
            f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}; "
            "for int8, time dynvit.quantize(model, 'int8') at float32"
        )
    settings = SpeedSettings(batch_size=batch_size, device=device, pairs=pairs, threads=threads)
    return time_model(model, settings, dtype, img_size, compile, channels_last).images_per_s


def time_model(
    model: nn.Module,
    settings: SpeedSettings,
    dtype: torch.dtype = torch.float32,
    img_size: int | Sequence[int] | None = None,
    compile: bool = False,
    channels_last: bool = False,
) -> Timing:
    """``model`` alone, timed in ``settings.pairs`` blocks on a random batch (see :func:`measure_throughput`)."""
    with keep_rng(settings.device):
        images = random_images(model, settings.batch_size, img_size)
        with inference_call(model, images, settings.device, dtype, compile, channels_last) as call:
            (timing,) = time_calls([call], settings, reference=False)
    return timing


def measure_speedup(
    model: nn.Module,
    reference: nn.Module,
    settings: SpeedSettings,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> tuple[Timing, Timing]:
    """``model`` and ``reference`` timed in pairs on the same random batch: (model's, reference's) timings.

    ``model_timing.speedup`` is the median ratio with its interval. ``compile``: both run through
    ``torch.compile(..., dynamic=False)``, compiled in the warm-up, untimed.
    """
    with keep_rng(settings.device):
        images = random_images(reference, settings.batch_size)
        with (
            inference_call(reference, images, settings.device, dtype, compile) as ref_call,
            inference_call(model, images, settings.device, dtype, compile) as call,
        ):
            ref_timing, timing = time_calls([ref_call, call], settings)
    return timing, ref_timing
