"""The model repository's `config.pbtxt` files against the deployment they serve.

Triton reads max_batch_size and the dynamic batcher's preferred sizes from each model's
config.pbtxt, before any of this project's code runs; deployment.toml holds the batch
buckets the UNet's loops are captured for. They must agree: every model takes batches up
to the largest bucket (the ensemble passes its whole batch to each step), and a batcher's
preferred sizes are buckets (a batch of any other size is padded up to the next bucket's
loop). Each model checks its own configuration at load
(`check_model_config`) and `sd-triton serve` checks the whole repository before it starts
the server (`check_repository`), so a disagreement fails loudly, naming both places.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .config import DEPLOYMENT_FILE, DeploymentConfig

# the models this project serves; each must be in the repository
SERVED_MODELS = (
    "text_encoder", "vae_encoder", "unet", "vae", "stable_diffusion", "stable_diffusion_img2img", "stable_diffusion_inpaint",
    "stable_diffusion_stream",
)


def model_config_problems(name: str, model_config: Mapping[str, Any], config: DeploymentConfig) -> list[str]:
    """What in one model's configuration (Triton's JSON form) disagrees with the deployment."""
    buckets = list(config.batch_buckets)
    problems = []
    max_batch = int(model_config.get("max_batch_size", 0))
    if max_batch != buckets[-1]:
        problems.append(
            f"{name}/config.pbtxt: max_batch_size is {max_batch}; {DEPLOYMENT_FILE}'s batch_buckets {buckets} need {buckets[-1]}"
        )
    preferred = [int(p) for p in model_config.get("dynamic_batching", {}).get("preferred_batch_size", [])]
    if any(p not in buckets for p in preferred):
        problems.append(
            f"{name}/config.pbtxt: preferred_batch_size {preferred} has sizes outside {DEPLOYMENT_FILE}'s batch_buckets {buckets}"
        )
    return problems


def check_model_config(model_config: Mapping[str, Any], config: DeploymentConfig) -> None:
    """Raise ValueError naming every disagreement of this model's configuration."""
    problems = model_config_problems(model_config.get("name", "?"), model_config, config)
    if problems:
        raise ValueError("; ".join(problems))


def read_model_config(path: Path) -> dict[str, Any]:
    """A config.pbtxt parsed as Triton parses it, in the JSON form a model's `initialize` gets."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    try:
        message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise ValueError(f"{path}: {err}") from None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def repository_problems(repository: Path, config: DeploymentConfig) -> list[str]:
    """Disagreements between the repository's config.pbtxt files and `config`, and models missing."""
    problems = []
    for name in SERVED_MODELS:
        path = Path(repository) / name / "config.pbtxt"
        if not path.is_file():
            problems.append(f"{name}/config.pbtxt: missing from {repository}")
            continue
        problems += model_config_problems(name, read_model_config(path), config)
    return problems


def check_repository(repository: Path, config: DeploymentConfig) -> None:
    problems = repository_problems(repository, config)
    if problems:
        raise ValueError(f"model repository {repository} disagrees with its deployment: " + "; ".join(problems))
