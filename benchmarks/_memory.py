"""Peak memory of the running process, for the benchmarks that report it."""

from __future__ import annotations

import resource
from pathlib import Path


def vm_hwm_mib() -> float:
    """Peak resident memory of this process so far (VmHWM), MiB.

    Unlike ``ru_maxrss``, VmHWM is not inherited from the parent across fork and exec,
    so a fresh child process reports its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
