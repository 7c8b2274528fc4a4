"""Cold start: `import functions.main` against `import functions_framework`, median of N fresh interpreters.

Run: python benchmarks/coldstart.py [N]   (goal: ratio ≤ 1.3)
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.3


def once(module: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, check=True)
    return time.perf_counter() - t


def main(n: int = 5) -> None:
    once("functions.main")  # warm the file cache once for both
    ours, base = [], []
    for _ in range(n):  # interleaved, so both see the same machine load
        base.append(once("functions_framework"))
        ours.append(once("functions.main"))
    mo, mb = statistics.median(ours), statistics.median(base)
    print(f"{'import':<22}{'median s':>10}")
    print(f"{'functions_framework':<22}{mb:>10.3f}")
    print(f"{'functions.main':<22}{mo:>10.3f}")
    print(f"ratio {mo / mb:.2f} (goal ≤ {GOAL}) → {'met' if mo / mb <= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
