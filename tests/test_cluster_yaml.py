"""cluster.yaml against the cluster-launcher schema that ships with the installed Ray; the KubeRay RayJob manifest."""

import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from jobs.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
KUBERAY = REPO / "kuberay-rayjob.yaml"


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # as `ray up` does: defaults filled in, then the schema; raises on any unknown or mistyped key
    gpu = config["available_node_types"]["gpu-worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0  # GPU workers autoscale from zero
    assert "GPU" not in config["available_node_types"][config["head_node_type"]]["resources"]


def test_every_node_of_cluster_yaml_starts_ray_with_token_authentication():
    """The launcher has no setting for it: Ray's recipe is the local token mounted on every node and
    RAY_AUTH_MODE=token where Ray starts (a node started without it would check no token)."""
    config = yaml.safe_load(CLUSTER.read_text())
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["docker"]["image"].startswith("rayproject/ray:")  # whose user's HOME is /home/ray
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)


def test_the_schema_check_catches_a_typo():
    config = yaml.safe_load(CLUSTER.read_text())
    config["max_wrokers"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_kuberay_rayjob_runs_a_valid_lorafleet_command():
    """No KubeRay CRD schema ships with any installed package, so this checks what can go wrong on
    our side: the entrypoint parses as a shell command whose config validates, the Ray version and
    images match the installed Ray, and the GPU worker pods hold what the config asks per worker."""
    job = yaml.safe_load(KUBERAY.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token", "Ray's token authentication stays on"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith(f":{ray.__version__}-py311-gpu")

    args = shlex.split(spec["entrypoint"])
    assert args[:3] == ["python", "-m", "jobs.pipeline"] and args[3] == "--config"
    run = load_config(REPO / args[4], args[5:])
    assert run.ray.use_gpu and run.ray.storage_path.startswith("s3://")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/lorafleet"

    (gpu,) = cluster["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["minReplicas"] == 0 and int(limits["nvidia.com/gpu"]) >= run.ray.resources_per_worker["GPU"]
    assert int(limits["cpu"]) >= run.ray.resources_per_worker["CPU"] + run.serve.replica_resources.get("CPU", 0)
