"""Request-parameter checks and the deployment config (no server, no model)."""

from __future__ import annotations

import math

import pytest

from sd_backend.config import DeploymentConfig
from sd_backend.params import MAX_SEED, check_params

CONFIG = DeploymentConfig(default_steps=30, default_guidance=7.5, max_size=512)


def test_omitted_parameters_take_the_defaults():
    params = check_params(CONFIG, 64)
    assert (params.steps, params.guidance, params.height, params.width, params.scheduler) == (30, 7.5, 64, 64, "pndm")
    assert 0 <= params.seed <= MAX_SEED


def test_config_size_overrides_native_size():
    config = DeploymentConfig(default_height=128, default_width=96)
    params = check_params(config, 512)
    assert (params.height, params.width) == (128, 96)


@pytest.mark.parametrize(
    "raw, words",
    [
        (dict(height=65), ["HEIGHT", "65", "multiple of 8"]),
        (dict(width=1024), ["WIDTH", "1024", "64 to 512"]),
        (dict(steps=0), ["STEPS", "0"]),
        (dict(steps=151), ["STEPS", "151", "1..150"]),
        (dict(steps=2.5), ["STEPS", "2.5", "integer"]),
        (dict(guidance=math.nan), ["GUIDANCE_SCALE", "nan", "finite"]),
        (dict(guidance=-math.inf), ["GUIDANCE_SCALE", "-inf"]),
        (dict(guidance=51.0), ["GUIDANCE_SCALE", "51"]),
        (dict(scheduler="LMS"), ["SCHEDULER", "LMS", "dpmpp_2m"]),
        (dict(seed=-2), ["SEED", "-2"]),
        (dict(seed=2**63), ["SEED"]),
    ],
)
def test_bad_parameters_name_field_value_and_allowed(raw, words):
    with pytest.raises(ValueError) as info:
        check_params(CONFIG, 64, **raw)
    for word in words:
        assert word in str(info.value)


def test_guidance_at_most_one_turns_off_classifier_free_guidance():
    assert not check_params(CONFIG, 64, guidance=1.0).uses_guidance
    assert check_params(CONFIG, 64, guidance=1.5).uses_guidance


def test_group_key_separates_what_cannot_share_a_batch():
    a = check_params(CONFIG, 64, seed=1, steps=10)
    b = check_params(CONFIG, 64, seed=2, steps=10, guidance=3.0)
    c = check_params(CONFIG, 64, seed=1, steps=10, scheduler="ddim")
    assert a.group_key() == b.group_key()
    assert a.group_key() != c.group_key()


def test_scheduler_name_is_case_insensitive_and_bytes_accepted():
    assert check_params(CONFIG, 64, scheduler=b"Euler_A").scheduler == "euler_a"


def test_config_from_parameters_with_environment_override():
    config = DeploymentConfig.from_parameters(
        {"model": "tiny", "default_steps": "20", "batch_buckets": "8, 1,2"}, {"SD_DEFAULT_STEPS": "25"}
    )
    assert config.model == "tiny"
    assert config.default_steps == 25
    assert config.batch_buckets == (1, 2, 8)


@pytest.mark.parametrize(
    "parameters, field",
    [({"default_steps": "many"}, "default_steps"), ({"opt_level": "fast"}, "opt_level"), ({"dtype": "int8"}, "dtype")],
)
def test_bad_config_values_are_named(parameters, field):
    with pytest.raises(ValueError, match=field):
        DeploymentConfig.from_parameters(parameters, {})


def test_deepspeed_arch_list_drops_arch_specific_suffixes():
    from sd_backend.optimize import deepspeed_arch_list

    assert deepspeed_arch_list("9.0a") == "9.0"
    assert deepspeed_arch_list("8.0;9.0a") == "8.0 9.0"
    assert deepspeed_arch_list("8.6 9.0+PTX") == "8.6 9.0+PTX"
    assert deepspeed_arch_list(None) is None


def test_opt_level_deepspeed_is_a_choice():
    assert DeploymentConfig(opt_level="deepspeed").opt_level == "deepspeed"
