"""What is installed and which backends can run: ``attnkit.list_backends()`` and ``attnkit info``."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

import torch

from . import env, speed
from .registry import REGISTRY, BackendCapabilities


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str | None  # why unavailable, or None
    priority: int
    source: str  # "builtin" or the distribution that registered it
    description: str
    capabilities: BackendCapabilities
    details: dict[str, str] = field(default_factory=dict)


def list_backends() -> list[BackendStatus]:
    """Every registered backend, by descending priority, with availability and the reason when unavailable."""
    result = []
    for name in REGISTRY.names():
        b = REGISTRY.get(name)
        reason = b.unavailable_reason()
        details = {}
        if reason is None:
            try:
                details = b.info()
            except Exception as exc:
                details = {"info error": f"{type(exc).__name__}: {exc}"}
        result.append(
            BackendStatus(
                name=name,
                available=reason is None,
                reason=reason,
                priority=b.priority,
                source=REGISTRY.source(name),
                description=b.description,
                capabilities=b.capabilities,
                details=details,
            )
        )
    return sorted(result, key=lambda s: -s.priority)


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:
        return f"not installed ({type(exc).__name__})"
    return getattr(mod, "__version__", "unknown")


def environment() -> dict[str, str]:
    """Device and library versions."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch cuda": str(torch.version.cuda),
        "torch hip": str(getattr(torch.version, "hip", None)),
        "triton": _version("triton"),
        "cupy": _version("cupy"),
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        cc = torch.cuda.get_device_capability(idx)
        info["device"] = (
            f"{torch.cuda.get_device_name(idx)} (capability {cc[0]}.{cc[1]}, {torch.cuda.device_count()} visible)"
        )
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}), no CUDA/ROCm device"
    for name, value in env.snapshot().items():
        info[name] = "(unset)" if value is None else value
    return info


def format_info() -> str:
    lines = ["attnkit environment"]
    for key, value in environment().items():
        lines.append(f"  {key:<24} {value}")
    lines.append("")
    lines.append("backends (auto tries higher priority first)")
    for s in list_backends():
        state = "available" if s.available else f"unavailable: {s.reason}"
        lines.append(f"  {s.name} [priority {s.priority}, {s.source}] {state}")
        if s.description:
            lines.append(f"      {s.description}")
        if s.capabilities.device_types:  # a backend that failed to load declares nothing worth listing
            for key, value in s.capabilities.describe().items():
                lines.append(f"      {key:<15} {value}")
        for key, value in s.details.items():
            lines.append(f"      {key:<15} {value}")
    lines.append("")
    lines.append(f"speed table (auto tries these first, per class; {env.SPEED_TABLE} overrides)")
    try:
        table = speed.active_table(env.speed_table_setting())
    except Exception as exc:
        lines.append(f"  unusable: {exc}")
    else:
        arch = None
        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(torch.cuda.current_device())
            arch = speed.arch_of(cap, getattr(torch.version, "hip", None) is not None)
        lines += [f"  {line}" for line in speed.describe(table, arch)]
    return "\n".join(lines)
