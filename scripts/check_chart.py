#!/usr/bin/env python3
"""Offline checks of the Helm chart in helm/locus: no cluster and no helm binary.

Needs `pip install helm-python-sdk kubernetes-validate` (Helm v4's engine as a library, and the
Kubernetes API schemas). In order:

1. `helm lint --strict` of the chart, with its own defaults and with readers on a store.
2. Renders it with several value sets, its defaults (a single writer) first, and validates every manifest with `kubernetes-validate
   --strict` against the oldest Kubernetes the chart allows and the newest the validator knows.
   The ServiceMonitor is a CRD outside those schemas: its shape is checked here instead.
3. Asserts what the deployment relies on (gRPC probes, listeners and ports, GPU limits, tokens only through
   secretKeyRef, the writer's volume, the HPA's target, the settings file, ...).
4. Renders each value of values.yaml changed on its own and requires a different output, so no
   value is dead, and requires every value to be described by values.schema.json.
5. Requires bad values to be rejected at render time, by values.schema.json or the chart's checks.
6. Requires every metric the Grafana dashboard (helm/locus/dashboards/locus.json) queries to be one
   the server registers.

Exits non-zero with the failures listed.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import yaml

try:
    import helm_python as helm
except ImportError:
    sys.exit("check_chart: needs `python3 -m pip install helm-python-sdk kubernetes-validate`")

CHART = Path(__file__).resolve().parent.parent / "helm" / "locus"
DASHBOARD = CHART / "dashboards" / "locus.json"
METRICS_SOURCE = CHART.parent.parent / "src" / "server" / "metrics.rs"
RELEASE = "locus"
NAMESPACE = "ml"
# The chart's kubeVersion floor (gRPC probes) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.27.0", "1.37.0"]
# Kinds whose schemas are not in Kubernetes' own API; each is checked by a function below.
CRD_KINDS = {"ServiceMonitor"}

S3 = {"store": {"url": "s3://models-bucket/locus"}}
READERS = {"readers": {"enabled": True}}
# Readers on an object store: the base the value mutations and the bad value sets start from.
SCALED = {**S3, **READERS}

CASES: dict[str, dict[str, Any]] = {
    # `helm install` with nothing given: one writer on its volume, no store, no readers.
    "defaults": {},
    "scaled": SCALED,
    "gpu": {
        **SCALED,
        "gpu": {"enabled": True},
        "config": {"strategy": "tgl-fp", "lr": 1e-4, "batch-size": 16, "ema": 0.95},
    },
    "s3-secrets-monitor": {
        "store": {"url": "s3://models-bucket/locus", "existingSecret": "locus-s3"},
        **READERS,
        "auth": {"existingSecret": "locus-tokens"},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/locus"}},
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "locus"}},
        },
        "env": [{"name": "RUST_LOG", "value": "info"}],
    },
    "writer-publishing": S3,
    "http": {**SCALED, "http": {"enabled": True, "port": 8000}},
    "shared-volume": {
        "store": {"url": "file:///shared/locus", "sharedVolume": {"claimName": "locus-shared"}},
        "model": {"path": "/models/custom.gguf", "volume": {"persistentVolumeClaim": {"claimName": "models"}}},
        "auth": {"writeToken": "w-secret-123", "queryToken": "q-secret-456"},
        "readers": {"enabled": True, "autoscaling": {"enabled": False}, "replicas": 3},
        "config": {"follow-interval": 5, "checkpoint-every": 50, "shutdown-grace": 60},
    },
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else v
    return out


def render(chart: helm.Chart, values: dict | None) -> dict[str, str]:
    """Template path -> rendered text, NOTES.txt included."""
    return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def documents(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.items.append(what)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict | None:
    found = [
        d for d in by_kind(docs, kind)
        if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    return found[0] if len(found) == 1 else None


def pod_of(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict:
    return pod_of(workload)["containers"][0]


def secret_ref(env: list[dict], name: str) -> dict | None:
    for e in env:
        if e["name"] == name:
            return e.get("valueFrom", {}).get("secretKeyRef") if "value" not in e else None
    return None


def check_case(name: str, values: dict, docs: list[dict], f: Failures) -> None:
    """The facts every deployment relies on, for one rendering; `values` has the chart's defaults
    filled in."""
    p = f"[{name}]"
    readers_on = values.get("readers", {}).get("enabled", True)
    gpu = values.get("gpu", {}).get("enabled", False)
    writer = one(docs, "StatefulSet", "writer")
    reader = one(docs, "Deployment", "reader")
    f.check(writer is not None, f"{p} exactly one writer StatefulSet")
    f.check((reader is not None) == readers_on, f"{p} a reader Deployment iff readers.enabled")
    if writer is None:
        return

    for d in docs:
        labels = d["metadata"].get("labels", {})
        f.check(
            labels.get("app.kubernetes.io/instance") == RELEASE and "app.kubernetes.io/name" in labels,
            f"{p} {d['kind']} {d['metadata']['name']} has the standard labels",
        )

    # The writer: one replica, its own volume at /data, the writer role.
    f.check(writer["spec"]["replicas"] == 1, f"{p} writer has 1 replica")
    claims = writer["spec"].get("volumeClaimTemplates", [])
    f.check([c["metadata"]["name"] for c in claims] == ["data"], f"{p} writer has a PVC template `data`")
    wc = container(writer)
    f.check({"name": "data", "mountPath": "/data"} in wc["volumeMounts"], f"{p} writer mounts its PVC at /data")
    f.check("--data-dir=/data" in wc["args"] and "--role=writer" in wc["args"], f"{p} writer args")
    headless = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    f.check(
        len(headless) == 1 and writer["spec"]["serviceName"] == headless[0]["metadata"]["name"],
        f"{p} the StatefulSet's serviceName is its headless service",
    )
    store_url = values["store"]["url"]
    # The listeners each pod opens, by port name; the services carry the same.
    http = values["http"]
    want_ports = {"grpc": 50051, "metrics": 9090} | ({"http": http["port"]} if http["enabled"] else {})

    workloads = [w for w in (writer, reader) if w is not None]
    settings = [c for c in by_kind(docs, "ConfigMap") if not c["metadata"]["name"].endswith("-dashboard")]
    config_map = settings[0] if len(settings) == 1 else None
    f.check(config_map is not None, f"{p} one settings ConfigMap")
    for w in workloads:
        role = w["metadata"]["labels"]["app.kubernetes.io/component"]
        q = f"{p} {role}:"
        c, pod = container(w), pod_of(w)
        args = c["args"]
        f.check(args[0] == "serve" and f"--role={role}" in args, f"{q} serve --role={role}")
        if store_url:
            f.check(f"--store={store_url}" in args, f"{q} --store={store_url}")
        else:
            f.check(not any(a.startswith("--store") for a in args), f"{q} no --store without store.url")
        f.check("--grpc-addr=0.0.0.0:50051" in args and "--metrics-addr=0.0.0.0:9090" in args, f"{q} listen addresses")
        http_args = [a for a in args if a.startswith("--http-addr")]
        want_http = [f"--http-addr=0.0.0.0:{http['port']}"] if http["enabled"] else []
        f.check(http_args == want_http, f"{q} {want_http or 'no --http-addr'} (http.enabled)")
        f.check({pt["name"]: pt["containerPort"] for pt in c["ports"]} == want_ports, f"{q} container ports {want_ports}")
        f.check("--config=/etc/locus/locus.toml" in args, f"{q} --config")
        # Probes: native gRPC health checks only.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            pr = c.get(probe, {})
            f.check(pr.get("grpc") == {"port": 50051}, f"{q} {probe} is grpc on 50051")
            f.check(not {"httpGet", "exec", "tcpSocket"} & pr.keys(), f"{q} {probe} has no other handler")
        startup = c["startupProbe"]
        f.check(startup["periodSeconds"] * startup["failureThreshold"] >= 300, f"{q} startupProbe allows >= 5 min")
        # GPU.
        limits = c.get("resources", {}).get("limits", {})
        if gpu:
            f.check(limits.get("nvidia.com/gpu") == 1, f"{q} nvidia.com/gpu limit 1")
            f.check("--device=cuda:0" in args, f"{q} --device=cuda:0")
            f.check(c["image"].endswith("-cuda"), f"{q} the cuda image")
            f.check(
                any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in pod.get("tolerations", [])),
                f"{q} tolerates the nvidia.com/gpu taint",
            )
        else:
            f.check("nvidia.com/gpu" not in limits, f"{q} no GPU limit without gpu.enabled")
            f.check(not any(a.startswith("--device") for a in args), f"{q} no --device without gpu.enabled")
            f.check(not c["image"].endswith("-cuda"), f"{q} CPU image")
        # Tokens: environment from a Secret, never literal values, args or the ConfigMap.
        env = c.get("env", [])
        f.check(not any("token" in a for a in args), f"{q} no token in args")
        for var in ("LOCUS_WRITE_TOKEN", "LOCUS_QUERY_TOKEN"):
            for e in env:
                if e["name"] == var:
                    f.check(secret_ref(env, var) is not None, f"{q} {var} comes from a secretKeyRef")
        auth = values.get("auth", {})
        if auth.get("existingSecret") or auth.get("writeToken"):
            ref = secret_ref(env, "LOCUS_WRITE_TOKEN")
            f.check(ref is not None and ref["key"] == "write-token", f"{q} LOCUS_WRITE_TOKEN from secret key write-token")
            if auth.get("existingSecret"):
                f.check(ref is not None and ref["name"] == auth["existingSecret"], f"{q} tokens from auth.existingSecret")
        # Store credentials.
        if values["store"].get("existingSecret"):
            f.check(
                {"secretRef": {"name": values["store"]["existingSecret"]}} in c.get("envFrom", []),
                f"{q} envFrom store.existingSecret",
            )
        # Security: non-root, read-only root, writable /tmp, memory-backed /dev/shm.
        sc, psc = c["securityContext"], pod["securityContext"]
        f.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) > 0, f"{q} runs as non-root")
        f.check(sc.get("readOnlyRootFilesystem") is True, f"{q} read-only root filesystem")
        f.check(sc.get("allowPrivilegeEscalation") is False, f"{q} no privilege escalation")
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        f.check("/tmp" in mounts, f"{q} /tmp is writable")
        shm = volumes.get(mounts.get("/dev/shm", {}).get("name"), {})
        f.check(shm.get("emptyDir", {}).get("medium") == "Memory", f"{q} /dev/shm is an emptyDir in memory")
        f.check(pod.get("enableServiceLinks") is False, f"{q} no service-link variables")
        # Settings file.
        cfg = volumes.get(mounts.get("/etc/locus", {}).get("name"), {})
        f.check(
            config_map is not None and cfg.get("configMap", {}).get("name") == config_map["metadata"]["name"],
            f"{q} mounts the ConfigMap at /etc/locus",
        )
        # Shared-volume store: read-write for the writer, read-only for readers.
        shared = values["store"].get("sharedVolume", {}).get("claimName")
        if shared:
            m = [m for m in c["volumeMounts"] if m["name"] == "store"]
            f.check(
                len(m) == 1 and m[0]["readOnly"] == (role == "reader")
                and volumes["store"]["persistentVolumeClaim"]["claimName"] == shared
                and store_url.removeprefix("file://").startswith(m[0]["mountPath"] + "/"),
                f"{q} shared store volume mounted (read-only for readers) under the store path",
            )
        model = values.get("model", {})
        if model.get("volume"):
            f.check(f"--model={model['path']}" in args, f"{q} --model={model['path']}")
            f.check(any(m["name"] == "model" and m["readOnly"] for m in c["volumeMounts"]), f"{q} model volume read-only")

    # Settings: TOML that parses back to exactly the given config.
    if config_map is not None:
        text = config_map["data"]["locus.toml"]
        try:
            parsed = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            f.items.append(f"{p} locus.toml does not parse: {e}")
            parsed = None
        if parsed is not None:
            want = values.get("config", {})
            f.check(parsed == want, f"{p} locus.toml is {parsed}, expected {want}")
            f.check(
                all(type(parsed[k]) is type(v) for k, v in want.items()),
                f"{p} locus.toml keeps integer and float types",
            )
        f.check("token" not in text, f"{p} no token in the ConfigMap")

    # Chart-made Secret: holds the tokens, and the plain tokens appear nowhere else.
    auth = values.get("auth", {})
    plain = [t for t in (auth.get("writeToken"), auth.get("queryToken")) if t]
    secrets = by_kind(docs, "Secret")
    if plain:
        f.check(len(secrets) == 1, f"{p} the chart makes one Secret for the tokens")
        text = json.dumps(docs)
        f.check(not any(t in text for t in plain), f"{p} plain tokens appear nowhere in the manifests")
    else:
        f.check(not secrets, f"{p} no Secret without tokens from values")

    # Readers: HPA aims at the Deployment; replicas left to it.
    hpa = one(docs, "HorizontalPodAutoscaler")
    autoscale = readers_on and values.get("readers", {}).get("autoscaling", {}).get("enabled", True)
    f.check((hpa is not None) == bool(autoscale), f"{p} an HPA iff readers autoscale")
    if hpa is not None and reader is not None:
        ref = hpa["spec"]["scaleTargetRef"]
        f.check(
            ref == {"apiVersion": "apps/v1", "kind": "Deployment", "name": reader["metadata"]["name"]},
            f"{p} HPA targets the reader Deployment",
        )
        f.check("replicas" not in reader["spec"], f"{p} reader replicas are left to the HPA")
        metric = hpa["spec"]["metrics"][0]["resource"]
        f.check(metric["name"] == "cpu" and metric["target"]["type"] == "Utilization", f"{p} HPA on CPU utilization")
        f.check("cpu" in container(reader)["resources"].get("requests", {}), f"{p} readers request CPU for the HPA")
    if reader is not None and not autoscale:
        f.check(reader["spec"].get("replicas") == values["readers"]["replicas"], f"{p} readers.replicas used")

    # Services select the right pods and carry the ports the probes and monitor use.
    services = by_kind(docs, "Service")
    for comp in ["writer"] + (["reader"] if readers_on else []):
        svc = [s for s in services if s["spec"]["selector"].get("app.kubernetes.io/component") == comp
               and s["spec"].get("clusterIP") != "None"]
        f.check(len(svc) == 1, f"{p} one {comp} service")
        if svc:
            ports = {pt["name"]: pt["port"] for pt in svc[0]["spec"]["ports"]}
            f.check(ports == want_ports, f"{p} {comp} service ports {want_ports}")

    monitors = by_kind(docs, "ServiceMonitor")
    want_monitor = values.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
    f.check(len(monitors) == (1 if want_monitor else 0), f"{p} a ServiceMonitor iff metrics.serviceMonitor.enabled")
    for m in monitors:
        check_service_monitor(p, m, services, f)

    dashboard = values.get("metrics", {}).get("grafanaDashboard", {})
    maps = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    f.check(len(maps) == (1 if dashboard.get("enabled") else 0),
            f"{p} a dashboard ConfigMap iff metrics.grafanaDashboard.enabled")
    for c in maps:
        f.check(c["metadata"]["labels"].get("grafana_dashboard") == "1", f"{p} dashboard sidecar label")
        f.check(json.loads(c["data"]["locus.json"]) == json.loads(DASHBOARD.read_text()),
                f"{p} dashboard ConfigMap carries dashboards/locus.json unchanged")


def check_dashboard(f: Failures) -> None:
    """Every metric a dashboard expression names is one the server registers (src/server/metrics.rs);
    tests/operations.rs checks the same names against a real server's scrape."""
    registered = set(re.findall(r'"(locus_[a-z_]+)"', METRICS_SOURCE.read_text()))
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    f.check(len(exprs) >= 10, f"dashboard has its panels, got {len(exprs)} expressions")
    for e in exprs:
        for name in re.findall(r"\blocus_[a-z_]+", e):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            f.check(base in registered, f"dashboard expression names `{name}`, which the server does not export")


def check_service_monitor(p: str, m: dict, services: list[dict], f: Failures) -> None:
    """kubernetes-validate has no schema for this CRD: the fields Prometheus Operator needs."""
    f.check(m.get("apiVersion") == "monitoring.coreos.com/v1", f"{p} ServiceMonitor apiVersion")
    f.check(set(m) <= {"apiVersion", "kind", "metadata", "spec"}, f"{p} ServiceMonitor top-level fields")
    spec = m.get("spec", {})
    f.check(set(spec) <= {"selector", "endpoints", "namespaceSelector"}, f"{p} ServiceMonitor spec fields")
    selector = spec.get("selector", {}).get("matchLabels", {})
    endpoints = spec.get("endpoints", [])
    f.check(bool(selector) and len(endpoints) == 1, f"{p} ServiceMonitor selector and one endpoint")
    for e in endpoints:
        f.check(set(e) <= {"port", "path", "interval"} and e.get("port") == "metrics"
                and e.get("path") == "/metrics", f"{p} ServiceMonitor endpoint scrapes port `metrics` at /metrics")
    matched = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    scraped = [s for s in matched if any(pt["name"] == "metrics" for pt in s["spec"]["ports"])]
    comps = sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped)
    f.check(comps in (["writer"], ["reader", "writer"]) and len(comps) == len(set(comps)),
            f"{p} ServiceMonitor scrapes each role once, got {comps}")


def kubernetes_validate(files: list[Path], f: Failures) -> None:
    for version in KUBE_VERSIONS:
        r = subprocess.run(
            ["kubernetes-validate", "--strict", "--quiet", "-k", version, *map(str, files)],
            capture_output=True, text=True,
        )
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or "Couldn't find schema" in out:
            f.items.append(f"kubernetes-validate --strict -k {version} failed:\n{out}")


def kubernetes_validate_rejects(tmp: Path, f: Failures) -> None:
    """The validator itself must catch an unknown field, or a pass above would mean nothing."""
    bad = tmp / "self-test-bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1}], "clusterIp": "None"},
    }))
    r = subprocess.run(["kubernetes-validate", "--strict", str(bad)], capture_output=True, text=True)
    f.check(r.returncode != 0, "kubernetes-validate --strict accepted a misspelled field; the checks above mean nothing")


def leaves(values: Any, prefix: str = "") -> list[str]:
    """Dotted paths of values.yaml's settings; empty maps and lists count as one setting."""
    if isinstance(values, dict) and values:
        return [p for k, v in values.items() for p in leaves(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def nest(path: str, value: Any) -> dict:
    out: Any = value
    for k in reversed(path.split(".")):
        out = {k: out}
    return out


# For each setting: (values that make it matter, a different value). Rendering both must differ.
GPU_ON = {"gpu": {"enabled": True}}
MUTATIONS: dict[str, tuple[dict, Any]] = {
    "image.repository": ({}, "registry.example/locus"),
    "image.tag": ({}, "v9"),
    "image.pullPolicy": ({}, "Always"),
    "imagePullSecrets": ({}, [{"name": "regcred"}]),
    "nameOverride": ({}, "lm"),
    "fullnameOverride": ({}, "lm-prod"),
    "store.url": ({}, "gs://other/prefix"),
    "store.existingSecret": ({}, "store-creds"),
    "store.sharedVolume.claimName": ({}, "shared"),
    "store.sharedVolume.mountPath": ({"store": {"sharedVolume": {"claimName": "shared"}}}, "/mnt/store"),
    "model.path": ({}, "/models/m.gguf"),
    "model.volume": ({}, {"persistentVolumeClaim": {"claimName": "models"}}),
    "model.mountPath": ({"model": {"volume": {"persistentVolumeClaim": {"claimName": "models"}}}}, "/opt/models"),
    "auth.existingSecret": ({}, "tokens"),
    "auth.writeToken": ({}, "w"),
    "auth.queryToken": ({}, "q"),
    "config": ({}, {"lr": 0.001}),
    "env": ({}, [{"name": "RUST_LOG", "value": "info"}]),
    "gpu.enabled": ({}, True),
    "gpu.nodeSelector": (GPU_ON, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}),
    "gpu.tolerations": (GPU_ON, []),
    "writer.resources.requests.cpu": ({}, "3"),
    "writer.resources.requests.memory": ({}, "6Gi"),
    "writer.resources.limits.memory": ({}, "12Gi"),
    "writer.persistence.size": ({}, "50Gi"),
    "writer.persistence.storageClass": ({}, "fast-ssd"),
    "readers.enabled": ({}, False),
    "readers.replicas": ({"readers": {"autoscaling": {"enabled": False}}}, 5),
    "readers.resources.requests.cpu": ({}, "2"),
    "readers.resources.requests.memory": ({}, "3Gi"),
    "readers.resources.limits.memory": ({}, "6Gi"),
    "readers.service.type": ({}, "LoadBalancer"),
    "readers.autoscaling.enabled": ({}, False),
    "readers.autoscaling.minReplicas": ({}, 3),
    "readers.autoscaling.maxReplicas": ({}, 20),
    "readers.autoscaling.targetCPUUtilizationPercentage": ({}, 50),
    "shm.sizeLimit": ({}, "2Gi"),
    "startupProbe.periodSeconds": ({}, 5),
    "startupProbe.failureThreshold": ({}, 120),
    "terminationGracePeriodSeconds": ({}, 300),
    "serviceAccount.create": ({}, False),
    "serviceAccount.name": ({}, "custom"),
    "serviceAccount.annotations": ({}, {"iam.gke.io/gcp-service-account": "locus@p.iam.gserviceaccount.com"}),
    "http.enabled": ({}, True),
    "http.port": ({"http": {"enabled": True}}, 8000),
    "metrics.serviceMonitor.enabled": ({}, True),
    "metrics.serviceMonitor.interval": ({"metrics": {"serviceMonitor": {"enabled": True}}}, "15s"),
    "metrics.serviceMonitor.labels": ({"metrics": {"serviceMonitor": {"enabled": True}}}, {"release": "prom"}),
    "metrics.grafanaDashboard.enabled": ({}, True),
    "metrics.grafanaDashboard.labels.grafana_dashboard": ({"metrics": {"grafanaDashboard": {"enabled": True}}}, "yes"),
    "metrics.grafanaDashboard.annotations": ({"metrics": {"grafanaDashboard": {"enabled": True}}}, {"grafana_folder": "ml"}),
    "nodeSelector": ({}, {"pool": "locus"}),
    "tolerations": ({}, [{"key": "dedicated", "operator": "Equal", "value": "locus", "effect": "NoSchedule"}]),
    "affinity": ({}, {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}),
}


def schema_node(schema: dict, node: dict, key: str) -> dict | None:
    node = resolve(schema, node)
    if key in node.get("properties", {}):
        return resolve(schema, node["properties"][key])
    extra = node.get("additionalProperties")
    return resolve(schema, extra) if isinstance(extra, dict) else None


def resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].removeprefix("#/definitions/")]
    return node


def check_values_used(chart: helm.Chart, f: Failures) -> None:
    defaults = chart.values
    paths = leaves(defaults)
    f.check(sorted(paths) == sorted(MUTATIONS),
            "values.yaml settings and this script's MUTATIONS differ: "
            f"without a mutation {sorted(set(paths) - set(MUTATIONS))}, "
            f"not in values.yaml {sorted(set(MUTATIONS) - set(paths))}")
    schema = chart.schema or {}
    for path in paths:
        node: dict | None = schema
        for key in path.split("."):
            node = schema_node(schema, node, key) if node is not None else None
        f.check(node is not None and "type" in node, f"values.schema.json gives no type for {path}")
    for path, (context, value) in MUTATIONS.items():
        base = merge(SCALED, context)
        try:
            before = documents(render(chart, base))
            after = documents(render(chart, merge(base, nest(path, value))))
        except helm.HelmError as e:
            f.items.append(f"changing {path} to {value!r} does not render: {e}")
            continue
        f.check(before != after, f"{path} is dead: changing it to {value!r} changes no manifest")


# (values over SCALED, text the error must contain).
REJECTED: list[tuple[str, dict, str]] = [
    ("readers without a store", {"store": {"url": ""}}, "readers.enabled needs store.url"),
    ("readers.replicas -1", {"readers": {"replicas": -1}}, "/readers/replicas"),
    ("readers.replicas of the wrong type", {"readers": {"replicas": "two"}}, "/readers/replicas"),
    ("gpu.enabled of the wrong type", {"gpu": {"enabled": "yes"}}, "/gpu/enabled"),
    ("a misspelled top-level key", {"replicaCount": 3}, "replicaCount"),
    ("a misspelled nested key", {"writer": {"persistance": {"size": "1Gi"}}}, "persistance"),
    ("an object store the chart does not know", {"store": {"url": "ftp://host/x"}}, "/store/url"),
    ("a bad volume size", {"writer": {"persistence": {"size": "ten gigs"}}}, "/writer/persistence/size"),
    ("http.port on the metrics port", {"http": {"enabled": True, "port": 9090}}, "/http/port"),
    ("http.port of the wrong type", {"http": {"port": "8080"}}, "/http/port"),
    ("a setting the chart owns in config", {"config": {"grpc-addr": "0.0.0.0:1"}}, "grpc-addr"),
    ("a token in config", {"config": {"write-token": "x"}}, "write-token"),
    ("TLS in config", {"config": {"tls-cert": "/c.pem"}}, "tls-cert"),
    ("an unknown strategy", {"config": {"strategy": "tgl-fb"}}, "/config/strategy"),
    ("a zero batch size", {"config": {"batch-size": 0}}, "/config/batch-size"),
    ("a fractional batch size", {"config": {"batch-size": 2.5}}, "/config/batch-size"),
    ("an unknown localization", {"config": {"localization": "dynamic"}}, "/config/localization"),
    ("HPA target above 100%", {"readers": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}}, "targetCPU"),
    ("a GPU limit set by hand", {"writer": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}, "/writer/resources/limits"),
    ("a relative model path", {"model": {"path": "models/x.gguf"}}, "/model/path"),
    ("two volume sources for models", {"model": {"volume": {"emptyDir": {}, "hostPath": {"path": "/m"}}}}, "/model/volume"),
    # Cross-field rules in templates/_helpers.tpl.
    ("a file:// store without a shared volume", {"store": {"url": "file:///shared/locus"}}, "sharedVolume.claimName"),
    ("a file:// store outside the shared volume",
     {"store": {"url": "file:///data/locus", "sharedVolume": {"claimName": "s"}}}, "not under store.sharedVolume.mountPath"),
    ("minReplicas above maxReplicas",
     {"readers": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas is above maxReplicas"),
    ("autoscaling without a CPU request",
     {"readers": {"resources": {"requests": {"cpu": None}}}}, "readers.resources.requests.cpu"),
    ("shutdown-grace not below the termination grace period",
     {"config": {"shutdown-grace": 120}}, "terminationGracePeriodSeconds must exceed"),
]


def check_rejected(chart: helm.Chart, f: Failures) -> None:
    for what, over, needle in REJECTED:
        try:
            render(chart, merge(SCALED, over))
        except (helm.HelmValuesError, helm.HelmRenderError) as e:
            f.check(needle in str(e), f"{what}: rejected, but the message does not name {needle!r}: {e}")
        else:
            f.items.append(f"{what}: accepted, expected a render-time error naming {needle!r}")


def main() -> int:
    start = time.monotonic()
    f = Failures()
    chart = helm.Chart.load(CHART)

    for name, values in (("defaults", None), ("scaled", SCALED)):
        report = helm.lint(CHART, values, strict=True)
        for m in report["messages"]:
            # Severity 1 is informational (e.g. "icon is recommended").
            f.check(m["severity"] < 2, f"helm lint [{name}]: {m['path']}: {m['error'].strip()}")
        f.check(not report["errors"], f"helm lint [{name}] errors: {report['errors']}")

    with tempfile.TemporaryDirectory(prefix="check_chart.") as tmp_name:
        tmp = Path(tmp_name)
        files = []
        for name, values in CASES.items():
            try:
                rendered = render(chart, values)
            except helm.HelmError as e:
                f.items.append(f"[{name}] does not render: {e}")
                continue
            docs = documents(rendered)
            f.check(bool(rendered.get("locus/templates/NOTES.txt", "").strip()), f"[{name}] NOTES.txt renders")
            check_case(name, merge(chart.values, values), docs, f)
            core = [d for d in docs if d["kind"] not in CRD_KINDS]
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump_all(core, sort_keys=False))
            files.append(path)
        kubernetes_validate(files, f)
        kubernetes_validate_rejects(tmp, f)

    check_values_used(chart, f)
    check_rejected(chart, f)
    check_dashboard(f)

    elapsed = time.monotonic() - start
    if f.items:
        print(f"check_chart: {len(f.items)} failure(s) in {CHART}:", file=sys.stderr)
        for item in f.items:
            print(f"  - {item}", file=sys.stderr)
        return 1
    print(
        f"check_chart: helm/locus OK in {elapsed:.1f} s: lint of the defaults and of readers, {len(CASES)} value sets valid for Kubernetes "
        f"{' and '.join(KUBE_VERSIONS)} (ServiceMonitor checked by shape), dashboard metrics registered, {len(MUTATIONS)} values each used, "
        f"{len(REJECTED)} bad value sets rejected"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
