"""Before and after, in one run: benchmarks/fleet.py on an earlier commit's code and on this tree's, side by side,
each in its own processes against its own stand-ins, then the ratios of their one-pass rows.

Run: python benchmarks/before_after.py --before 4478e14 [fleet.py's options, e.g. --sizes 500 --workers 64
--classes '']
The earlier commit is unpacked with `git archive` into a temporary folder and imported from there (its `shared/`
first on PYTHONPATH), so both runs use this machine's installed packages and differ only in dasklab's code.
"""

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+) →\s+(\d+)\s+(\d+)")


def run(tree: Path, args: list[str]) -> tuple[str, dict]:
    """fleet.py of `tree` with `args`: its output, and its rows by (labs, workers)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "shared"), str(tree)])}
    out = subprocess.run([sys.executable, str(tree / "benchmarks" / "fleet.py"), *args], env=env, cwd=tree,
                         capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"fleet.py of {tree} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    rows = {}
    for line in out.stdout.splitlines():
        if m := ROW.match(line):
            n, w, wall, _, gke, kube, proxy, writes, _, rss, failed = m.groups()
            rows[int(n), int(w)] = {"wall": float(wall), "gke": int(gke), "kube": int(kube), "proxy": int(proxy),
                                    "writes": int(writes), "rss": int(rss), "failed": int(failed)}
    return out.stdout, rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the commit to compare with (e.g. the last one before a change)")
    a, fleet_args = ap.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="before-") as scratch:
        old = Path(scratch)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.before], capture_output=True, check=True)
        archive_path = old / "tree.tar"
        archive_path.write_bytes(archive.stdout)
        with tarfile.open(archive_path) as tar:
            tar.extractall(old, filter="data")
        print(f"# before: {a.before} (unpacked in {old})", flush=True)
        before_out, before = run(old, fleet_args)
    print(before_out, flush=True)
    print("# after: this tree", flush=True)
    after_out, after = run(ROOT, fleet_args)
    print(after_out, flush=True)
    print(f"One reconcile pass, before ({a.before}) and after (this tree), in one run:")
    print(f"{'labs':>5} {'workers':>7} {'wall s before':>13} {'after':>7} {'after/before':>12} {'kube before':>11} "
          f"{'after':>6} {'writes before':>13} {'after':>6} {'RSS MB before':>13} {'after':>6} {'failed':>7}")
    for key in sorted(set(before) & set(after)):
        b, f = before[key], after[key]
        print(f"{key[0]:>5} {key[1]:>7} {b['wall']:>13.2f} {f['wall']:>7.2f} {f['wall'] / b['wall']:>11.2f}× "
              f"{b['kube']:>11} {f['kube']:>6} {b['writes']:>13} {f['writes']:>6} {b['rss']:>13} {f['rss']:>6} "
              f"{b['failed']:>3}/{f['failed']:<3}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
