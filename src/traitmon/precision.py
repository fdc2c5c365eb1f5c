"""One answer to "bf16 or fp32 here?" for every stage that computes.

``auto`` (the schema's default for ``finetune.precision``, ``capture.precision`` and
``behavior.generation.dtype``) becomes bf16 where the hardware computes bfloat16 natively, a CUDA device that
supports it or a CPU with AVX512-BF16 or AMX tiles, and fp32 elsewhere: on a CPU without them (AVX2 only: AMD
Zen 2/3, Intel before Sapphire Rapids) bfloat16 is emulated and a matmul runs 17-65x slower than in float32.
Explicit ``bf16``/``fp32`` are kept as given. Where torch's capability report cannot be trusted (an older torch
without it, a non-x86 CPU, or an instruction set capped through ``ATEN_CPU_CAPABILITY``/``ONEDNN_MAX_CPU_ISA``)
a short timed matmul decides. The choice and its reason are logged once per stage, so every job's log says how
it computed.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from dataclasses import dataclass

import torch

from traitmon.errors import TraitmonError
from traitmon.settings import PRECISIONS

log = logging.getLogger(__name__)

AUTO = "auto"
# environment variables that cap the instruction set torch and oneDNN use below what the CPU reports
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
DTYPE_OF = {"bf16": "bfloat16", "fp32": "float32"}  # a resolved precision as a model dtype (sampling, judge)


@dataclass(frozen=True)
class Hardware:
    """Whether ``device`` computes bfloat16 natively, and the evidence in a few words."""

    native_bf16: bool
    reason: str


def hardware(device: torch.device | str) -> Hardware:
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return cpu_hardware()
    return Hardware(False, f"{device.type}: bf16 not assumed")


@functools.cache
def _cuda(index: int) -> Hardware:
    name = torch.cuda.get_device_name(index)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return Hardware(True, f"cuda {name}, native bf16")
    major, minor = torch.cuda.get_device_capability(index)
    return Hardware(False, f"cuda {name} (sm {major}.{minor}), no native bf16")


@functools.cache
def cpu_hardware() -> Hardware:
    """The CPU's answer: torch's capability report, or the timed probe where the report is unclear."""
    capability = torch.backends.cpu.get_cpu_capability()
    caps = [f"{v}={os.environ[v]}" for v in ISA_CAPS if os.environ.get(v)]
    amx, avx512_bf16 = _cpu_flag("_is_amx_tile_supported"), _cpu_flag("_is_avx512_bf16_supported")
    if caps or amx is None or avx512_bf16 is None or platform.machine().lower() not in ("x86_64", "amd64"):
        why = ", ".join(caps) if caps else f"{platform.machine()} without a bf16 capability report"
        return probe(f"cpu {capability}, {why}")
    if amx or avx512_bf16:
        return Hardware(True, f"cpu {capability}, {'AMX' if amx else 'AVX512-BF16'}: native bf16")
    return Hardware(False, f"cpu {capability}, no native bf16")


def _cpu_flag(name: str) -> bool | None:
    check = getattr(torch.cpu, name, None)
    return bool(check()) if check is not None else None


def probe(context: str, size: int = 256) -> Hardware:
    """Time one ``size x 2size @ 2size x 4size`` matmul in float32 and under bfloat16 autocast (best of three,
    after a warm-up; well under a second even where bf16 is emulated): bf16 is native if it is not slower."""
    a, b = torch.randn(size, 2 * size), torch.randn(2 * size, 4 * size)
    fp32 = _best_seconds(lambda: a @ b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _best_seconds(lambda: a @ b)
    native = bf16 <= fp32
    return Hardware(native, f"{context}; timed probe: bf16 matmul {fp32 / bf16:.2g}x float32's speed")


def _best_seconds(run, repeats: int = 3) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def resolve(requested: str, device: torch.device | str, stage: str) -> str:
    """``requested`` (auto, bf16 or fp32) as the precision ``stage`` computes in on ``device``: bf16 or fp32.
    Logged once per stage and answer, with the reason."""
    if requested not in (AUTO, *PRECISIONS):
        raise TraitmonError(f"precision '{requested}': expected one of {[AUTO, *PRECISIONS]}")
    found = hardware(device)
    if requested == AUTO:
        chosen, reason = ("bf16" if found.native_bf16 else "fp32"), found.reason
    else:
        chosen, reason = requested, f"set in the config; {found.reason}"
    _announce(stage, chosen, reason, slow=chosen == "bf16" and not found.native_bf16)
    return chosen


@functools.cache
def _announce(stage: str, chosen: str, reason: str, slow: bool) -> None:
    log.info("precision[%s]: %s (%s)", stage, chosen, reason)
    if slow:
        log.warning("precision[%s]: bf16 is set but this device has no native bf16: expect passes many times "
                    "slower than fp32 (set it to auto or fp32)", stage)


def for_model(requested: str, model: torch.nn.Module, stage: str) -> str:
    """``resolve`` on the device ``model`` sits on."""
    return resolve(requested, next(model.parameters()).device, stage)


def resolve_dtype(requested: str, device: torch.device | str, stage: str) -> str:
    """A model-dtype setting whose ``auto`` follows the precision resolver (``behavior.generation.dtype``, an
    HF judge's ``dtype``): auto becomes bfloat16 or float32; explicit dtypes are kept."""
    if requested != AUTO:
        return requested
    return DTYPE_OF[resolve(AUTO, device, stage)]


def describe(device: torch.device | str = "cpu") -> dict:
    """What ``.ci/run`` and the benchmarks print: the device, its capability and what ``auto`` resolves to."""
    found = hardware(device)
    return {"device": str(device), "cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": found.native_bf16, "auto": "bf16" if found.native_bf16 else "fp32",
            "reason": found.reason}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    """``python -m traitmon.precision``: print what ``auto`` resolves to here, per stage."""
    import json

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(describe(device)))
    for stage in ("finetune", "capture", "sampling", "judge"):
        resolve(AUTO, device, stage)


if __name__ == "__main__":
    main()
