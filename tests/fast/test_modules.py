"""sd_backend.fast.modules on a seeded tiny UNet2DConditionModel and AutoencoderKL.

On the CPU a patched model must compute exactly what the unpatched one does (the patched
forwards fall back to the same torch ops). With the CPU as a kernel device, the same models
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

from diffusers.models.attention_processor import Attention  # noqa: E402

from sd_backend.config import FastPathOptions  # noqa: E402
from sd_backend.fast.modules import attention, patch_model, transformer  # noqa: E402
from sd_backend.fast.modules.attention import TritonAttnProcessor  # noqa: E402
from sd_backend.fast.runtime import FastPath  # noqa: E402
from tests.fast.models import cpu_kernels, latents, run_unet, run_vae, tiny_unet, tiny_vae, unet_inputs  # noqa: E402
from tests.kernels.utils import ON_CUDA, assert_close  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_patch_model_counts_and_keeps_state_dict():
    unet = tiny_unet()
    keys = list(unet.state_dict().keys())
    transformers = sum(type(m) is transformer.Transformer2DModel for m in unet.modules())
    counts = patch_model(unet, FastPath())
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
    assert all(isinstance(m.processor, TritonAttnProcessor) for m in unet.modules() if isinstance(m, Attention))
    # patching twice changes nothing more
    again = patch_model(unet, FastPath())
    assert transformers > 0 and again["transformer_layout"] == 0
    assert again["group_norm"] == again["layer_norm"] == again["geglu"] == again["resnet_silu_fused"] == 0
    assert again["time_embedding"] == 0


def test_patch_model_selected_ops():
    vae = tiny_vae()
    counts = patch_model(vae, FastPath(), ops=("attention", "group_norm"))
    assert counts == {"attention": 2, "transformer_layout": 0, "time_embedding": 0, "group_norm": 24, "resnet_silu_fused": 10}
    with pytest.raises(ValueError, match="ops"):
        patch_model(vae, FastPath(), ops=("rope",))


def test_patch_model_takes_the_options_kernels():
    unet = tiny_unet()
    counts = patch_model(unet, FastPath(FastPathOptions(kernels=("layer_norm",))))
    assert counts == {"time_embedding": 2, "layer_norm": 12}


def test_patched_models_are_exact_on_cpu():
    unet, vae = tiny_unet(), tiny_vae()
    patched_unet, patched_vae = copy.deepcopy(unet), copy.deepcopy(vae)
    patch_model(patched_unet, FastPath())
    patch_model(patched_vae, FastPath())
    inputs = unet_inputs("cpu", torch.float32)
    assert torch.equal(run_unet(patched_unet, inputs), run_unet(unet, inputs))
    lat = latents("cpu", torch.float32)
    assert torch.equal(run_vae(patched_vae, lat), run_vae(vae, lat))


def test_attention_dispatch():
    q = torch.zeros(2, 8, 64, 40, dtype=torch.float16)
    kv = torch.zeros(2, 8, 77, 40, dtype=torch.float16)
    fast = FastPath(kernel_devices=("cpu",))
    assert TritonAttnProcessor(fast).use_kernel(q, kv, kv, None)
    assert not TritonAttnProcessor(FastPath()).use_kernel(q, kv, kv, None)  # CPU is not a kernel device
    assert not TritonAttnProcessor(fast, min_kv_len=78).use_kernel(q, kv, kv, None)
    assert not TritonAttnProcessor(fast).use_kernel(q, kv, kv, torch.zeros(2, 8, 64, 77))
    assert not TritonAttnProcessor(fast).use_kernel(q.float(), kv.float(), kv.float(), None)
    big = torch.zeros(1, 1, 16, 512, dtype=torch.float16)  # the SD VAE's single 512-wide head
    assert not TritonAttnProcessor(fast).use_kernel(big, big, big, None)


def test_sdpa_cudnn_first_is_attention():
    """The alternative `measure` times against the kernel: cuDNN's attention on CUDA, torch's elsewhere."""
    from sd_kernels import flash_attention_reference

    device, dtype = ("cuda", torch.float16) if ON_CUDA else ("cpu", torch.float32)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 8, n, 40, generator=g).to(device, dtype) for n in (256, 77, 77))
    tol = 3e-3 if ON_CUDA else 1e-5
    assert_close(attention.sdpa_cudnn_first(q, k, v), flash_attention_reference(q, k, v), tol, tol, "cudnn-first sdpa")


def _count_kernel_calls(monkeypatch):
    import sd_kernels

    calls = {}

    def counted(name):
        fn = getattr(sd_kernels, name)

        def wrapper(*args, **kwargs):
            key = name + ("+silu" if kwargs.get("activation") == "silu" else "")
            calls[key] = calls.get(key, 0) + 1
            if kwargs.get("pre_add") is not None:  # the fused ResnetBlock2D tail
                calls[name + "+pre_add"] = calls.get(name + "+pre_add", 0) + 1
            if name == "flash_attention":
                calls["split_head_dim=" + str(kwargs.get("split_head_dim"))] = 1
                calls["compile_workers=" + str(kwargs.get("compile_workers"))] = 1
            return fn(*args, **kwargs)

        return wrapper

    for name in ("flash_attention", "group_norm", "layer_norm", "geglu", "geglu_linear", "bias_residual"):
        monkeypatch.setattr(sd_kernels, name, counted(name))
    pointwise = transformer.pointwise
    monkeypatch.setattr(transformer, "pointwise", lambda *a: calls.__setitem__("pointwise", calls.get("pointwise", 0) + 1) or pointwise(*a))
    return calls


@pytest.mark.skipif(ON_CUDA, reason="CUDA runs the kernels for real in test_patched_models_cuda")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_patched_models_run_kernels_under_interpreter(monkeypatch, channels_last):
    pytest.importorskip("triton")
    calls = _count_kernel_calls(monkeypatch)
    unet, vae = tiny_unet(), tiny_vae()
    patched_unet, patched_vae = copy.deepcopy(unet), copy.deepcopy(vae)
    fast = cpu_kernels(attention_dtypes=(torch.float32,))  # fp32 attention takes the kernel too
    patch_model(patched_unet, fast)
    patch_model(patched_vae, fast)
    inputs = unet_inputs("cpu", torch.float32)
    if channels_last:
        unet, patched_unet = (m.to(memory_format=torch.channels_last) for m in (unet, patched_unet))
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
    assert_close(run_unet(patched_unet, inputs), run_unet(unet, inputs), 1e-4, 1e-4, "tiny unet")
    lat = latents("cpu", torch.float32)
    assert_close(run_vae(patched_vae, lat), run_vae(vae, lat), 1e-4, 1e-4, "tiny vae decode")
    # group_norm+pre_add and bias_residual: the fused ResnetBlock2D tail ran
    for key in (
        "flash_attention", "group_norm", "group_norm+silu", "group_norm+pre_add", "layer_norm", "geglu", "bias_residual"
    ):
        assert calls.get(key, 0) > 0, f"{key} never ran: {calls}"
    # proj_in and proj_out as GEMMs on the pixel rows: only when the input is channels-last
    assert (calls.get("pointwise", 0) > 0) == channels_last, calls
    assert calls.get("split_head_dim=True") == 1 and "split_head_dim=False" not in calls, calls


@pytest.mark.skipif(ON_CUDA, reason="the interpreter's run of the options")
def test_options_reach_the_modules(monkeypatch):
    """Each A/B switch of FastPathOptions changes what the patched modules do, as an argument."""
    calls = _count_kernel_calls(monkeypatch)
    options = FastPathOptions(
        keep_layout=False, fuse_projections=False, split_head_dim=False, kernel_dispatch="always", compile_workers=3
    )
    unet = tiny_unet().to(memory_format=torch.channels_last)
    patch_model(unet, cpu_kernels(options, attention_dtypes=(torch.float32,)))
    fused = {"n": 0}
    original = attention.TritonAttnProcessor._fused

    def spy(self, *args):
        result = original(self, *args)
        fused["n"] += result is not None
        return result

    monkeypatch.setattr(attention.TritonAttnProcessor, "_fused", spy)
    inputs = unet_inputs("cpu", torch.float32)
    run_unet(unet, (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:])
    assert "pointwise" not in calls, calls  # keep_layout off: diffusers' copies, no GEMMs on rows
    assert fused["n"] == 0  # fuse_projections off: separate q/k/v GEMMs
    assert calls.get("split_head_dim=False") == 1 and "split_head_dim=True" not in calls, calls
    assert calls.get("compile_workers=3") == 1 and "compile_workers=0" not in calls, calls

    calls.clear()
    never = tiny_unet()
    patch_model(never, cpu_kernels(FastPathOptions(kernel_dispatch="never", fuse_projections=False)))
    plain = tiny_unet()
    assert torch.equal(run_unet(never, inputs), run_unet(plain, inputs))  # `never`: torch's ops
    assert not any(k in calls for k in ("group_norm", "layer_norm", "geglu", "bias_residual")), calls


@pytest.mark.skipif(ON_CUDA, reason="the interpreter's run of the option")
def test_geglu_linear_option_runs_projection_and_gate_as_one_kernel(monkeypatch):
    """fast_path.geglu_linear: the feed-forward's GEGLU is sd_kernels.geglu_linear, not the
    projection then sd_kernels.geglu, and the UNet still computes what diffusers' does."""
    pytest.importorskip("triton")
    calls = _count_kernel_calls(monkeypatch)
    unet = tiny_unet()
    patched = copy.deepcopy(unet)
    patch_model(patched, cpu_kernels(FastPathOptions(geglu_linear=True), attention_dtypes=(torch.float32,)))
    inputs = unet_inputs("cpu", torch.float32)
    assert_close(run_unet(patched, inputs), run_unet(unet, inputs), 1e-4, 1e-4, "tiny unet, geglu_linear")
    geglus = sum(type(m).__name__ == "TritonGEGLU" for m in patched.modules())
    assert geglus > 0 and calls.get("geglu_linear") == geglus and "geglu" not in calls, calls


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_patched_models_cuda(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet = tiny_unet().to("cuda", torch.float16, memory_format=fmt)
    vae = tiny_vae().to("cuda", torch.float16, memory_format=fmt)
    patched_unet, patched_vae = copy.deepcopy(unet), copy.deepcopy(vae)
    patch_model(patched_unet, FastPath())
    patch_model(patched_vae, FastPath())
    inputs = unet_inputs("cuda", torch.float16)
    assert_close(run_unet(patched_unet, inputs), run_unet(unet, inputs), 2e-2, 2e-2, "tiny unet fp16")
    lat = latents("cuda", torch.float16)
    assert_close(run_vae(patched_vae, lat), run_vae(vae, lat), 2e-2, 2e-2, "tiny vae decode fp16")


def test_patching_refuses_a_diffusers_it_does_not_mirror():
    from sd_backend.fast.compat import check_diffusers

    check_diffusers("0.42.1")
    for version in ("0.43.0", "0.41.2", "1.0.0", "0.42"):
        if version == "0.42":
            check_diffusers(version)
            continue
        with pytest.raises(RuntimeError, match=rf"diffusers {version} is installed.*0\.42"):
            check_diffusers(version)


def test_patch_imports_and_runs_on_cpu_without_triton():
    """The fast path's modules must not need triton until a kernel runs on a kernel device."""
    code = "\n".join(
        [
            "import sys",
            "sys.modules['triton'] = None  # import triton now raises ModuleNotFoundError",
            "import torch",
            "from sd_backend.fast.modules import patch_model",
            "from sd_backend.fast.runtime import FastPath",
            "m = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.LayerNorm(3))",
            "ref = m(torch.ones(1, 4, 3).cumsum(-1))",
            "counts = patch_model(m, FastPath())",
            "assert counts['group_norm'] == 1 and counts['layer_norm'] == 1, counts",
            "assert torch.equal(m(torch.ones(1, 4, 3).cumsum(-1)), ref)",
            "import sd_kernels  # the package imports without triton; an op needs it",
            "try:",
            "    sd_kernels.group_norm",
            "except ImportError as e:",
            "    assert 'triton' in str(e), e",
            "else:",
            "    raise AssertionError('expected ImportError')",
            "import transformers.modeling_utils  # imports Hugging Face's `kernels` where it is installed: no folder of the checkout shadows it",
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_patched_sdxl_unet_is_exact_on_cpu():
    """tiny-xl's UNet (text_time added embedding, linear projections, two-layer transformer
    blocks) patched: off the kernel devices every module computes as diffusers' does."""
    from tests.fast.models import sdxl_added_cond, tiny_xl_unet

    unet = tiny_xl_unet()
    patched = copy.deepcopy(unet)
    counts = patch_model(patched, FastPath())
    assert counts["layer_norm"] > 0 and counts["attention"] > 0
    g = torch.Generator().manual_seed(6)
    sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    added = sdxl_added_cond(2, "cpu", torch.float32)
    with torch.no_grad():
        ours = patched(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample
        theirs = unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert torch.equal(ours, theirs)
