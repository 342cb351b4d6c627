"""Request-parameter checks and the deployment config (no server, no model)."""

from __future__ import annotations

import math

import pytest

from sd_backend.config import DeploymentConfig, FastPathOptions
from sd_backend.family import ModelFamily
from sd_backend.params import MAX_SEED, check_params

CONFIG = DeploymentConfig(default_steps=30, default_guidance=7.5, max_size=512)
SD64 = ModelFamily("sd1", 64, "epsilon")  # tiny's native size and scheduler (PNDM)


def test_omitted_parameters_take_the_defaults():
    params = check_params(CONFIG, SD64)
    assert (params.steps, params.guidance, params.height, params.width, params.scheduler) == (30, 7.5, 64, 64, "pndm")
    assert 0 <= params.seed <= MAX_SEED


def test_config_size_overrides_native_size():
    config = DeploymentConfig(default_height=128, default_width=96)
    params = check_params(config, ModelFamily("sd1", 512, "epsilon"))
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
        check_params(CONFIG, SD64, **raw)
    for word in words:
        assert word in str(info.value)


def test_guidance_at_most_one_turns_off_classifier_free_guidance():
    assert not check_params(CONFIG, SD64, guidance=1.0).uses_guidance
    assert check_params(CONFIG, SD64, guidance=1.5).uses_guidance


def test_group_key_separates_what_cannot_share_a_batch():
    a = check_params(CONFIG, SD64, seed=1, steps=10)
    b = check_params(CONFIG, SD64, seed=2, steps=10, guidance=3.0)
    c = check_params(CONFIG, SD64, seed=1, steps=10, scheduler="ddim")
    assert a.group_key() == b.group_key()
    assert a.group_key() != c.group_key()


def test_scheduler_name_is_case_insensitive_and_bytes_accepted():
    assert check_params(CONFIG, SD64, scheduler=b"Euler_A").scheduler == "euler_a"


def test_config_from_settings_with_environment_override():
    config = DeploymentConfig.from_settings(
        {"model": "tiny", "default_steps": 20, "batch_buckets": [8, 1, 2], "fast_path": {"keep_layout": False}},
        {"SD_DEFAULT_STEPS": "25", "SD_FAST_PATH_SPLIT_HEAD_DIM": "0", "SD_FAST_PATH_KERNELS": "layer_norm,geglu"},
    )
    assert config.model == "tiny"
    assert config.default_steps == 25
    assert config.batch_buckets == (1, 2, 8)
    assert config.fast_path == FastPathOptions(kernels=("layer_norm", "geglu"), keep_layout=False, split_head_dim=False)
    assert DeploymentConfig.from_settings({}, {"SD_FAST_PATH_KERNELS": "none"}).fast_path.kernels == ()
    strengths = DeploymentConfig.from_settings({"fast_path": {"image_to_image_strengths": [0.6]}}, {}).fast_path.image_to_image_strengths
    assert strengths == (0.6,)
    assert DeploymentConfig.from_settings({}, {"SD_FAST_PATH_IMAGE_TO_IMAGE_STRENGTHS": "0.3,0.8"}).fast_path.image_to_image_strengths == (0.3, 0.8)
    with pytest.raises(ValueError, match=r"fast_path.image_to_image_strengths: \[1.5\] out of range"):
        FastPathOptions(image_to_image_strengths=(1.5,))
    assert DeploymentConfig.from_settings({}, {"SD_FAST_PATH_COMPILE_WORKERS": "0"}).fast_path.compile_workers == 0
    with pytest.raises(ValueError, match=r"fast_path.compile_workers: -1; allowed: 0 or more"):
        FastPathOptions(compile_workers=-1)


def test_config_loads_the_repositorys_deployment_file(tmp_path):
    (tmp_path / "deployment.toml").write_text('model = "sd15-random"\nbatch_buckets = [1, 4]\n[fast_path]\nloop_constants = false\n')
    config = DeploymentConfig.load(tmp_path, environ={"SD_OPT_LEVEL": "triton"})
    assert (config.model, config.batch_buckets, config.opt_level) == ("sd15-random", (1, 4), "triton")
    assert config.fast_path.loop_constants is False and config.fast_path.keep_layout is True
    assert DeploymentConfig.load(tmp_path / "nowhere", environ={}) == DeploymentConfig()


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"default_steps": "many"}, "default_steps"),
        ({"opt_level": "fast"}, "opt_level"),
        ({"dtype": "int8"}, "dtype"),
        ({"default_steps": True}, "default_steps"),
        ({"modle": "tiny"}, "modle"),
        ({"fast_path": {"keep_layout": "maybe"}}, "keep_layout"),
        ({"fast_path": {"kernel_dispatch": "sometimes"}}, "kernel_dispatch"),
        ({"fast_path": {"kernels": ["rope"]}}, "rope"),
        ({"fast_path": {"keep_layuot": True}}, "keep_layuot"),
    ],
)
def test_bad_config_values_are_named(settings, field):
    with pytest.raises(ValueError, match=field):
        DeploymentConfig.from_settings(settings, {})


def test_a_broken_deployment_file_is_named(tmp_path):
    (tmp_path / "deployment.toml").write_text("model = \n")
    with pytest.raises(ValueError, match="deployment.toml"):
        DeploymentConfig.load(tmp_path, environ={})


def test_a_model_config_setting_a_deployment_field_is_refused(tmp_path):
    import json

    args = {
        "model_config": json.dumps({"name": "unet", "parameters": {"opt_level": {"string_value": "triton"}}}),
        "model_repository": str(tmp_path / "unet"),
    }
    with pytest.raises(ValueError, match=r"unet/config.pbtxt sets \['opt_level'\].*deployment.toml"):
        DeploymentConfig.from_triton_args(args)


def test_deepspeed_arch_list_drops_arch_specific_suffixes():
    from sd_backend.fast.levels import deepspeed_arch_list

    assert deepspeed_arch_list("9.0a") == "9.0"
    assert deepspeed_arch_list("8.0;9.0a") == "8.0 9.0"
    assert deepspeed_arch_list("8.6 9.0+PTX") == "8.6 9.0+PTX"
    assert deepspeed_arch_list(None) is None


def test_opt_level_deepspeed_is_a_choice():
    assert DeploymentConfig(opt_level="deepspeed").opt_level == "deepspeed"


def test_sdxl_refuses_sizes_below_half_its_native_side():
    sdxl = ModelFamily("sdxl", 1024, "epsilon", pooled_dim=1280, scheduler="euler")
    config = DeploymentConfig()
    assert check_params(config, sdxl).height == 1024  # the model's own size by default
    assert check_params(config, sdxl, height=512, width=768).height == 512
    with pytest.raises(ValueError) as info:
        check_params(config, sdxl, height=448)
    assert str(info.value) == "HEIGHT: 448 is below this sdxl model's minimum of 512 (half its native 1024)"


def test_the_default_scheduler_is_the_models_own_unless_the_deployment_names_one():
    sdxl = ModelFamily("sdxl", 1024, "epsilon", pooled_dim=1280, scheduler="euler")
    assert check_params(DeploymentConfig(), sdxl).scheduler == "euler"
    assert check_params(DeploymentConfig(default_scheduler="DDIM"), sdxl).scheduler == "ddim"
    assert check_params(DeploymentConfig(), sdxl, scheduler="pndm").scheduler == "pndm"
