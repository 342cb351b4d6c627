"""One place for each deployment setting: the model repository's config.pbtxt files checked
against its deployment.toml, by the launcher before it starts and by each model at load."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sd_backend.config import DeploymentConfig
from sd_backend.repository import SERVED_MODELS, check_model_config, read_model_config, repository_problems

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"


@pytest.fixture
def copy(tmp_path):
    target = tmp_path / "model_repository"
    shutil.copytree(REPOSITORY, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_the_shipped_repository_agrees_with_its_deployment():
    config = DeploymentConfig.load(REPOSITORY, environ={})
    assert repository_problems(REPOSITORY, config) == []
    assert config.batch_buckets == (1, 2, 3, 4, 5, 6, 7, 8) and config.model == "tiny"


def test_a_unet_batcher_off_the_buckets_is_named(copy):
    path = copy / "unet" / "config.pbtxt"
    path.write_text(path.read_text().replace("preferred_batch_size: [ 8 ]", "preferred_batch_size: [ 8, 10 ]"))
    problems = repository_problems(copy, DeploymentConfig.load(copy, environ={}))
    assert problems == [
        "unet/config.pbtxt: preferred_batch_size [8, 10] has sizes outside deployment.toml's batch_buckets [1, 2, 3, 4, 5, 6, 7, 8]"
    ]


def test_buckets_changed_in_one_place_only_name_every_model(copy):
    path = copy / "deployment.toml"
    path.write_text(path.read_text().replace("batch_buckets = [1, 2, 3, 4, 5, 6, 7, 8]", "batch_buckets = [1, 2]"))
    problems = repository_problems(copy, DeploymentConfig.load(copy, environ={}))
    for name in SERVED_MODELS:
        assert any(p.startswith(f"{name}/config.pbtxt: max_batch_size is 8") for p in problems), (name, problems)


def test_each_model_checks_its_own_configuration_at_load():
    """What a model's initialize checks: its config as Triton hands it over (JSON)."""
    unet = read_model_config(REPOSITORY / "unet" / "config.pbtxt")
    check_model_config(unet, DeploymentConfig())
    with pytest.raises(ValueError, match=r"unet/config.pbtxt: max_batch_size is 8; deployment.toml's batch_buckets \[1, 4\] need 4"):
        check_model_config(unet, DeploymentConfig(batch_buckets=(1, 4)))


def test_serve_refuses_a_repository_that_disagrees_before_starting_tritonserver(copy):
    env = dict(os.environ, SD_BATCH_BUCKETS="1,2,4")
    result = subprocess.run(
        [sys.executable, "-m", "sd_backend.cli", "serve", "--model-repository", str(copy)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unet/config.pbtxt: preferred_batch_size [8] has sizes outside deployment.toml's batch_buckets [1, 2, 4]" in result.stderr, result.stderr
    assert "starting tritonserver" not in result.stdout


@pytest.mark.parametrize("data", sorted((ROOT / "client").glob("perf_input*.json")), ids=lambda p: p.name)
def test_each_perf_analyzer_input_names_the_ensembles_inputs_with_their_types(data):
    """perf_analyzer sends what a --input-data file says: a misspelt or mistyped input fails
    only once a GPU run reaches it, so each shipped file is held against the ensemble here."""
    import json

    inputs = {i["name"]: i for i in read_model_config(ROOT / "model_repository" / "stable_diffusion" / "config.pbtxt")["input"]}
    kinds = {"TYPE_STRING": str, "TYPE_INT64": int, "TYPE_INT32": int, "TYPE_FP32": (int, float)}
    (request,) = json.loads(data.read_text())["data"]
    assert set(request) <= set(inputs), set(request) - set(inputs)
    assert "PROMPT" in request
    for name, value in request.items():
        assert value["shape"] == [int(d) for d in inputs[name]["dims"]], name
        assert all(isinstance(v, kinds[inputs[name]["data_type"]]) for v in value["content"]), name
