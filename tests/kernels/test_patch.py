"""kernels.patch on a seeded tiny UNet2DConditionModel and AutoencoderKL.

On CPU a patched model must compute exactly what the unpatched one does (the patched
forwards fall back to the same torch ops). With the device check swapped, the same models
run every Triton kernel under the interpreter, which tests the wiring; on CUDA the fp16
models are compared directly.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from kernels import patch  # noqa: E402
from tests.kernels.utils import ON_CUDA, assert_close  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_unet():
    from sd_backend.offline import ARCHITECTURES

    torch.manual_seed(0)
    return UNet2DConditionModel(**ARCHITECTURES["tiny"]["unet"]).eval()  # the offline tiny model's UNet


def _tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def _unet_inputs(device, dtype):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(device, dtype)  # (batch, 4, 8, 8)
    context = torch.randn(2, 77, 32, generator=g).to(device, dtype)  # (batch, 77, cross_attention_dim)
    return sample, torch.tensor(10, device=device), context


def _run_unet(unet, inputs):
    sample, timestep, context = inputs
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=context).sample


def _run_vae(vae, latents):
    with torch.no_grad():
        return vae.decode(latents).sample


def _latents(device, dtype):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)).to(device, dtype)


def test_patch_model_counts_and_keeps_state_dict():
    unet = _tiny_unet()
    keys = list(unet.state_dict().keys())
    transformers = sum(type(m) is patch.Transformer2DModel for m in unet.modules())
    counts = patch.patch_model(unet)
    assert counts == {
        "attention": sum(isinstance(m, Attention) for m in unet.modules()),
        "transformer_layout": transformers,
        "time_embedding": 2,
        "group_norm": 21,
        "resnet_silu_fused": 8,
        "layer_norm": 12,
        "geglu": 4,
    }
    assert list(unet.state_dict().keys()) == keys
    assert all(isinstance(m.processor, patch.TritonAttnProcessor) for m in unet.modules() if isinstance(m, Attention))
    # patching twice changes nothing more
    again = patch.patch_model(unet)
    assert transformers > 0 and again["transformer_layout"] == 0
    assert again["group_norm"] == again["layer_norm"] == again["geglu"] == again["resnet_silu_fused"] == 0
    assert again["time_embedding"] == 0


def test_patch_model_selected_ops():
    vae = _tiny_vae()
    counts = patch.patch_model(vae, ops=("attention", "group_norm"))
    assert counts == {"attention": 2, "transformer_layout": 0, "time_embedding": 0, "group_norm": 24, "resnet_silu_fused": 10}
    with pytest.raises(ValueError, match="ops"):
        patch.patch_model(vae, ops=("rope",))


def test_patched_models_are_exact_on_cpu():
    unet, vae = _tiny_unet(), _tiny_vae()
    patched_unet, patched_vae = copy.deepcopy(unet), copy.deepcopy(vae)
    patch.patch_model(patched_unet)
    patch.patch_model(patched_vae)
    inputs = _unet_inputs("cpu", torch.float32)
    assert torch.equal(_run_unet(patched_unet, inputs), _run_unet(unet, inputs))
    latents = _latents("cpu", torch.float32)
    assert torch.equal(_run_vae(patched_vae, latents), _run_vae(vae, latents))


def test_attention_dispatch(monkeypatch):
    monkeypatch.setattr(patch, "_is_kernel_device", lambda t: True)
    q = torch.zeros(2, 8, 64, 40, dtype=torch.float16)
    kv = torch.zeros(2, 8, 77, 40, dtype=torch.float16)
    assert patch.TritonAttnProcessor()._use_kernel(q, kv, kv, None)
    assert not patch.TritonAttnProcessor(min_kv_len=78)._use_kernel(q, kv, kv, None)
    assert not patch.TritonAttnProcessor()._use_kernel(q, kv, kv, torch.zeros(2, 8, 64, 77))
    assert not patch.TritonAttnProcessor()._use_kernel(q.float(), kv.float(), kv.float(), None)
    big = torch.zeros(1, 1, 16, 512, dtype=torch.float16)  # the SD VAE's single 512-wide head
    assert not patch.TritonAttnProcessor()._use_kernel(big, big, big, None)


def test_sdpa_cudnn_first_is_attention():
    """The alternative `measure` times against the kernel: cuDNN's attention on CUDA, torch's elsewhere."""
    from kernels import flash_attention_reference

    device, dtype = ("cuda", torch.float16) if ON_CUDA else ("cpu", torch.float32)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 8, n, 40, generator=g).to(device, dtype) for n in (256, 77, 77))
    tol = 3e-3 if ON_CUDA else 1e-5
    assert_close(patch._sdpa_cudnn_first(q, k, v), flash_attention_reference(q, k, v), tol, tol, "cudnn-first sdpa")


@pytest.mark.skipif(ON_CUDA, reason="CUDA runs the kernels for real in test_patched_models_cuda")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_patched_models_run_kernels_under_interpreter(monkeypatch, channels_last):
    pytest.importorskip("triton")
    import kernels

    calls = {}

    def counted(name):
        fn = getattr(kernels, name)

        def wrapper(*args, **kwargs):
            key = name + ("+silu" if kwargs.get("activation") == "silu" else "")
            calls[key] = calls.get(key, 0) + 1
            if kwargs.get("pre_add") is not None:  # the fused ResnetBlock2D tail
                calls[name + "+pre_add"] = calls.get(name + "+pre_add", 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    for name in ("flash_attention", "group_norm", "layer_norm", "geglu", "bias_residual"):
        monkeypatch.setattr(kernels, name, counted(name))
    pointwise = patch._pointwise
    monkeypatch.setattr(patch, "_pointwise", lambda *a: calls.__setitem__("pointwise", calls.get("pointwise", 0) + 1) or pointwise(*a))
    # CPU tensors count as kernel tensors, and fp32 attention takes the kernel too
    monkeypatch.setattr(patch, "_is_kernel_device", lambda t: True)
    monkeypatch.setattr(patch, "_ATTN_DTYPES", (torch.float32,))

    unet, vae = _tiny_unet(), _tiny_vae()
    patched_unet, patched_vae = copy.deepcopy(unet), copy.deepcopy(vae)
    patch.patch_model(patched_unet)
    patch.patch_model(patched_vae)
    inputs = _unet_inputs("cpu", torch.float32)
    if channels_last:
        unet, patched_unet = (m.to(memory_format=torch.channels_last) for m in (unet, patched_unet))
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
    assert_close(_run_unet(patched_unet, inputs), _run_unet(unet, inputs), 1e-4, 1e-4, "tiny unet")
    latents = _latents("cpu", torch.float32)
    assert_close(_run_vae(patched_vae, latents), _run_vae(vae, latents), 1e-4, 1e-4, "tiny vae decode")
    # group_norm+pre_add and bias_residual: the fused ResnetBlock2D tail ran
    for key in (
        "flash_attention", "group_norm", "group_norm+silu", "group_norm+pre_add", "layer_norm", "geglu", "bias_residual"
    ):
        assert calls.get(key, 0) > 0, f"{key} never ran: {calls}"
    # proj_in and proj_out as GEMMs on the pixel rows: only when the input is channels-last
    assert (calls.get("pointwise", 0) > 0) == channels_last, calls


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_patched_models_cuda(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet = _tiny_unet().to("cuda", torch.float16, memory_format=fmt)
    vae = _tiny_vae().to("cuda", torch.float16, memory_format=fmt)
    patched_unet, patched_vae = copy.deepcopy(unet), copy.deepcopy(vae)
    patch.patch_model(patched_unet)
    patch.patch_model(patched_vae)
    inputs = _unet_inputs("cuda", torch.float16)
    assert_close(_run_unet(patched_unet, inputs), _run_unet(unet, inputs), 2e-2, 2e-2, "tiny unet fp16")
    latents = _latents("cuda", torch.float16)
    assert_close(_run_vae(patched_vae, latents), _run_vae(vae, latents), 2e-2, 2e-2, "tiny vae decode fp16")


def test_patch_imports_and_runs_on_cpu_without_triton():
    """kernels.patch must not need triton until a kernel runs on CUDA."""
    code = "\n".join(
        [
            "import sys",
            "sys.modules['triton'] = None  # import triton now raises ModuleNotFoundError",
            "import torch",
            "from kernels import patch",
            "m = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.LayerNorm(3))",
            "ref = m(torch.ones(1, 4, 3).cumsum(-1))",
            "counts = patch.patch_model(m)",
            "assert counts['group_norm'] == 1 and counts['layer_norm'] == 1, counts",
            "assert torch.equal(m(torch.ones(1, 4, 3).cumsum(-1)), ref)",
            "import kernels",
            "try:",
            "    kernels.group_norm",
            "except ImportError as e:",
            "    assert 'triton' in str(e)",
            "else:",
            "    raise AssertionError('expected ImportError')",
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
