"""The CPU a model is built for: the host's integer kernels, read from what the OS reports, and named targets.

onnxruntime picks its int8 GEMM kernel from the CPU it runs on. What matters for a quantized model:

- ``avx2`` and ``avx512`` (AVX-512BW without VNNI): the u8×s8 kernel adds neighbouring pairs of products into a
  saturating int16 (``vpmaddubsw``); a pair of large products silently clips (255 × 127 × 2 > 32767).
- ``vnni`` (AVX512-VNNI or AVX-VNNI), ``amx`` (AMX-INT8) and ``arm64`` (dot product / i8mm, or widening
  multiplies): products accumulate in int32, nothing saturates; VNNI/AMX run int8 several times faster.

A :class:`Target` says which of these a model must be right on. ``portable`` (the default) must be right on any
x86-64 with AVX2 and any ARM64, so its int8 weights never overflow a pair sum (:mod:`graphopt.saturation`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from pathlib import Path

from graphopt.errors import GraphoptError

TARGETS = ("portable", "host", "avx2", "avx512", "vnni", "amx", "arm64")
DEFAULT_TARGET = "portable"

# x86 int8 kernel families, slowest first: a later one runs every int8 layer at least as fast as an earlier one.
X86_TIERS = ("sse", "avx2", "avx512", "vnni", "amx")
SATURATING = frozenset({"sse", "avx2", "avx512", "portable"})

_LABELS = {
    "sse": "x86-64 without AVX2 (int8 slower than float)",
    "avx2": "x86-64 AVX2, no VNNI (u8×s8 pair sums saturate in int16)",
    "avx512": "x86-64 AVX-512BW, no VNNI (u8×s8 pair sums saturate in int16)",
    "vnni": "x86-64 with VNNI (int8 dot products in int32)",
    "amx": "x86-64 with AMX-INT8 (int8 tiles in int32)",
    "arm64": "ARM64 (int8 in int32)",
    "portable": "any x86-64 with AVX2 or ARM64 (int8 weights safe for saturating u8×s8 kernels)",
    "unknown": "unknown CPU (treated as saturating)",
}


@dataclasses.dataclass(frozen=True)
class HostCpu:
    """What the OS reports: architecture, model name, and the int8-relevant feature flags."""

    arch: str  # "x86_64", "aarch64", ...
    model: str
    flags: frozenset[str]

    @property
    def isa(self) -> str:
        """The int8 kernel family onnxruntime will use here: one of X86_TIERS, ``arm64`` or ``unknown``."""
        f = self.flags
        if self.arch in ("x86_64", "amd64", "i686", "x86"):
            if "amx_int8" in f:
                return "amx"
            if "avx512_vnni" in f or "avx_vnni" in f:
                return "vnni"
            if "avx512bw" in f:
                return "avx512"
            return "avx2" if "avx2" in f else "sse"
        if self.arch in ("aarch64", "arm64"):
            return "arm64"
        return "unknown"

    @property
    def channel_block(self) -> int:
        """Channels per block of onnxruntime's NCHWc float convolutions here: 16 with AVX-512, else 8. A pruned
        width off this multiple pads its last block (measured on PP-OCRv4 det, AVX2 host, 30% of the channels
        pruned: x0.724 of float at any width, x0.625 with widths rounded to 8)."""
        return 16 if self.flags & {"avx512f", "avx512bw"} else 8

    def describe(self) -> str:
        extras = [name for name in ("asimddp", "i8mm") if name in self.flags]
        tail = f" ({', '.join(extras)})" if extras else ""
        return f"{self.model or self.arch}: {self.isa} — {_LABELS.get(self.isa, self.isa)}{tail}"


def parse_cpuinfo(text: str, arch: str) -> HostCpu:
    """A HostCpu from the text of /proc/cpuinfo (x86 ``flags``, ARM ``Features``) of the first processor."""
    model, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value
    return HostCpu(arch.lower(), model, frozenset(flags.split()))


HOST_ENV = "GRAPHOPT_HOST_ISA"  # overrides detection: an emulator (qemu -cpu Haswell) shows the real CPU's flags
_ISA_FLAGS = {"sse": set(), "avx2": {"avx2"}, "avx512": {"avx2", "avx512bw"},
              "vnni": {"avx2", "avx512bw", "avx512_vnni"}, "amx": {"avx2", "avx512bw", "avx512_vnni", "amx_int8"}}


@functools.lru_cache(maxsize=1)
def host() -> HostCpu:
    """The CPU this process runs on (Linux /proc/cpuinfo; elsewhere only the architecture is known)."""
    forced = os.environ.get(HOST_ENV, "").strip().lower()
    if forced:
        if forced not in _ISA_FLAGS:
            raise GraphoptError(f"{HOST_ENV}={forced}: expected one of {', '.join(_ISA_FLAGS)}")
        return HostCpu("x86_64", f"{HOST_ENV}={forced}", frozenset(_ISA_FLAGS[forced]))
    arch = platform.machine().lower()
    path = Path("/proc/cpuinfo")
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    cpu = parse_cpuinfo(text, arch)
    if cpu.arch in ("arm64", "aarch64") and not cpu.flags:
        return HostCpu(cpu.arch, platform.processor() or cpu.arch, frozenset({"asimddp"}))  # Apple silicon
    return cpu


@dataclasses.dataclass(frozen=True)
class Target:
    """The CPU a model is built for: ``isa`` is a kernel family, or ``portable``."""

    name: str  # as the user wrote it ("host" stays "host")
    isa: str

    @property
    def saturates(self) -> bool:
        """True: the model may run on a u8×s8 kernel whose int16 pair sums clip, so int8 weights must not."""
        return self.isa in SATURATING or self.isa == "unknown"

    def describe(self) -> str:
        where = f"{self.name} = {self.isa}" if self.name != self.isa else self.name
        return f"{where}: {_LABELS.get(self.isa, self.isa)}"

    def at_least_as_fast_as(self, isa: str) -> bool:
        """The target runs every int8 layer at least as fast as the kernel family ``isa`` does."""
        if self.isa in X86_TIERS and isa in X86_TIERS:
            return X86_TIERS.index(self.isa) >= X86_TIERS.index(isa)
        return self.isa == isa


def placement_note(target: Target, cpu: HostCpu | None = None) -> tuple[bool, str]:
    """Whether this host's timings may place int8 for ``target``, and a note saying where they hold.

    A target whose int8 kernels are faster than the host's (host AVX2, target VNNI) is not placed by host
    timings: int8 slower than float here says nothing about there, so every op stays int8 that accuracy allows."""
    host_isa = (cpu or host()).isa
    if target.isa != host_isa and target.at_least_as_fast_as(host_isa):
        return False, (f"latency placement not timed: this host's int8 kernels ({host_isa}) are slower than the "
                       f"target's ({target.isa}), so int8 wherever the accuracy budget allows")
    note = f"latency placement timed on this host (int8 kernels: {host_isa})"
    return True, note + ("" if target.isa == host_isa else f"; it may differ on the target ({target.describe()})")


def resolve_target(name: str | None = None, cpu: HostCpu | None = None) -> Target:
    """``portable`` (default), ``host`` (the detected kernels) or a named family; one error line otherwise."""
    name = (name or DEFAULT_TARGET).strip().lower()
    if name not in TARGETS:
        raise GraphoptError(f"target CPU {name!r}: expected one of {', '.join(TARGETS)}")
    if name == "host":
        return Target("host", (cpu or host()).isa)
    return Target(name, name)
