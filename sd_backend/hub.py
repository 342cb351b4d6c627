"""Downloading a model from the Hugging Face hub once, into the deployment's cache: only the
files the stages load, with huggingface_hub's progress bars, and the hub's errors as one line
that names the model and what to do."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .model_files import CHECKPOINT_SUFFIXES, REQUIRED_FILES, WEIGHTS, ModelUnavailable, check_model_dir

MODEL_PATTERNS = [
    *REQUIRED_FILES,
    "tokenizer/*",
    *(f"{component}/{stem}.safetensors" for component, stem in WEIGHTS.items()),
]


def download(repo_id: str, cache: Path, progress: bool, patterns: list[str] | None = None) -> Path:
    """snapshot_download of the files the stages load (or of `patterns`); the hub's errors as
    one clear line. A whole model is checked to hold what the stages load."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    endpoint, offline = constants.ENDPOINT, constants.HF_HUB_OFFLINE
    try:
        if progress and not offline:
            print(f"sd-triton: downloading {repo_id} from {endpoint} into {cache} (once)", flush=True)
        path = huggingface_hub.snapshot_download(
            repo_id, cache_dir=str(cache), allow_patterns=patterns or MODEL_PATTERNS, token=os.environ.get("HF_TOKEN") or None
        )
    except errors.GatedRepoError:
        raise ModelUnavailable(
            f"model: {repo_id} is gated on the Hugging Face hub: accept its terms at {endpoint}/{repo_id} "
            "with your account, then set HF_TOKEN to a token of it"
        ) from None
    except errors.RepositoryNotFoundError:
        token = "" if os.environ.get("HF_TOKEN") else " (or it is private: set HF_TOKEN)"
        raise ModelUnavailable(
            f"model: the Hugging Face hub has no model {repo_id}{token}; check the id, or pass a local directory "
            f"or {' or '.join(CHECKPOINT_SUFFIXES)} checkpoint"
        ) from None
    except errors.RevisionNotFoundError as err:
        raise ModelUnavailable(f"model: {repo_id}: {err}") from None
    except errors.LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE is set" if offline else f"{endpoint} cannot be reached ({_cause(err)})"
        raise ModelUnavailable(
            f"model: cannot download {repo_id}: {why} and no copy is cached in {cache}; connect this machine "
            f"to the hub once, or pass a local directory or {' or '.join(CHECKPOINT_SUFFIXES)} checkpoint"
        ) from None
    except errors.HfHubHTTPError as err:
        raise ModelUnavailable(f"model: cannot download {repo_id} from {endpoint}: {_cause(err)}") from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ModelUnavailable(
                f"model: not enough disk space in {cache} to download {repo_id}; free some, or point cache_dir elsewhere"
            ) from None
        raise
    if patterns is None:
        check_model_dir(Path(path))
    return Path(path)


def _cause(err: Exception) -> str:
    """The first line of an error, with the error behind it where that adds something."""
    first = (str(err).splitlines()[0] if str(err) else type(err).__name__).removeprefix("Got: ")
    cause = err.__cause__ or err.__context__
    behind = str(cause).splitlines()[0] if cause is not None and str(cause) else ""
    return first if not behind or behind in first else f"{first}: {behind}"
