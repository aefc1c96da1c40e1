"""What this machine is, for ``info`` and the benchmark header."""
from __future__ import annotations

import os
import platform
from typing import Dict

from . import _core


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """cpuid's vendor, family and model, e.g. ``AuthenticAMD family 0x19 model 0x11``."""
    vendor, family, model = _core.cpu_id()
    if not vendor:
        return platform.machine()
    return f"{vendor} family {family:#x} model {model:#x}"


def caches() -> Dict[str, str]:
    """Per-core cache sizes as Linux reports them (``/sys``): e.g. ``{"L1d": "48K", "L2": "2048K"}``."""
    out: Dict[str, str] = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return out
    for entry in entries:
        try:
            def read(name: str) -> str:
                with open(os.path.join(base, entry, name)) as fh:
                    return fh.read().strip()

            kind, level, size = read("type"), read("level"), read("size")
        except OSError:
            continue
        if kind == "Instruction":
            continue
        out[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    return out


def describe_cpu() -> str:
    """One line: model, vendor/family/model, cores and caches."""
    cache = ", ".join(f"{k} {v}" for k, v in caches().items())
    return f"{cpu_model()} ({cpu_vendor()}; {os.cpu_count()} cores{'; ' + cache if cache else ''})"
