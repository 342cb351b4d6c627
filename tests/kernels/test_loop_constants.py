"""kernels.loop_constants: a loop's step-invariant work done once gives what every step computing it gives.

The patched tiny UNet runs its kernel-device paths (fused ResnetBlock2D tails, fused k/v
projections): on CUDA in fp16, elsewhere on the CPU with the device check swapped and the
kernels under the interpreter (attention itself on torch's SDPA there, to keep it short).
"""

import contextlib
import copy
import types

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("triton")

from kernels import loop_constants, patch  # noqa: E402
from kernels.loop_constants import LoopConstants  # noqa: E402
from tests.kernels.test_patch import _tiny_unet  # noqa: E402
from tests.kernels.utils import DEVICE, ON_CUDA, assert_close  # noqa: E402

DTYPE = torch.float16 if ON_CUDA else torch.float32
TOL = 2e-2 if ON_CUDA else 1e-5  # fp16 GEMMs over all steps at once round unlike one step's
TIMESTEPS = torch.tensor([901, 501, 101], device=DEVICE)  # distinct steps: a wrong table row changes the output


@pytest.fixture
def unet(monkeypatch):
    monkeypatch.setenv("SD_KERNEL_DISPATCH", "always")  # no per-shape timing calls in the counts
    if not ON_CUDA:
        monkeypatch.setattr(patch, "_is_kernel_device", lambda t: True)
        monkeypatch.setattr(patch, "_ATTN_DTYPES", ())  # SDPA for the attention product itself
    model = _tiny_unet().to(DEVICE, DTYPE)
    counts = patch.patch_model(model)
    assert counts["time_embedding"] == 2 and counts["resnet_silu_fused"] > 0
    return model


def _inputs():
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(DEVICE, DTYPE)  # (batch, 4, 8, 8)
    context = torch.randn(2, 77, 32, generator=g).to(DEVICE, DTYPE)  # (batch, 77, cross_attention_dim)
    return sample, context


def _loop(unet, sample, context, constants=None):
    """One UNet call per timestep (the latents held fixed): (steps, batch, 4, 8, 8)."""
    outs = []
    with torch.inference_mode():
        for i in range(len(TIMESTEPS)):
            if constants is not None:
                constants.step = i
            outs.append(unet(sample, TIMESTEPS[i], encoder_hidden_states=context).sample)
    return torch.stack(outs)


def _count_calls(module, counts, name):
    module.register_forward_hook(lambda *_: counts.__setitem__(name, counts.get(name, 0) + 1))


def test_loop_constants_match_every_step_computing(unet, monkeypatch):
    sample, context = _inputs()
    counts = {}
    for m in unet.modules():
        if isinstance(m, patch.TritonResnetBlock2D):
            _count_calls(m.time_emb_proj, counts, "time_emb_proj")
    _count_calls(unet.time_embedding.linear_1, counts, "time_embedding")
    kv = {"n": 0}

    def linear(x, *args, **kwargs):
        kv["n"] += x is context  # the k/v GEMM of a cross-attention
        return torch.nn.functional.linear(x, *args, **kwargs)

    monkeypatch.setattr(patch, "F", types.SimpleNamespace(**{**vars(torch.nn.functional), "linear": linear}))
    cross = sum(isinstance(m, patch.Attention) and m.is_cross_attention for m in unet.modules())

    every_step = _loop(unet, sample, context)
    per_step = dict(counts)
    kv_per_step, kv["n"] = kv["n"], 0
    counts.clear()
    with LoopConstants(unet, TIMESTEPS, context) as constants:
        hoisted = _loop(unet, sample, context, constants)
    assert loop_constants.active() is None

    assert_close(hoisted, every_step, TOL, TOL, "tiny unet, loop constants")
    steps = len(TIMESTEPS)
    resnets = sum(isinstance(m, patch.TritonResnetBlock2D) for m in unet.modules())
    assert per_step == {"time_emb_proj": resnets * steps, "time_embedding": steps}, per_step
    # once for the loop: the tables were made over all steps in one call each
    assert counts == {"time_emb_proj": resnets, "time_embedding": 1}, counts
    assert cross > 0 and kv_per_step == cross * steps and kv["n"] == cross


def test_other_embeddings_are_not_reused(unet):
    """A call whose context is not the loop's embeds computes its own keys and values."""
    sample, context = _inputs()
    other = context.flip(0)
    with torch.inference_mode():
        expected = unet(sample, TIMESTEPS[1], encoder_hidden_states=other).sample
        with LoopConstants(unet, TIMESTEPS, context) as constants:
            constants.step = 0
            unet(sample, TIMESTEPS[0], encoder_hidden_states=context)  # fills the k/v memo
            constants.step = 1
            got = unet(sample, TIMESTEPS[1], encoder_hidden_states=other).sample
    assert_close(got, expected, TOL, TOL, "other context")


def test_a_step_not_set_is_an_error(unet):
    sample, context = _inputs()
    with torch.inference_mode(), LoopConstants(unet, TIMESTEPS, context):
        with pytest.raises(RuntimeError, match="row 0"):
            unet(sample, TIMESTEPS[1], encoder_hidden_states=context)  # step left at 0


def test_outside_a_loop_the_patched_unet_is_exact():
    """No LoopConstants block: the swapped time-embedding modules compute what diffusers' do."""
    plain = _tiny_unet()
    patched = copy.deepcopy(plain)
    patch.patch_model(patched)
    sample, context = (t.cpu().float() for t in _inputs())
    with torch.inference_mode():
        assert torch.equal(
            patched(sample, TIMESTEPS[0].cpu(), encoder_hidden_states=context).sample,
            plain(sample, TIMESTEPS[0].cpu(), encoder_hidden_states=context).sample,
        )


def test_denoise_sets_the_step(unet):
    """sd_backend's loop (PNDM: one UNet step more than asked) lines its steps up with the table."""
    from diffusers import PNDMScheduler

    from sd_backend.stages import denoise

    sample, context = _inputs()
    latents = sample[:1]
    embeds = context  # (2, 77, 32): negatives first
    guidance = torch.full((1, 1, 1, 1), 7.5, device=DEVICE)

    def run(with_constants):
        scheduler = PNDMScheduler(skip_prk_steps=True)
        scheduler.set_timesteps(3)
        timesteps = scheduler.timesteps.to(DEVICE)
        constants = LoopConstants(unet, timesteps, embeds) if with_constants else None
        with constants if constants is not None else contextlib.nullcontext():
            return denoise(unet, scheduler, latents, embeds, guidance, None, timesteps, constants=constants)

    assert_close(run(True), run(False), TOL, TOL, "denoise with loop constants")
