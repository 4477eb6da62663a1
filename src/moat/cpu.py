"""The CPU a process runs on: its model and the vector instruction sets it may use.

`cpu_info()` is the one owner of these facts; the benchmarks record it with every table and
CSV, and `moat.export.cpu_ops` picks its CPU kernels and layouts from it.

Two views of the instruction sets:

* `hardware`: what the processor reports (/proc/cpuinfo flags on Linux);
* `isa`: what the kernels will actually use in this process: PyTorch's ATen capability
  (`torch.backends.cpu.get_cpu_capability()`, lowered by ATEN_CPU_CAPABILITY=avx2) and
  oneDNN's limit (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) and MKL's (MKL_ENABLE_INSTRUCTIONS,
  for nn.Linear's matrix products). An AVX-512 machine run with ATEN_CPU_CAPABILITY=avx2
  ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 emulates an AVX2-only CPU for
  PyTorch; ONNX Runtime's MLAS has no such switch (it always picks from the processor's
  flags).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

__all__ = ["CpuInfo", "cpu_info", "effective_isa", "read_flags"]

# The levels the kernels choose between, lowest first.
ISA_LEVELS = ("default", "avx2", "avx512")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    avx2: bool
    avx512: bool  # AVX-512 F/BW/VL/DQ (what oneDNN's and ATen's AVX-512 kernels need)
    vnni: bool  # AVX-512 VNNI or AVX-VNNI: int8 dot products
    amx: bool  # AMX tiles (bf16 / int8)
    torch_capability: str  # ATen's kernels in this process: DEFAULT, AVX2, AVX512, ...
    onednn_limit: str  # ONEDNN_MAX_CPU_ISA, or "" (no limit)
    mkl_limit: str  # MKL_ENABLE_INSTRUCTIONS, or "" (no limit)
    isa: str  # the effective level for PyTorch's kernels: one of ISA_LEVELS

    @property
    def emulated(self) -> bool:
        """True when the process is limited below what the processor has."""
        return self.isa != effective_isa(self.avx2, self.avx512, "", "")

    def describe(self) -> str:
        """One line for a table header: model, instruction sets, and any emulation."""
        sets = [name for name, on in (("AVX2", self.avx2), ("AVX-512", self.avx512),
                                      ("VNNI", self.vnni), ("AMX", self.amx)) if on]
        line = f"{self.model} ({', '.join(sets) or 'no AVX2'})"
        if self.emulated:
            line += (f"; PyTorch limited to {self.isa.upper()} (emulated: ATen "
                     f"{self.torch_capability}, oneDNN {self.onednn_limit or 'no limit'}, "
                     f"MKL {self.mkl_limit or 'no limit'})")
        return line

    def as_dict(self) -> dict[str, str]:
        """The fields recorded with benchmark results (strings, for CSV)."""
        return {"cpu": self.model, "cpu_avx2": str(self.avx2), "cpu_avx512": str(self.avx512),
                "cpu_vnni": str(self.vnni), "cpu_amx": str(self.amx),
                "torch_cpu_capability": self.torch_capability,
                "onednn_max_cpu_isa": self.onednn_limit, "mkl_enable_instructions": self.mkl_limit,
                "cpu_isa": self.isa}


def read_flags() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ("<machine>", empty) where it does not exist."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def effective_isa(avx2: bool, avx512: bool, torch_capability: str, onednn_limit: str,
                  mkl_limit: str = "") -> str:
    """The vector level PyTorch's CPU kernels run at: the processor's, lowered by the ATen
    capability and the oneDNN and MKL limits when they are set (any one at AVX2: AVX2)."""
    level = "avx512" if avx512 else "avx2" if avx2 else "default"
    for limit in (torch_capability.lower(), onednn_limit.lower(), mkl_limit.lower()):
        if not limit:
            continue
        cap = ("avx512" if limit.startswith("avx512") or limit.startswith("avx10")
               else "avx2" if limit.startswith("avx2") else "default")
        if ISA_LEVELS.index(cap) < ISA_LEVELS.index(level):
            level = cap
    return level


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """The CPU of this process (read once)."""
    model, flags = read_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    capability = torch.backends.cpu.get_cpu_capability()
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "")
    if not flags:  # no /proc/cpuinfo (macOS, Windows): trust ATen's own detection
        avx2, avx512 = capability.startswith(("AVX2", "AVX512")), capability.startswith("AVX512")
    else:
        avx2 = "avx2" in flags
    return CpuInfo(model=model, avx2=avx2, avx512=avx512,
                   vnni=bool({"avx512_vnni", "avx_vnni"} & flags),
                   amx=bool({"amx_tile", "amx_bf16", "amx_int8"} & flags),
                   torch_capability=capability, onednn_limit=limit, mkl_limit=mkl,
                   isa=effective_isa(avx2, avx512, capability, limit, mkl))
