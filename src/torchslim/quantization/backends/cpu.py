"""What the CPU's int8 kernels can do, and the static-int8 settings that stay accurate on it.

x86 CPUs without VNNI (AVX2 or AVX-512 alone) multiply uint8 activations by int8 weights with ``vpmaddubsw``,
which adds neighbouring products into a saturating int16: ``255 * 127 * 2`` overflows it, so ONNX Runtime's
and fbgemm's int8 kernels silently clip some sums and a model can lose points of accuracy. Weights quantized
to 7 bits (``reduce_range``) keep every pair sum below ``2**15``. VNNI (``avx512_vnni``, ``avx_vnni``) and AMX
multiply-accumulate into int32 directly; ARM's int8 kernels (dot-product or widening multiplies) do not
saturate either.

``TORCHSLIM_CPU_INT8=avx2|vnni`` (or the ``override`` argument) replaces the detection, so tests can take
the non-VNNI path on any machine.
"""

from __future__ import annotations

import dataclasses
import os
import platform

import torch

from ...core.errors import ConfigError

__all__ = ["CpuInt8", "cpu_int8", "ENV", "OVERRIDES"]

ENV = "TORCHSLIM_CPU_INT8"
OVERRIDES = ("avx2", "vnni")
"""Values of ``TORCHSLIM_CPU_INT8``: an x86 CPU without VNNI, or one with it."""

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclasses.dataclass(frozen=True)
class CpuInt8:
    """The int8 capabilities of a CPU: ``arch`` (``x86``, ``arm`` or ``other``), the int8-relevant ``flags``
    found (e.g. ``avx2``, ``avx512_vnni``, ``asimddp``) and where they came from (``source``)."""

    arch: str
    flags: frozenset[str]
    source: str

    @property
    def vnni(self) -> bool:
        """Whether int8 products accumulate straight into int32 (VNNI or AMX)."""
        return any(f in self.flags for f in _VNNI_FLAGS)

    @property
    def saturates(self) -> bool:
        """Whether uint8 x int8 kernels sum product pairs in saturating int16 (x86 without VNNI)."""
        return self.arch == "x86" and not self.vnni

    def describe(self) -> str:
        """One line for reports, e.g. ``x86 avx2, no VNNI (TORCHSLIM_CPU_INT8)``."""
        shown = ", ".join(sorted(self.flags)) or "no int8 extensions found"
        if self.arch == "x86":
            shown += "" if self.vnni else ", no VNNI"
        return f"{self.arch} {shown} ({self.source})"


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86 | ARM
                    return set(value.split())
    except OSError:
        return None
    return None


def _arch() -> str:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "x86"
    if machine.startswith(("arm", "aarch64")):
        return "arm"
    return "other"


def cpu_int8(override: str | None = None) -> CpuInt8:
    """The int8 capabilities of this CPU: ``override`` or ``TORCHSLIM_CPU_INT8`` (``avx2``: x86 without VNNI,
    ``vnni``: x86 with it) when set, else ``/proc/cpuinfo``'s flags, else PyTorch's CPU capability."""
    source = "argument"
    if override is None:
        override = os.environ.get(ENV) or None
        source = ENV
    if override is not None:
        if override not in OVERRIDES:
            raise ConfigError(f"{source}={override!r} is not a CPU int8 kind; use one of {list(OVERRIDES)} "
                              f"(avx2: x86 without VNNI, vnni: x86 with it), or unset it to detect the CPU")
        flags = {"avx2"} if override == "avx2" else {"avx2", "avx512_vnni"}
        return CpuInt8("x86", frozenset(flags), source)
    arch = _arch()
    found = _cpuinfo_flags()
    if found is not None:
        wanted = {"avx2", "avx512f", *_VNNI_FLAGS} if arch == "x86" else {"asimddp", "i8mm"}
        return CpuInt8(arch, frozenset(found & wanted), "/proc/cpuinfo")
    # No /proc (macOS, Windows): PyTorch's dispatch level says AVX2 / AVX-512 but not VNNI, so assume none.
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")().lower()
    flags = {"avx2"} if "avx2" in capability or "avx512" in capability else set()
    flags |= {"avx512f"} if "avx512" in capability else set()
    if arch == "arm":
        flags.add("asimddp")  # every ARM CPU PyTorch ships wheels for (Apple silicon, Graviton) has it
    return CpuInt8(arch, frozenset(flags), "torch.backends.cpu")
