"""On demand, not in CI (it needs a real helm and the chart): start-labs whose chart values try to leave the lab's box,
decoded and validated as the entry point does (a Pub/Sub event → decode_pubsub → parse_command); for each, the
refusal the sender gets, or the values the controller builds (build_spec, build_helm_values) rendered by a real
`helm template` of dask/dask, and what the rendered pods still carry. Usage:

    python -m tests.boundary_check --helm PATH/TO/helm --chart PATH/TO/helm-chart-checkout/dask

Prints one line per attack: refused (field: rule) or rendered (what of it reached a pod: nothing, or the finding).
"""

import argparse
import base64
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from dasklab import entry
from dasklab.adapters.release import LAB_ACCOUNT, POOL_LABEL, TOKEN_SECRET, build_helm_values
from dasklab.core.config import Config
from dasklab.core.errors import PermanentError
from dasklab.core.messages import parse_command
from dasklab.core.specs import build_spec

from tests.gke_world import CONFIG

ROOT = {"volumes": [{"name": "root", "hostPath": {"path": "/"}}], "volumeMounts": [{"name": "root", "mountPath": "/h"}]}
ATTACKS = {
    "mount the node": {"values": {"worker": {"mounts": ROOT}}},
    "borrow the install Job's account": {"values": {"worker": {"serviceAccountName": "dasklab-helm"},
                                                    "jupyter": {"serviceAccountName": "dasklab-helm"}}},
    "widen the security context": {"values": {"worker": {"securityContext": {"runAsUser": 0, "privileged": True}}}},
    "tolerate every taint": {"values": {"scheduler": {"tolerations": [{"operator": "Exists"}]}}},
    "token off by extraConfig": {"values": {"jupyter": {"extraConfig": "c.ServerApp.token = ''"}}},
    "token off by args": {"values": {"jupyter": {"args": ["start-notebook.py", "--ServerApp.token="]}}},
    "token off by NOTEBOOK_ARGS": {"values": {"jupyter": {"env": [{"name": "NOTEBOOK_ARGS",
                                                                   "value": "--ServerApp.token="}]}}},
    "token off by JUPYTER_TOKEN": {"values": {"jupyter": {"env": [{"name": "JUPYTER_TOKEN", "value": ""}]}}},
    "token from another Secret": {"values": {"worker": {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {
        "name": TOKEN_SECRET, "key": "token"}}}]}}},
    "public scheduler": {"values": {"scheduler": {"serviceType": "LoadBalancer"}}},
    "public Jupyter to the internet": {"expose": {"source_ranges": ["0.0.0.0/1", "128.0.0.0/1"]}},
    "another node pool": {"values": {"jupyter": {"nodeSelector": {POOL_LABEL: "workers"}}}},
    "a pod of its own": {"values": {"additional_worker_groups": [{"name": "x", "mounts": ROOT}]}},
    "a huge Jupyter on shared nodes": {"values": {"jupyter": {"resources": {"limits": {"cpu": 4, "memory": "16G"}}}}},
}


def findings(objects: list[dict]) -> list[str]:
    """What in the rendered objects leaves the box."""
    found = []
    for o in objects:
        if o["kind"] == "Service" and o["spec"].get("type") != "ClusterIP":
            found.append(f"Service {o['metadata']['name']} is {o['spec']['type']}")
        if o["kind"] != "Deployment":
            continue
        pod, name = o["spec"]["template"]["spec"], o["metadata"]["name"]
        if any("hostPath" in v for v in pod.get("volumes") or ()):
            found.append(f"{name} mounts a hostPath")
        if pod.get("serviceAccountName") != LAB_ACCOUNT:
            found.append(f"{name} runs as {pod.get('serviceAccountName')}")
        for key in ("securityContext", "tolerations", "affinity"):
            if pod.get(key):
                found.append(f"{name} has {key}")
        for c in pod["containers"]:
            if ("command" in c or "args" in c) and "jupyter" in name:
                found.append(f"{name} overrides its command")
            for e in c.get("env") or ():
                if e["name"] in ("JUPYTER_TOKEN", "NOTEBOOK_ARGS") and "valueFrom" not in e:
                    found.append(f"{name} sets {e['name']} itself")
                if "valueFrom" in e and e["name"] != "JUPYTER_TOKEN" and "fieldRef" not in e["valueFrom"]:
                    found.append(f"{name} reads {e['name']} from elsewhere")
    return found


def helm_template(helm: str, chart_dir: str, values: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "values.yaml").write_text(yaml.safe_dump(values))
        out = subprocess.run([helm, "template", "lab1", chart_dir, "--namespace", "dasklab-lab1", "-f",
                              str(Path(tmp) / "values.yaml")], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--helm", required=True)
    parser.add_argument("--chart", required=True)
    args = parser.parse_args(argv)
    leaks = 0
    for attack, fields in ATTACKS.items():
        msg = {"v": 1, "type": "start-lab", "lab": "lab1", "owner": "ann", **fields}
        event = {"message": {"data": base64.b64encode(json.dumps(msg).encode()).decode(), "messageId": "m"}}
        try:
            payload, _, _ = entry.decode_pubsub(event)  # the entry point's decoding, then its validation
            spec = build_spec(parse_command(payload), Config(backend="gke", project="p"), "shared")
        except PermanentError as e:
            print(f"{attack:36} refused   {e}")
            continue
        values = build_helm_values(spec, system_pool=CONFIG.system_pool, worker_pool=CONFIG.worker_pool)
        found = findings(helm_template(args.helm, args.chart, values))
        leaks += bool(found)
        said = [n.split(":", 1)[0] for n in spec.notes]
        print(f"{attack:36} rendered  {'; '.join(found) or 'nothing of it reached a pod'}"
              f"{' (notes: ' + ', '.join(said) + ')' if said else ''}")
    print(f"{len(ATTACKS)} attacks: {leaks} reached a rendered pod")
    return 1 if leaks else 0


if __name__ == "__main__":
    sys.exit(main())
