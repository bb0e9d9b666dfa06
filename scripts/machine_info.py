"""The machine and date line printed above every benchmark table."""
from __future__ import annotations

import datetime
import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_name() -> str | None:
    try:
        import ctranslate2

        if ctranslate2.get_cuda_device_count() > 0:
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "CUDA GPU"
    except Exception:
        return None
    return None


def describe_machine() -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = gpu_name()
    return (f"{now}; {cpu_model()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB; "
            f"{'GPU: ' + gpu if gpu else 'no GPU'}; Python {platform.python_version()}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank-free linear percentile (numpy's default)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")
