"""Where the numbers came from: device, driver, library versions, date and attnkit commit."""

from __future__ import annotations

import datetime
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cupy_version() -> str | None:
    # CuPy ships as cupy-cuda12x, cupy-cuda13x, cupy-rocm-..., or plain cupy; read metadata, not the module,
    # because importing cupy initialises CUDA.
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name == "cupy" or name.startswith("cupy-"):
            return f"{name} {dist.version}"
    return None


def git_commit() -> str | None:
    """The attnkit checkout's commit, with ``-dirty`` when tracked files differ (None outside a checkout)."""
    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        return None
    commit = _run(["git", "rev-parse", "HEAD"], root)
    if commit is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], root)
    return commit + ("-dirty" if dirty else "")


def gpu_info(device: torch.device) -> dict[str, object]:
    if device.type != "cuda":
        return {"gpu": None, "device": f"cpu ({platform.processor() or platform.machine()})", "driver": None}
    props = torch.cuda.get_device_properties(device)
    info: dict[str, object] = {
        "gpu": props.name,
        "device": str(device),
        "compute_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
    }
    driver = None
    if shutil.which("nvidia-smi"):
        index = device.index if device.index is not None else torch.cuda.current_device()
        driver = _run(["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"])
    if driver is None and shutil.which("rocm-smi"):
        driver = _run(["rocm-smi", "--showdriverversion"])
    if driver is None:
        # Without the vendor tool, the runtime version torch was built against is the best available hint.
        driver = f"unknown (torch built with CUDA {torch.version.cuda}, HIP {getattr(torch.version, 'hip', None)})"
    info["driver"] = driver
    return info


def collect(device: torch.device) -> dict[str, object]:
    from .. import __version__

    return {
        **gpu_info(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "triton": _dist_version("triton") or _dist_version("pytorch-triton-rocm"),
        "cupy": _cupy_version(),
        "flash_attn": _dist_version("flash-attn") or _dist_version("flash_attn"),
        "attnkit": __version__,
        "attnkit_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
