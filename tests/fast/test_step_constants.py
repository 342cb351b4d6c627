"""sd_backend.fast.step_constants: a loop's step-invariant work done once gives what every
step computing it gives, to rounding.

The patched tiny UNet runs its kernel-device paths (fused ResnetBlock2D tails, fused k/v
projections): on CUDA in fp16, elsewhere on the CPU as a kernel device with the kernels
under the interpreter (attention itself on torch's SDPA there, to keep it short).

Why the two differ at all, and by how much they may: the tables are GEMMs over all steps at
once, (steps, K) x (K, C), where the per-step path multiplies (batch, K) x (K, C). A BLAS
library picks its kernel, blocking and summation order by the shape, so the same row can
round differently (seen: 2.4e-5 on an AMD EPYC with OpenBLAS, 0 on Intel). Everything else
is the same code on the same inputs. The tests run in float32 on every device, so that one
bound holds everywhere; a table row of the wrong step changes the output by far more
(about 0.15 relative here), which each test also checks, so none can pass by accident.
"""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("triton")

from sd_backend.config import FastPathOptions  # noqa: E402
from sd_backend.fast import step_constants as sc  # noqa: E402
from sd_backend.fast.modules import attention, patch_model  # noqa: E402
from sd_backend.fast.modules.resnet import TritonResnetBlock2D  # noqa: E402
from sd_backend.fast.runtime import FastPath  # noqa: E402
from sd_backend.fast.step_constants import StepConstants  # noqa: E402
from tests.fast.models import cpu_kernels, tiny_unet  # noqa: E402
from tests.kernels.utils import DEVICE, ON_CUDA, rel_l2, rounding_bound  # noqa: E402

DTYPE = torch.float32
# Only the tables' GEMMs differ between the paths: the time embedding's linears and each
# block's time_emb_proj, over at most the tiny UNet's 128 time-embedding channels (K). Each
# row is within gamma_K of exact either way, so the two may differ by 2 gamma_K; that
# perturbation may pass through each of the fewer than 50 layers on the UNet's path without
# shrinking (first order), and a loop adds it once per UNet call.
K, LAYERS = 128, 50
ONE_CALL = LAYERS * 2 * rounding_bound(DTYPE, K)  # relative L2 of one UNet call's output, about 7.6e-4
TIMESTEPS = torch.tensor([901, 501, 101], device=DEVICE)  # distinct steps: a wrong table row changes the output


@pytest.fixture
def unet():
    options = FastPathOptions(kernel_dispatch="always")  # no per-shape timing calls in the counts
    fast = FastPath(options) if ON_CUDA else cpu_kernels(options)
    model = tiny_unet().to(DEVICE, DTYPE)
    counts = patch_model(model, fast)
    assert counts["time_embedding"] == 2 and counts["resnet_silu_fused"] > 0
    return model


def _inputs():
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(DEVICE, DTYPE)  # (batch, 4, 8, 8)
    context = torch.randn(2, 77, 32, generator=g).to(DEVICE, DTYPE)  # (batch, 77, cross_attention_dim)
    return sample, context


def _every_step(unet, sample, context):
    """One UNet call per timestep (the latents held fixed), each computing everything: (steps, batch, 4, 8, 8)."""
    with torch.inference_mode():
        return torch.stack([unet(sample, t, encoder_hidden_states=context).sample for t in TIMESTEPS])


def _hoisted(constants, sample):
    with torch.inference_mode():
        return torch.stack([constants.unet_step(i, sample) for i in range(len(TIMESTEPS))])


def _rolled(constants):
    """The same tables shifted by one step: what a loop taking the wrong row would compute."""
    constants._tables = [(owner, name, table.roll(1, 0)) for owner, name, table in constants._tables]
    return constants


def _count_calls(module, counts, name):
    module.register_forward_hook(lambda *_: counts.__setitem__(name, counts.get(name, 0) + 1))


def test_step_constants_match_every_step_computing(unet, monkeypatch):
    sample, context = _inputs()
    counts = {}
    for m in unet.modules():
        if isinstance(m, TritonResnetBlock2D):
            _count_calls(m.time_emb_proj, counts, "time_emb_proj")
    _count_calls(unet.time_embedding.linear_1, counts, "time_embedding")
    kv = {"n": 0}
    project_kv = attention.TritonAttnProcessor.project_kv

    def counted_kv(self, attn, states):
        kv["n"] += 1
        return project_kv(self, attn, states)

    monkeypatch.setattr(attention.TritonAttnProcessor, "project_kv", counted_kv)
    cross = sum(isinstance(m, attention.Attention) and m.is_cross_attention for m in unet.modules())

    every_step = _every_step(unet, sample, context)
    per_step, kv_per_step = dict(counts), kv["n"]
    counts.clear()
    kv["n"] = 0
    hoisted = _hoisted(StepConstants(unet, TIMESTEPS, context), sample)

    error = rel_l2(hoisted, every_step)
    assert error <= ONE_CALL, (error, ONE_CALL)
    steps = len(TIMESTEPS)
    resnets = sum(isinstance(m, TritonResnetBlock2D) for m in unet.modules())
    assert per_step == {"time_emb_proj": resnets * steps, "time_embedding": steps}, per_step
    # once for the loop: the tables were made over all steps in one call each
    assert counts == {"time_emb_proj": resnets, "time_embedding": 1}, counts
    assert cross > 0 and kv_per_step == cross * steps and kv["n"] == cross
    wrong = _hoisted(_rolled(StepConstants(unet, TIMESTEPS, context)), sample)
    assert rel_l2(wrong, every_step) > 2 * ONE_CALL, "a wrong table row would pass this test"


def test_bindings_hold_for_one_call_only(unet):
    """Before, after, and after a failed call, every patched module computes as diffusers' does."""
    sample, context = _inputs()
    constants = StepConstants(unet, TIMESTEPS, context)
    owners = [owner for owner, _, _ in constants._tables + constants._constants]
    assert len(owners) > 3
    with torch.inference_mode():
        constants.unet_step(1, sample)
        assert all(getattr(owner, name) is None for owner, name, _ in constants._tables + constants._constants)
        with pytest.raises(RuntimeError):
            constants.unet_step(0, sample[:, :3])  # 3 channels: conv_in fails inside the call
        assert all(getattr(owner, name) is None for owner, name, _ in constants._tables + constants._constants)
        with pytest.raises(IndexError, match="outside the loop's 3 steps"):
            constants.unet_step(3, sample)


def test_a_call_on_copies_of_a_steps_rows_is_that_step_to_the_bit(unet):
    """What the UNet's shared graph does (sd_backend.fast.unet_graph): each step's sample,
    timestep and table rows copied into one set of buffers, then the same call on those.
    Same values, same kernels: the same output to the bit, and another step's rows differ."""
    sample, context = _inputs()
    constants = StepConstants(unet, TIMESTEPS, context)
    assert constants.tables
    static_sample, static_t = torch.empty_like(sample), torch.empty_like(TIMESTEPS[0])
    rows = [torch.empty_like(table[0]) for table in constants.tables]
    with torch.inference_mode():
        for step in range(len(TIMESTEPS)):
            static_sample.copy_(sample)
            static_t.copy_(TIMESTEPS[step])
            for row, table in zip(rows, constants.tables):
                row.copy_(table[step])
            with constants.holding(rows):
                shared = constants.call(static_sample, static_t)
            assert torch.equal(shared, constants.unet_step(step, sample)), step
        assert not torch.equal(shared, constants.unet_step(0, sample))
        assert all(getattr(owner, name) is None for owner, name, _ in constants._tables + constants._constants)
        with pytest.raises(ValueError, match="2 rows for"):
            with constants.holding(rows[:2]):
                pass


def test_outside_a_loop_the_patched_unet_is_exact():
    """No loop bound: the swapped time-embedding modules compute what diffusers' do."""
    plain = tiny_unet()
    patched = tiny_unet()
    patch_model(patched, FastPath())
    sample, context = (t.cpu().float() for t in _inputs())
    with torch.inference_mode():
        assert torch.equal(
            patched(sample, TIMESTEPS[0].cpu(), encoder_hidden_states=context).sample,
            plain(sample, TIMESTEPS[0].cpu(), encoder_hidden_states=context).sample,
        )


def test_the_time_table_needs_the_plain_sd_time_embedding(unet):
    assert sc.time_table_applies(unet)
    unet.time_embed_act = torch.nn.SiLU()  # an embedding the tables do not model
    assert not sc.time_table_applies(unet)


def test_denoise_lines_its_steps_up_with_the_tables(unet):
    """sd_backend's loop (PNDM: one UNet step more than asked) takes row i of each table at step i."""
    from diffusers import PNDMScheduler

    from sd_backend.denoise import denoise

    sample, context = _inputs()
    latents = sample[:1]
    embeds = context  # (2, 77, 32): negatives first
    guidance = torch.full((1, 1, 1, 1), 7.5, device=DEVICE)

    def run(hoist, roll=False):
        scheduler = PNDMScheduler(skip_prk_steps=True)
        scheduler.set_timesteps(3)
        timesteps = scheduler.timesteps.to(DEVICE)
        constants = StepConstants(unet, timesteps, embeds) if hoist else None
        if roll:
            _rolled(constants)
        return denoise(unet, scheduler, latents, embeds, guidance, None, timesteps, step_constants=constants)

    calls = 4  # PNDM's 3 steps take 4 UNet calls
    expected = run(False)
    error = rel_l2(run(True), expected)
    assert error <= calls * ONE_CALL, (error, calls * ONE_CALL)
    assert rel_l2(run(True, roll=True), expected) > 2 * calls * ONE_CALL, "a wrong table row would pass this test"


def test_sdxl_loops_hoist_the_text_keys_and_values_and_pass_the_added_conditioning():
    """tiny-xl's UNet: its time embedding adds the pooled text and time ids (no time table,
    as time_table_applies says), the cross-attention keys and values are made once, and
    every call gets the added_cond_kwargs. Kernels under the interpreter off CUDA."""
    from tests.fast.models import sdxl_added_cond, tiny_xl_unet

    options = FastPathOptions(kernel_dispatch="always")
    unet = tiny_xl_unet().to(DEVICE, DTYPE)
    patch_model(unet, FastPath(options) if ON_CUDA else cpu_kernels(options))
    assert not sc.time_table_applies(unet)
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(DEVICE, DTYPE)
    context = torch.randn(2, 77, 64, generator=g).to(DEVICE, DTYPE)
    added = sdxl_added_cond(2, DEVICE, DTYPE)
    with torch.inference_mode():
        every_step = torch.stack([unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added).sample for t in TIMESTEPS])
    constants = StepConstants(unet, TIMESTEPS, context, added)
    assert not constants._tables and constants._constants  # k/v hoisted, no time tables
    hoisted = _hoisted(constants, sample)
    error = rel_l2(hoisted, every_step)
    assert error <= ONE_CALL, (error, ONE_CALL)
    other = {"text_embeds": added["text_embeds"].flip(0), "time_ids": added["time_ids"]}  # each image the other's pooled text
    assert rel_l2(_hoisted(StepConstants(unet, TIMESTEPS, context, other), sample), every_step) > 2 * ONE_CALL
