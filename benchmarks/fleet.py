"""Fleet: one `reconcile` pass (Controller.reconcile_all) over 10, 100 and 500 READY labs on the GKE path against
the stand-ins, with injected latency per call (GKE gRPC and Kubernetes API, the service proxy included).

Run: python benchmarks/fleet.py [--sizes 10,100,500] [--workers 16,32,64] [--latency 0.05] [--classes 100,300]
Goals at 500 labs: one pass ≤ 5 s wall, ≤ 200 MB peak RSS.

Class rows (--classes): after the fleet rows, a class of each size is seeded among the fleet's labs (copies of
lab0000 as <class>-s000…, each record naming its class and student; the class record in the Firestore emulator when
the Google Cloud CLI's is installed, else in files) and one `reconcile-class` tick for it is measured: the class
fully ready, so the pass only observes (its labs, its budget) and changes nothing.

Three kinds of process, so that RSS is the controller's alone:
- the "cloud" (--cloud): GkeStandin, KubeStandin, MigStandin and one tiny HTTP server standing in for every lab's
  Dask dashboard (steady load: 1 worker, target 1, not idle → no scaling, no teardown); a fake helm renders the
  chart's objects and registers that server as the backend of the lab's scheduler Service. Driven over stdin.
- the controller (--controller): real clients to the cloud's addresses (one Kubernetes ApiClient per cluster, as
  GkeBackend.from_config builds them); creates lab0000 at latency 0, or measures one pass (ru_maxrss and CPU
  time of this process). The other labs are copies of lab0000 the cloud seeds into its stand-ins ("seed N").
- this orchestrator: starts them, sets the latency, counts calls, prints the table.
The labs' records (Firestore on Google Cloud) are files both share (tests.fakes.FileLabRecords): no latency, and
their writes are not counted.
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GRPC_THREADS = 256  # the GkeStandin serves 16 RPCs at a time by default: a stand-in limit, not GKE's


# --------------------------------------------------------------------------------------------------- the cloud

def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Dashboards(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the stand-in's proxy reuses its connections, as an API server does
    slow: dict[str, float] = {}  # namespace → extra seconds per answer (one slow lab)
    hits = 0

    def do_GET(self):  # /lab/<namespace>/<path>
        _, _, ns, rest = self.path.split("/", 3)
        type(self).hits += 1
        if self.slow.get(ns):
            time.sleep(self.slow[ns])
        body = {"json/counts.json": {"workers": 1, "processing": 0, "waiting": 0, "unrunnable": 0, "queued": 0,
                                     "clients": 1, "idle": 0, "saturated": 0, "desired_workers": 1},
                "api/v1/adaptive_target": {"workers": 1},
                "api/v1/check_idle": {"idle_since": None},
                "api/v1/get_workers": {"workers": []},
                "health": "ok"}.get(rest.split("?")[0])
        data = (body if isinstance(body, str) else json.dumps(body)).encode() if body is not None else b"{}"
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def cloud() -> None:
    from dataclasses import replace

    import yaml
    from dasklab.adapters.gke import build_labels
    from dasklab.adapters.release import chart_fullname
    from dasklab.core.model import Lab
    from tests.fakes import FileLabRecords
    from tests.gke_world import TOKEN, World
    from tests.standins.compute import MigStandin
    from tests.standins.gke import GkeStandin
    from tests.standins.kube import KubeStandin

    class WideGke(GkeStandin):
        def start(self):  # GrpcStandin.start builds ThreadPoolExecutor(max_workers=16): widen it
            import tests.standins.gke as mod
            real = mod.ThreadPoolExecutor
            mod.ThreadPoolExecutor = lambda max_workers, **kw: real(max_workers=GRPC_THREADS, **kw)
            try:
                return super().start()
            finally:
                mod.ThreadPoolExecutor = real

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboards)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dash_url = f"http://127.0.0.1:{server.server_address[1]}"
    gke = WideGke(operation_s=0.05).start()
    kube = KubeStandin(TOKEN, nodes=())
    migs = MigStandin(gke).start()

    class Shim:  # World._render needs .kube, and .manifests (what it rendered, per object)
        pass
    shim = Shim()
    shim.kube, shim.manifests = kube, {}

    def helm(job: dict) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        pod = job["spec"]["template"]["spec"]
        release = pod["containers"][0]["args"][2]
        values = yaml.safe_load(kube.get("configmaps", ns, pod["volumes"][0]["configMap"]["name"])["data"]
                                ["values.yaml"])
        full = chart_fullname(release)
        World._render(shim, ns, release, full, values)
        kube.register_service_backend(ns, f"{full}-scheduler", 80, f"{dash_url}/lab/{ns}")
        kube.complete_job(ns, name, log=f'Release "{release}" has been upgraded.\nSTATUS: deployed\n')

    kube.on_job_created(helm)

    records = FileLabRecords(os.environ["BENCH_RECORDS_DIR"])  # the controller's lab records, shared by file

    def copy_record(name: str, **spec) -> dict[str, str]:
        """lab0000's record as lab `name`'s (spec changed by `spec`); its cluster's labels."""
        lab = records.fetch_record("lab0000")
        lab = Lab(replace(lab.spec, name=name, **spec), lab.state)
        records.apply_create(lab)
        return build_labels(lab)

    def seed(n: int) -> dict:
        """Labs lab0001… up to n as copies of lab0000 (created through the controller): its cluster, and its
        namespace with every object in it, renamed; each copy's record copied from lab0000's."""
        t0 = time.monotonic()
        clusters = gke.clusters
        source = next(name for name in clusters if name.endswith("/clusters/lab0000"))
        have = {name.rsplit("/", 1)[-1] for name in clusters}
        objects = 0
        for i in range(1, n):
            name = f"lab{i:04d}"
            if name in have:
                continue
            objects += kube.clone_namespace("dasklab-lab0000", f"dasklab-{name}", {"lab0000": name})
            gke.clone_cluster(source, name, copy_record(name))
        return {"objects": objects, "seconds": round(time.monotonic() - t0, 1)}

    def seed_class(name: str, n: int) -> dict:
        """Students s000… of class `name` as copies of lab0000, their records naming the class and the student."""
        t0 = time.monotonic()
        source = next(c for c in gke.clusters if c.endswith("/clusters/lab0000"))
        for i in range(n):
            lab = f"{name}-s{i:03d}"
            kube.clone_namespace("dasklab-lab0000", f"dasklab-{lab}", {"lab0000": lab})
            gke.clone_cluster(source, lab, copy_record(lab, class_name=name, student=f"s{i:03d}"))
        return {"labs": n, "seconds": round(time.monotonic() - t0, 1)}

    print(json.dumps({"gke": gke.address, "kube": kube.url, "token": TOKEN, "migs": migs.address}), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "latency":
            gke.latency_s = kube.latency_s = float(args[0])
        elif cmd == "seed":
            print(json.dumps(seed(int(args[0]))), flush=True)
        elif cmd == "seed-class":
            print(json.dumps(seed_class(args[0], int(args[1]))), flush=True)
        elif cmd == "slow":
            _Dashboards.slow = {args[0]: float(args[1])} if float(args[1]) else {}
        elif cmd == "counts":
            reqs = kube.requests
            print(json.dumps({"gke": len(gke.calls), "kube": len(reqs),
                              "proxy": sum("/proxy/" in p for _, p in reqs),
                              "writes": sum(m in ("POST", "PUT", "PATCH", "DELETE") for m, _ in reqs)
                              + sum(not c.startswith(("Get", "List")) for c in gke.calls),
                              "migs": len(migs.calls), "dash": _Dashboards.hits,
                              "ops": len(gke.operations), "cpu": _cpu()}), flush=True)
        elif cmd == "quit":
            break
    server.shutdown()
    server.server_close()
    migs.stop()
    kube.stop()
    gke.stop()


# --------------------------------------------------------------------------------------------- the controller

def controller(addr: dict, mode: str, n: int, workers: int) -> None:
    import logging
    logging.getLogger("dasklab").setLevel(logging.ERROR)  # one JSON line per decision would swamp the output
    import grpc
    import kubernetes.client
    from dasklab.adapters.compute import Migs
    from dasklab.adapters.gke import GkeBackend
    from dasklab.core.messages import parse_command
    from dasklab.core.reconcile import Controller
    from google.cloud import container_v1 as gke
    from google.cloud.container_v1.services.cluster_manager.transports import ClusterManagerGrpcTransport
    from tests.fakes import FileLabRecords
    from tests.gke_world import CONFIG

    channel = grpc.insecure_channel(addr["gke"])
    clusters = gke.ClusterManagerClient(transport=ClusterManagerGrpcTransport(channel=channel))
    apis: dict = {}
    lock = threading.Lock()

    def kube_for(cluster):  # one ApiClient per cluster, as GkeBackend.from_config does
        with lock:
            if cluster.name not in apis:
                conf = kubernetes.client.Configuration(host=addr["kube"])
                conf.api_key = {"authorization": f"Bearer {addr['token']}"}
                apis[cluster.name] = kubernetes.client.ApiClient(conf)
            return apis[cluster.name]

    def migs_client():
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import compute_v1
        from google.cloud.compute_v1.services.instance_group_managers.transports import \
            InstanceGroupManagersRestTransport
        return compute_v1.InstanceGroupManagersClient(transport=InstanceGroupManagersRestTransport(
            host=addr["migs"], url_scheme="http", credentials=AnonymousCredentials()))

    class Events:
        def publish(self, event):
            pass

    store = None
    if mode == "measure-class":  # the class record: every student's lab started and announced ready
        from dasklab.core.classes import ClassRecord
        if os.environ.get("FIRESTORE_EMULATOR_HOST"):
            from dasklab.adapters.firestore import FirestoreClasses
            store = FirestoreClasses(f"bench-{os.getpid()}")
        else:
            from dasklab.adapters.files import FileClasses
            store = FileClasses(Path(os.environ["BENCH_CLASSES_DIR"]))
        roster = tuple(f"s{i:03d}" for i in range(n))
        now = time.time()
        store.apply_class(ClassRecord(f"class{n}", owner="bench", roster=roster, started={s: now for s in roster},
                                      ready_roster=roster, budget_class_usd=1000.0, published=now, created_at=now))
    ctl = Controller(GkeBackend(CONFIG, clusters, kube_for, Migs(migs_client),
                                FileLabRecords(os.environ["BENCH_RECORDS_DIR"]),
                                sleep=lambda s: None), Events(),
                     CONFIG, classes=store)
    out: dict = {}
    if mode == "create":  # labs lab0000… up to n, then passes until all are ready and a pass changes nothing
        have = {lab.name for lab in ctl.backend.fetch_labs()}
        new = [f"lab{i:04d}" for i in range(n) if f"lab{i:04d}" not in have]

        def start(name):
            ctl.handle(parse_command(json.dumps({
                "v": 1, "type": "start-lab", "lab": name, "owner": "bench",
                "workers": {"initial": 1, "min": 1, "max": 6}, "machine_type": "e2-standard-4",
                "worker_resources": {"cpu": 1, "memory": "3G"}, "idle_timeout": "1h", "max_lifetime": "12h",
                "values": (ROOT / "examples" / "config.yaml").read_text()})), "bench")

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(start, new))
        t0, passes = time.monotonic(), 0
        while True:
            passes += 1
            ctl.reconcile_all("reconcile", "bench", workers=32)
            labs = ctl.backend.fetch_labs()
            if len(labs) == n and all(lab.state.phase == "ready" for lab in labs):
                break
            if time.monotonic() - t0 > 600:
                pending = [(lab.name, lab.state.phase) for lab in labs if lab.state.phase != "ready"]
                raise SystemExit(f"labs not ready: {pending[:5]}")
        ctl.reconcile_all("reconcile", "bench", workers=32)  # settle: the first ready pass records its timers
        out = {"passes": passes, "seconds": round(time.monotonic() - t0, 1)}
    elif mode == "measure-class":  # one reconcile-class tick (a class's wake-up), cold then measured
        tick = parse_command(json.dumps({"v": 1, "type": "reconcile-class", "class": f"class{n}"}))
        c0 = time.monotonic()
        ctl.handle(tick, "warm")
        cold, listed = time.monotonic() - c0, len(ctl.backend.fetch_labs())
        record = store.fetch_class(f"class{n}")
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()
        t0, cpu0 = time.monotonic(), _cpu()
        ctl.handle(tick, "bench")
        wall, cpu = time.monotonic() - t0, _cpu() - cpu0
        after = store.fetch_class(f"class{n}")
        out = {"wall": wall, "cpu": cpu, "cold": cold,
               "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "store_writes": int(after.version) - int(record.version), "labs": listed}
    else:
        idle = mode == "measure-idle"  # two hours after the labs got ready every lab without work could be idle
        if idle:                       # for its timeout: each is asked check_idle (a teardown-idle tick's pass)
            ctl.clock = lambda: time.time() + 7200
        c0 = time.monotonic()  # a cold pass first (lazy imports of the kubernetes models, new connections)
        ctl.reconcile_all("reconcile", "warm", workers=workers, idle=idle)
        cold = time.monotonic() - c0
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()  # the orchestrator snapshots the call counts
        t0, cpu0 = time.monotonic(), _cpu()
        failed = ctl.reconcile_all("reconcile", "bench", workers=workers, idle=idle)
        wall, cpu = time.monotonic() - t0, _cpu() - cpu0
        out = {"wall": wall, "cpu": cpu, "cold": cold, "failed": len(failed), "rss0_mb": rss0 / 1024,
               "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "threads_after": threading.active_count()}
    for api in apis.values():
        api.close()
    channel.close()
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------- the orchestrator

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,500")
    ap.add_argument("--workers", default="16,32,64")
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--classes", default="100,300", help="class sizes for the reconcile-class rows ('' for none)")
    ap.add_argument("--cloud", action="store_true")
    ap.add_argument("--controller", nargs=4, metavar=("ADDR", "MODE", "N", "WORKERS"))
    a = ap.parse_args()
    if a.cloud:
        cloud()
        return 0
    if a.controller:
        addr, mode, n, w = a.controller
        controller(json.loads(addr), mode, int(n), int(w))
        return 0

    import tempfile
    from contextlib import ExitStack
    from dasklab.adapters import procs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the emulator and the stand-in are stopped
    path = [str(ROOT / "shared"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    me = [sys.executable, str(Path(__file__).resolve())]
    stack = ExitStack()
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-")))
    sizes = [int(c) for c in a.classes.split(",") if c]
    if sizes and procs.find_firestore_emulator() is not None:
        env["FIRESTORE_EMULATOR_HOST"] = stack.enter_context(procs.start_firestore_emulator(scratch / "fs")).host
    env["BENCH_CLASSES_DIR"] = str(scratch / "classes")
    env["BENCH_RECORDS_DIR"] = str(scratch / "records")  # the labs' records (Firestore in the cloud), in files
    cl = subprocess.Popen(me + ["--cloud"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    rows, class_rows = [], []
    try:
        addr = cl.stdout.readline().strip()

        def tell(line: str) -> dict | None:
            cl.stdin.write(line + "\n")
            cl.stdin.flush()
            return json.loads(cl.stdout.readline()) if line.split()[0] in ("counts", "seed", "seed-class") else None

        def run(mode: str, n: int, w: int) -> tuple[dict, dict]:
            p = subprocess.Popen(me + ["--controller", addr, mode, str(n), str(w)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
            try:
                before = {}
                if mode != "create":
                    assert p.stdout.readline().strip() == "ready"
                    before = tell("counts")
                    p.stdin.write("go\n")
                    p.stdin.flush()
                result = json.loads(p.stdout.readline())
                after = tell("counts")
                p.wait(timeout=60)
                if p.returncode:
                    raise SystemExit(f"controller exited {p.returncode}")
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            return result, {k: after[k] - before.get(k, 0) for k in after} if before else after

        made, _ = run("create", 1, 32)
        print(f"# lab0000 ready through the controller ({made['passes']} passes, {made['seconds']} s at "
              "latency 0)", flush=True)
        for n in map(int, a.sizes.split(",")):
            seeded = tell(f"seed {n}")
            print(f"# {n} labs: copies of lab0000 seeded ({seeded['objects']} objects, {seeded['seconds']} s)",
                  flush=True)
            tell(f"latency {a.latency}")
            for w in map(int, a.workers.split(",")):
                res, calls = run("measure", n, w)
                rows.append((n, w, res, calls))
                print(f"  n={n} workers={w}: {json.dumps(res)} calls={json.dumps(calls)}", flush=True)
        # a pass asking every lab since when it is idle (one more proxy call each): what a teardown-idle tick does,
        # and the most a reconcile tick adds over its passes (each lab asked once per tick, spread by its name)
        n = int(a.sizes.split(",")[-1])
        first, first_calls = run("measure-idle", n, 64)
        # one slow lab (its dashboard 2 s per answer) must not hold the others back
        tell("slow dasklab-lab0000 2.0")
        slow, _ = run("measure", n, 64)
        tell("slow dasklab-lab0000 0")
        for k in sizes:  # a class among the fleet's labs: one reconcile-class tick for it
            tell("latency 0")
            seeded = tell(f"seed-class class{k} {k}")
            print(f"# class{k}: {k} students seeded ({seeded['seconds']} s)", flush=True)
            tell(f"latency {a.latency}")
            res, calls = run("measure-class", k, 64)
            class_rows.append((k, res, calls))
            print(f"  class of {k}: {json.dumps(res)} calls={json.dumps(calls)}", flush=True)
    finally:
        if cl.poll() is None:
            cl.stdin.write("quit\n")
            cl.stdin.flush()
            try:
                cl.wait(timeout=30)
            except subprocess.TimeoutExpired:
                cl.kill()
                cl.wait()
        stack.close()

    print(f"\nOne reconcile pass over N READY GKE labs, {a.latency * 1000:.0f} ms per GKE/Kubernetes call "
          f"(warm pass, after a cold one; RSS = ru_maxrss of the controller process: after the cold pass → peak)")
    print(f"{'labs':>5} {'workers':>7} {'wall s':>7} {'s/lab ms':>8} {'GKE':>6} {'kube':>6} {'proxy':>6} "
          f"{'writes':>6} {'RSS MB':>15} {'failed':>6} {'cold s':>6}")
    for n, w, r, c in rows:
        print(f"{n:>5} {w:>7} {r['wall']:>7.2f} {1000 * r['wall'] / n:>8.1f} {c['gke']:>6} {c['kube']:>6} "
              f"{c['proxy']:>6} {c['writes']:>6} {r['rss0_mb']:>6.0f} → {r['rss_mb']:>5.0f} {r['failed']:>6} "
              f"{r['cold']:>6.2f}")
    big = [(w, r) for n, w, r, _ in rows if n == 500]
    for w, r in big:
        print(f"500 labs, workers={w}: wall {r['wall']:.2f} s = {r['wall'] / 5:.2f}× the 5 s goal; "
              f"peak RSS {r['rss_mb']:.0f} MB = {r['rss_mb'] / 200:.2f}× the 200 MB goal")
    print(f"a pass asking every lab check_idle (teardown-idle; a reconcile tick spreads these), {n} labs, workers=64: wall "
          f"{first['wall']:.2f} s = {first['wall'] / 5:.2f}× the 5 s goal, peak RSS {first['rss_mb']:.0f} MB, "
          f"kube {first_calls['kube']} (proxy {first_calls['proxy']}), failed {first['failed']}")
    print(f"one slow lab (2 s per dashboard call, {n} labs, workers=64): wall {slow['wall']:.2f} s, "
          f"failed {slow['failed']}")
    if class_rows:
        store = "Firestore emulator" if "FIRESTORE_EMULATOR_HOST" in env else "files"
        print(f"\nOne reconcile-class tick over a READY class (its labs among all labs listed; class record: {store})")
        print(f"{'class':>5} {'labs':>5} {'wall s':>7} {'GKE':>6} {'kube':>6} {'proxy':>6} {'writes':>6} "
              f"{'store w':>7} {'cold s':>6}")
        for k, r, c in class_rows:
            print(f"{k:>5} {r['labs']:>5} {r['wall']:>7.2f} {c['gke']:>6} {c['kube']:>6} {c['proxy']:>6} "
                  f"{c['writes']:>6} {r['store_writes']:>7} {r['cold']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
