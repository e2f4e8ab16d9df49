"""Offline checks of the deployment files in infra/: schemas, versions, and the GPU layout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import ray
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"


def test_ray_cluster_launcher_config_matches_rays_schema():
    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    gpu_groups = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_groups and all(t["max_workers"] >= t.get("min_workers", 0) for t in gpu_groups)
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_kuberay_manifest_is_a_complete_raycluster():
    doc = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (gpu,) = spec["workerGroupSpecs"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert head["image"] == worker["image"]
    for c in (head, worker):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "capfilt-ray-token"


def test_container_image_matches_the_installed_ray_and_python():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "pip uninstall -y dataclasses" in text
    for path in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)", text, flags=re.M):
        assert (INFRA.parent / path).exists(), f"Dockerfile copies {path}, which the repository lacks"


def test_prefect_deployment_file_validates_and_names_the_capfilt_flow():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    from flows.deploy import PREFECT_YAML, deployment_spec

    assert PREFECT_YAML == INFRA / "prefect" / "prefect.yaml"
    project = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    (deployment,) = project.deployments
    assert deployment.name == "bootstrap" == deployment_spec()["name"]
    flow = load_flow_from_entrypoint(str(INFRA.parent / deployment.entrypoint))
    assert flow.name == "capfilt"
    params = flow.parameters.properties
    assert {"config", "root", "overrides"} <= set(params) and set(deployment.parameters) <= set(params)
    assert set(flow.parameters.required) == {"config", "root"}
    assert deployment.work_pool.name == "capfilt"


def test_the_in_process_prefect_server_sends_no_telemetry_unless_the_user_asks():
    # The flow's entry points (``capfilt``'s main, the flow itself) call ``flows.runtime.configure_environment``;
    # importing sets nothing. Prefect may already be imported by then (the flow's module imports it), so check what
    # its in-process server would be started with: this process's environment overlaid with the settings Prefect
    # read at import (``SubprocessASGIServer._run_uvicorn_command``).
    probe = "\n".join(
        [
            "import os",
            "given = os.environ.get('PREFECT_SERVER_ANALYTICS_ENABLED')",
            "import flows.bootstrap, flows.cli",
            "assert os.environ.get('PREFECT_SERVER_ANALYTICS_ENABLED') == given, 'importing the flows set it'",
            "from flows.runtime import configure_environment",
            "configure_environment()",
            "from prefect.settings import get_current_settings",
            "server_env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}",
            "print(server_env['PREFECT_SERVER_ANALYTICS_ENABLED'])",
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    repo = INFRA.parent
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=repo, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1].lower() == "false"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "true"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=repo, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1].lower() == "true"
