"""What this process's CPU can run fast: the instructions behind bf16 and int8 kernels, as the kernels see them.

Reduced precision pays only where the CPU has instructions for it, and only where the kernel
libraries are allowed to use them:

- **bf16** matrix products run on AVX-512 BF16 (``vdpbf16ps``) or AMX tiles (``amx_bf16``); without
  them oneDNN converts to float32 and back around every product, slower than float32 itself.
- **int8 through torchao** multiplies with ``torch._int_mm``, which hands the product to oneDNN only
  where the CPU reports AVX-512 VNNI (every AMX CPU does); elsewhere it runs a plain loop, about 40×
  slower than the float32 product (AVX-VNNI, the 256-bit form, does not count).

The CPU's own features come from ``torch.cpu.get_capabilities()`` (the cpuinfo library) and, on
Linux, ``/proc/cpuinfo``; what the kernels may use is lowered by ``ONEDNN_MAX_CPU_ISA`` (oneDNN's cap,
also spelled ``DNNL_MAX_CPU_ISA``). ``ATEN_CPU_CAPABILITY`` lowers ATen's own kernels, which
:attr:`CpuInfo.capability` reports; below ``AVX512`` no AVX-512 or AMX feature counts. Setting these
caps in a fresh process emulates an older CPU on a newer one (docs/reference.md, "Which
reduced-precision kernels run on which CPU").
"""

from __future__ import annotations

import os
import platform
import warnings
from dataclasses import dataclass

import torch

from dynvit.measure.environment import read_cpuinfo

# oneDNN's instruction-set caps (values of ONEDNN_MAX_CPU_ISA), lowest first. Names of one level are
# aliases (oneDNN 3 renamed AVX512_CORE_FP16 to AVX10_1_512, AVX512_CORE_AMX to AVX10_1_512_AMX).
_ONEDNN_LEVELS: tuple[tuple[str, ...], ...] = (
    ("SSE41",),
    ("AVX",),
    ("AVX2",),
    ("AVX2_VNNI",),
    ("AVX2_VNNI_2",),
    ("AVX512_CORE",),
    ("AVX512_CORE_VNNI",),
    ("AVX512_CORE_BF16",),
    ("AVX512_CORE_FP16", "AVX10_1_512"),
    ("AVX512_CORE_AMX", "AVX10_1_512_AMX"),
    ("AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16"),
    ("AVX10_2_512",),
    ("AVX10_2_512_AMX_2",),
)
_ONEDNN_RANK = {name: rank for rank, names in enumerate(_ONEDNN_LEVELS) for name in names}

# Each reduced-precision feature and the oneDNN cap that still lets oneDNN use it.
_NEEDS_LEVEL = {
    "avx_vnni": "AVX2_VNNI",
    "avx512_vnni": "AVX512_CORE_VNNI",
    "avx512_bf16": "AVX512_CORE_BF16",
    "amx_bf16": "AVX512_CORE_AMX",
    "amx_int8": "AVX512_CORE_AMX",
}
BF16_FEATURES: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
INT8_FEATURES: tuple[str, ...] = ("avx512_vnni", "amx_int8")
# /proc/cpuinfo's spelling where cpuinfo's differs.
_PROC_NAMES = {"avx512f": "avx512_f"}


@dataclass(frozen=True)
class CpuInfo:
    """The CPU of this process and the reduced-precision instructions its kernels may use.

    Attributes:
        name: The CPU model name.
        architecture: ``x86_64``, ``aarch64``, …
        capability: ATen's kernel level, ``torch.backends.cpu.get_cpu_capability()`` (``AVX2``,
            ``AVX512``, ``SVE256``, ``DEFAULT``, …).
        features: The reduced-precision instruction sets the CPU has (cpuinfo's names: ``avx2``,
            ``avx512_f``, ``avx_vnni``, ``avx512_vnni``, ``avx512_bf16``, ``amx_bf16``, ``amx_int8``).
        onednn_max_isa: The ``ONEDNN_MAX_CPU_ISA`` cap in effect, or None.
    """

    name: str
    architecture: str
    capability: str
    features: frozenset[str]
    onednn_max_isa: str | None = None

    @property
    def usable(self) -> frozenset[str]:
        """:attr:`features` less those the oneDNN cap forbids, and on x86 less every AVX-512 and AMX feature where
        ATen's capability is below ``AVX512``: every CPU with AVX-512 (so every AMX CPU) gets ATen's AVX512
        kernels, so a lower level means a CPU without it, or one made to stand for such a CPU
        (``ATEN_CPU_CAPABILITY``)."""
        features = self.features
        if self.is_x86 and not self.capability.upper().startswith("AVX512"):
            features = frozenset(f for f in features if not f.startswith(("avx512", "amx")))
        limit = _ONEDNN_RANK.get((self.onednn_max_isa or "").upper())
        if limit is None:  # unset, ALL/DEFAULT, or a name this table does not know: no cap
            return features
        return frozenset(f for f in features if f not in _NEEDS_LEVEL or _ONEDNN_RANK[_NEEDS_LEVEL[f]] <= limit)

    @property
    def is_x86(self) -> bool:
        return self.architecture.lower() in ("x86_64", "amd64", "x86", "i686")

    def fast(self, precision: str) -> bool | None:
        """Whether ``bf16`` or ``int8`` (torchao's kernel) has its instructions here; None off x86,
        where this table has no measurement to go by. ``fp32`` is always fast."""
        if precision == "fp32":
            return True
        if not self.is_x86:
            return None
        wanted = {"bf16": BF16_FEATURES, "int8": INT8_FEATURES}[precision]
        return any(f in self.usable for f in wanted)

    @property
    def int8_dot_product(self) -> bool:
        """Whether 8-bit products accumulate without saturating here (AVX-VNNI, AVX-512 VNNI or AMX, whatever
        oneDNN's cap: onnxruntime's kernels do not read it). Without them x86 int8 kernels multiply with
        ``vpmaddubsw``, whose pairwise int16 sums saturate for unsigned × signed 8-bit operands."""
        return any(f in self.features for f in ("avx_vnni", *INT8_FEATURES))

    def describe(self) -> str:
        """``AMD EPYC (x86_64, ATen AVX2, oneDNN capped at AVX2; avx2; not used here: avx512_bf16 avx512_f …)``."""
        parts = [self.architecture, f"ATen {self.capability}"]
        if self.onednn_max_isa:
            parts.append(f"oneDNN capped at {self.onednn_max_isa}")
        features = " ".join(sorted(self.usable)) or "no AVX-512, VNNI or AMX"
        unused = " ".join(sorted(self.features - self.usable))
        return f"{self.name} ({', '.join(parts)}; {features}" + (f"; not used here: {unused})" if unused else ")")

    def record(self) -> dict[str, object]:
        """A JSON-ready record of the fields and what each precision finds here."""
        return {
            "cpu": self.name,
            "architecture": self.architecture,
            "capability": self.capability,
            "features": sorted(self.features),
            "usable": sorted(self.usable),
            "onednn_max_isa": self.onednn_max_isa,
            "fast_bf16": self.fast("bf16"),
            "fast_int8": self.fast("int8"),
            "int8_dot_product": self.int8_dot_product,
        }


_RELEVANT = ("avx2", "avx512_f", "avx_vnni", *INT8_FEATURES, *BF16_FEATURES)


def detect_cpu() -> CpuInfo:
    """This process's :class:`CpuInfo`: cpuinfo's features, those ``/proc/cpuinfo`` lists, and the caps."""
    capabilities = dict(torch.cpu.get_capabilities()) if hasattr(torch.cpu, "get_capabilities") else {}
    features = {f for f in _RELEVANT if capabilities.get(f) is True}
    # The kernel's flags too: where either source reports a feature, the CPU has it.
    proc_name, proc_flags = read_cpuinfo()
    features |= {_PROC_NAMES.get(f, f) for f in proc_flags} & set(_RELEVANT)
    name = proc_name or capabilities.get("cpu_name") or platform.processor() or platform.machine()
    return CpuInfo(
        name=str(name),
        architecture=str(capabilities.get("architecture") or platform.machine()),
        capability=torch.backends.cpu.get_cpu_capability(),
        features=frozenset(features),
        onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
    )


class SlowPrecisionWarning(UserWarning):
    """A precision asked for on a CPU without the instructions that make it fast."""


_NEEDED = {
    "bf16": "AVX-512 BF16 or AMX (amx_bf16)",
    "int8": "AVX-512 VNNI (avx512_vnni) or AMX (amx_int8)",
}
# (precision, what was found) pairs already warned about: each is said once per process.
_warned: set[tuple[str, str]] = set()


def warn_if_slow(precision: str, cpu: CpuInfo | None = None, instead: str = "") -> bool:
    """Warn once per process (per precision and CPU) if ``precision`` lacks its instructions on this CPU.

    Args:
        precision: ``bf16``, or ``int8`` for torchao's kernel.
        cpu: The CPU to judge; by default :func:`detect_cpu`'s.
        instead: What happens instead, appended to the message (e.g. the backend used).

    Returns:
        True if the CPU lacks the instructions (whether or not this call warned).
    """
    cpu = cpu or detect_cpu()
    if cpu.fast(precision) is not False:
        return False
    key = (precision, cpu.describe())
    if key not in _warned:
        _warned.add(key)
        what = "bf16 matrix products" if precision == "bf16" else "torchao's int8 matrix products"
        warnings.warn(
            f"{what} need {_NEEDED[precision]} to be fast, and this CPU offers none: {cpu.describe()}. "
            f"{precision} here may be slower than float32{instead}; dynvit.deploy.fastest times every path on "
            "this machine and picks the fastest",
            SlowPrecisionWarning,
            stacklevel=3,
        )
    return True
