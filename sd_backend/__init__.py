"""Stable Diffusion for Triton Inference Server's Python backend: the stages the models run,
the deployment's configuration, the GPU fast path (`sd_backend.fast`) and the launcher."""

from .checkout import install as _install_checkout_finder

_install_checkout_finder()
