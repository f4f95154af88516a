"""cluster.yaml against the cluster-launcher schema that ships with the installed Ray."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # as `ray up` does: defaults filled in, then the schema; raises on any unknown or mistyped key
    gpu = config["available_node_types"]["gpu-worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0  # GPU workers autoscale from zero
    assert "GPU" not in config["available_node_types"][config["head_node_type"]]["resources"]


def test_the_schema_check_catches_a_typo():
    config = yaml.safe_load(CLUSTER.read_text())
    config["max_wrokers"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
