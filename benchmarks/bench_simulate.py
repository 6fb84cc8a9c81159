"""Wall time of `estdp simulate` (defaults: the seed's headline experiment), median of runs.

    python benchmarks/bench_simulate.py [--repeat 3] [-- extra estdp simulate flags]

Each run is a separate `estdp simulate --json` process writing its report under
reports/bench-simulate/<i>; the last line printed is one JSON object with the median wall
seconds, the compressed and baseline accuracies of each run, and the host's CPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="reports/bench-simulate")
    parser.add_argument("extra", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    runs = []
    for i in range(args.repeat):
        out = Path(args.out) / str(i)
        shutil.rmtree(out, ignore_errors=True)
        argv = [
            sys.executable,
            "-m",
            "estdp.cli",
            "simulate",
            "--json",
            "--quiet",
            "--out",
            str(out),
            *extra,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(
                proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
                file=sys.stderr,
            )
            return 1
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(
            {
                "seconds": round(seconds, 1),
                **{
                    k: summary.get(k)
                    for k in ("accuracy_compressed", "accuracy_baseline", "speedup")
                },
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    record = {
        "benchmark": "simulate",
        "args": extra,
        "cpus": os.cpu_count(),
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "runs": runs,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
