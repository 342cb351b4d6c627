"""The whole denoising loop captured per bucket and group key (steps, size, scheduler,
guidance, image-to-image's start step, ...): CUDA graphs per step, replayed back to back
(or one graph for the whole loop, with the fast path's step_graphs off). Image-to-image's
loop is the scheduler's timesteps from its start step on, the noised image its initial
latents.

The scheduler runs on CPU timesteps, so its per-step coefficients are CPU scalars that the
capture bakes into the kernels' arguments (they are fixed for a graph key: that is the
precomputed coefficient table); the UNet gets its timesteps from a device tensor made
before capture. Initial latents, embeddings, guidance scales and (for Euler ancestral)
every step's noise are static device buffers, filled before each replay; the noise is drawn
on the CPU from the request's own generator in the order diffusers draws it, so a seed gives
the same image on the graph path as on the eager one.

Per-step graphs are captured in one pass of the loop, in the order they replay, sharing the
memory pool, so each step reads what the one before it left; each step's output latents stay
allocated, which lets a replay report progress (and previews) after every step: the host
waits for step i's event while steps i+1 .. i+LOOKAHEAD already run on the GPU. With the
step-invariant work hoisted, the UNet's call is recorded once per loop and each step replays
it between two graphs of its own (sd_backend.fast.unet_graph).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Sequence

from ..denoise import denoise
from ..params import GenerationParams
from ..schedulers import make_scheduler

log = logging.getLogger("sd_backend")

# Schedulers whose step() draws noise it actually uses (eta 0 for DDIM, s_churn 0 for Euler;
# LCM at every step but the last, so one buffer of each image's draws is left over).
_NOISY = {"euler_a", "lcm"}
# steps queued on the GPU ahead of the one being reported: enough to cover a report's host
# time (a socket send, a preview's copy), few enough that a cancel stops the GPU soon after
LOOKAHEAD = 3


@contextlib.contextmanager
def _noise_from(scheduler, buffers: list):
    """Make the scheduler's `randn_tensor` hand out the prepared noise buffers in order."""
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    queue = iter(buffers)

    def prepared(shape, generator=None, device=None, dtype=None, layout=None):
        buffer = next(queue)
        if tuple(buffer.shape) != tuple(shape):
            raise RuntimeError(f"noise buffer {tuple(buffer.shape)} != requested {tuple(shape)}")
        return buffer

    if original is not None:
        module.randn_tensor = prepared
    try:
        yield
    finally:
        if original is not None:
            module.randn_tensor = original


def _signature(value):
    """What a call's first-call work depends on: each tensor's shape, strides, dtype and
    device, the other arguments' types (and the values of flags and names)."""
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((k, _signature(v)) for k, v in sorted(value.items()))
    if value is None or isinstance(value, (bool, str)):
        return value
    return type(value).__name__


@contextlib.contextmanager
def once_per_signature(unet):
    """For the warm-up pass before a capture: the UNet's forward runs once per call signature,
    later calls of that signature get the first one's output. What the warm-up is for (cuDNN's
    algorithm search, Triton's compiles and autotuning, the dispatch's `measure` timings,
    lazy allocations) depends on the shapes alone, so one call of each shape does it all, and
    the scheduler's steps (every op the capture will meet) still run in full; the warm-up's
    output is dropped. The capture pass runs the real forward at every step."""
    outputs = {}
    own = unet.__dict__.get("forward")  # torch.compile's module keeps its own forward here
    forward = unet.forward

    def once(*args, **kwargs):
        key = _signature((args, kwargs))
        if key not in outputs:
            outputs[key] = forward(*args, **kwargs)
        return outputs[key]

    unet.forward = once
    try:
        yield
    finally:
        if own is None:
            del unet.forward
        else:
            unet.forward = own


class CapturedLoop:
    """The denoising loop of one graph key as a CUDA graph with static buffers.

    stage: the UNetStage (its unet, scheduler_config, vae_scale, device, dtype).
    hoist: make the loop's step-invariant work once per replay (sd_backend.fast.step_constants).
    step_graphs: graphs per step (progress can be reported between them), else one graph.
    unet_pool: with hoist and step_graphs, the memory pool of the UNet's own graph, recorded
        once and replayed by every step (sd_backend.fast.unet_graph); None records the UNet
        into every step's graph.
    """

    def __init__(self, stage, bucket: int, params: GenerationParams, pool, hoist: bool, step_graphs: bool = True, unet_pool=None):
        import torch

        self.stage = stage
        self.bucket = bucket
        self.scheduler_name = params.scheduler
        self.steps = params.steps
        self.cutoff = params.guidance_cutoff if params.uses_guidance else 1.0
        self.cache_interval = params.cache_interval
        # the step constants' tables hold every row (after a guidance cutoff the UNet gets half
        # of them) and are read by the UNet's own forward (DeepCache's steps call its blocks)
        self.hoist = hoist and self.cutoff >= 1.0 and self.cache_interval == 1
        unet = stage.unet
        latent_shape = (bucket, stage.family.latent_channels, params.height // stage.vae_scale, params.width // stage.vae_scale)
        device, dtype = stage.device, stage.dtype
        self.cfg = params.uses_guidance
        hidden = unet.config.cross_attention_dim
        # static inputs, filled before each replay
        self.latents = torch.randn(latent_shape, device=device, dtype=dtype)
        rows = (2 if self.cfg else 1) * bucket
        self.embeds = torch.randn((rows, 77, hidden), device=device, dtype=dtype)
        self.added = None  # SDXL's added_cond_kwargs
        if stage.family.is_sdxl:
            self.added = {
                "text_embeds": torch.randn((rows, stage.family.pooled_dim), device=device, dtype=dtype),
                "time_ids": torch.full((rows, 6), float(params.height), device=device, dtype=dtype),
            }
        self.guidance = torch.full((bucket, 1, 1, 1), 7.5, device=device) if self.cfg else None
        # image-to-image starts part way: the scheduler's timesteps from its begin index on
        self.image_to_image = params.strength is not None
        self.loop_steps = params.steps - params.start_step
        self.noise = torch.randn((self.loop_steps,) + latent_shape, device=device, dtype=dtype)
        if self.scheduler_name not in _NOISY:
            self.noise = self.noise[:1].expand((self.loop_steps,) + latent_shape)  # drawn but unused
        probe = make_scheduler(self.scheduler_name, stage.scheduler_config)
        probe.set_timesteps(self.steps, device="cpu")
        self.begin = params.start_step * probe.order
        self.unet_timesteps = probe.timesteps[self.begin :].to(device)  # (loop steps,) on the GPU for the UNet
        # inpainting reads its inputs from static buffers too: an inpainting UNet the mask and the
        # masked image's latents beside the latents at every step, a plain UNet the mask and the
        # table of what its blend puts back after each step (sd_backend.inpaint.prepare_blend)
        self.mask = self.masked = self.proper = None
        if params.inpaint:
            self.mask = torch.zeros((rows, 1) + latent_shape[2:], device=device, dtype=dtype)
            if stage.family.inpainting_unet:
                self.masked = torch.zeros((rows,) + latent_shape[1:], device=device, dtype=dtype)
            else:
                self.proper = torch.zeros((len(self.unet_timesteps),) + latent_shape, device=device, dtype=dtype)

        # warm up (autotuning, cuDNN algorithm search, lazy inits) on a side stream, then capture
        start = time.perf_counter()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), once_per_signature(unet):
            self._loop()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        self.warmup_s = time.perf_counter() - start
        self.step_graphs = step_graphs
        self.unet_call = None  # the SharedUNetCall whose graph the steps replay, if any
        start = time.perf_counter()
        self.graphs, self.step_outputs = self._capture(pool, side, unet_pool if self.hoist and step_graphs else None)
        self.record_s = time.perf_counter() - start
        self.output = self.step_outputs[-1]
        self.report_stream = torch.cuda.Stream(device)  # previews' arithmetic and copies, beside the replay

    def _capture(self, pool, stream, unet_pool):
        """(graphs, each step's output latents): the loop captured on `stream`; graphs[i] is
        step i's graphs in replay order (one graph for the whole loop without step_graphs,
        and only the last step's output kept). With `unet_pool` the UNet's call is its own
        graph, recorded at the first step, between each step's two graphs."""
        import torch

        graphs, outputs = [], []

        def begin() -> None:
            graphs[-1].append(torch.cuda.CUDAGraph())
            graphs[-1][-1].capture_begin(pool=pool)

        def split(unet_graph) -> None:  # the UNet's call: the step's graph so far, then the UNet's
            graphs[-1][-1].capture_end()
            graphs[-1].append(unet_graph())
            begin()

        def cut(index: int, total: int, latents) -> None:  # a denoise callback: end this step's graphs
            outputs.append(latents)
            graphs[-1][-1].capture_end()
            if index + 1 < total:
                graphs.append([])
                begin()

        def shared(constants):
            from .unet_graph import SharedUNetCall

            self.unet_call = SharedUNetCall(constants, unet_pool, split)
            return self.unet_call

        with torch.cuda.stream(stream):
            if self.step_graphs:
                graphs.append([])
                begin()
                self._loop(callback=cut, wrap=shared if unet_pool is not None else None)
            else:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    outputs.append(self._loop())
                graphs.append([graph])
        torch.cuda.current_stream(self.stage.device).wait_stream(stream)
        return graphs, outputs

    def _loop(self, callback=None, wrap=None):
        """The eager loop on the static buffers (what warm-up runs and capture records);
        `wrap(constants)` stands in for the loop's StepConstants."""
        from .step_constants import StepConstants

        scheduler = make_scheduler(self.scheduler_name, self.stage.scheduler_config)
        scheduler.set_timesteps(self.steps, device="cpu")  # CPU: coefficients become constants
        timesteps = None
        if self.image_to_image:  # as UNetStage._start_part_way sets the eager loop's
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(self.begin)
            timesteps = scheduler.timesteps[self.begin :]
        constants = StepConstants(self.stage.unet, self.unet_timesteps, self.embeds, self.added) if self.hoist else None
        if constants is not None and wrap is not None:
            constants = wrap(constants)
        inpaint = None
        if self.mask is not None:  # a new one per pass: a guidance cutoff narrows its rows as the loop runs
            from ..inpaint import Inpainting

            if self.proper is None:
                inpaint = Inpainting(self.mask, self.masked)
            else:  # the blend reads the table alone (image_latents marks the kind)
                inpaint = Inpainting(self.mask, None, image_latents=self.proper[-1], proper=self.proper)
        with _noise_from(scheduler, list(self.noise.unbind(0))):
            return denoise(
                self.stage.unet, scheduler, self.latents, self.embeds, self.guidance, None, self.unet_timesteps,
                step_constants=constants, added_cond_kwargs=self.added, guidance_cutoff=self.cutoff, timesteps=timesteps,
                cache_interval=self.cache_interval, cache_branch=self.stage.config.cache_branch, callback=callback,
                inpaint=inpaint,
            )

    def run(self, latents, embeds, guidance, generators: Sequence, added_cond_kwargs: dict | None = None, callback=None, inpaint=None):
        """Replay for n <= bucket images; returns (n, 4, h, w). `callback(index, count,
        latents)` (see `denoise`; step graphs only) runs after each step with that step's
        (n, C, h, w) latents, while the next steps run; what it raises stops the replay.
        `inpaint`: the group's sd_backend.inpaint.Inpainting (an inpainting UNet's)."""
        n = latents.shape[0]
        # pad the bucket with copies of the first image (their output is dropped)
        _fill(self.latents, latents, n, 1)
        halves = 2 if self.cfg else 1  # conditioning rows: negatives then prompts, each padded alike
        _fill(self.embeds, embeds, n, halves)
        for name, static in (self.added or {}).items():
            _fill(static, added_cond_kwargs[name], n, halves)
        if self.mask is not None:
            _fill(self.mask, inpaint.mask, n, halves)
        if self.masked is not None:
            _fill(self.masked, inpaint.masked, n, halves)
        if self.proper is not None:  # (steps, n, ...) into (steps, bucket, ...)
            self.proper[:, :n].copy_(inpaint.proper)
            self.proper[:, n:].copy_(inpaint.proper[:, :1].expand((-1, self.bucket - n) + tuple(inpaint.proper.shape[2:])))
        if self.cfg:
            self.guidance[:n].copy_(guidance)
            self.guidance[n:].fill_(1.0)
        if self.scheduler_name in _NOISY:
            self.noise[:, :n].copy_(self._draw_noise(generators, n))
        if callback is None:
            for index in range(len(self.graphs)):
                self._replay_step(index)
        else:
            self._replay_reporting(n, callback)
        return self.output[:n].clone()

    def _replay_reporting(self, n: int, callback) -> None:
        import torch

        if not self.step_graphs:
            raise ValueError("CapturedLoop: progress needs the loop captured as step graphs")
        total, done = len(self.graphs), []

        def launch(index: int) -> None:
            self._replay_step(index)
            done.append(torch.cuda.Event())
            done[-1].record()

        for index in range(min(LOOKAHEAD, total)):
            launch(index)
        for index in range(total):
            done[index].synchronize()
            if index + LOOKAHEAD < total:
                launch(index + LOOKAHEAD)
            with torch.cuda.stream(self.report_stream):  # a preview's copy waits for nothing queued
                callback(index, total, self.step_outputs[index][:n])

    def _replay_step(self, index: int) -> None:
        """Step `index`'s graphs, in order (the whole loop's one graph without step_graphs)."""
        for graph in self.graphs[index]:
            graph.replay()

    def _draw_noise(self, generators: Sequence, n: int):
        """Every step's noise, from each image's generator in diffusers' order."""
        import torch

        shape = (1,) + tuple(self.latents.shape[1:])
        per_step = [
            torch.cat([torch.randn(shape, generator=g, dtype=self.latents.dtype) for g in generators[:n]])
            for _ in range(self.loop_steps)
        ]
        return torch.stack(per_step).to(self.latents.device, non_blocking=True)


def _fill(static, given, n: int, halves: int) -> None:
    """Copy `given` ((halves x n, ...)) into `static` ((halves x bucket, ...)), each half's
    rows past n repeating that half's first."""
    bucket = static.shape[0] // halves
    for half, source in enumerate(given.chunk(halves)):
        rows = static[half * bucket : (half + 1) * bucket]
        rows[:n].copy_(source)
        rows[n:].copy_(source[:1].expand((bucket - n,) + tuple(source.shape[1:])))


class LoopGraphs:
    """Captured loops of a UNetStage, sharing one memory pool; eager for keys not captured."""

    def __init__(self, stage, hoist: bool, step_graphs: bool = True, unet_graph: bool = True):
        import torch

        self.stage = stage
        self.hoist = hoist
        self.step_graphs = step_graphs
        self.pool = torch.cuda.graph_pool_handle()
        # the UNet graphs' own pool (sd_backend.fast.unet_graph), shared by every loop's
        self.unet_pool = torch.cuda.graph_pool_handle() if unet_graph else None
        self.loops: dict[tuple, CapturedLoop] = {}

    def capture(self, params: GenerationParams, buckets: Sequence[int]) -> float:
        """Capture the loop of `params`' key for each bucket; returns seconds spent."""
        import gc

        start = time.perf_counter()
        # once per call, not per loop: with torch, diffusers and the loops' graphs on the heap a
        # collection took 0.3-0.7 s a loop in bench_capture's profiled run on the H200 host
        gc.collect()
        for bucket in sorted(buckets):
            key = (bucket,) + params.loop_key()
            if key not in self.loops:
                self.loops[key] = CapturedLoop(self.stage, bucket, params, self.pool, self.hoist, self.step_graphs, self.unet_pool)
        return time.perf_counter() - start

    def capture_defaults(self) -> None:
        """The deployment's default request at every configured batch bucket (and image-to-image's
        at each of fast_path.image_to_image_strengths)."""
        config = self.stage.config
        if self.stage.family.inpainting_unet:  # it serves inpainting only: its default request
            seconds = self.capture(self.stage.check(seed=0, inpaint=True, strength=config.default_inpaint_strength), config.batch_buckets)
            log.info("captured %d inpainting loop graphs in %.1f s", len(self.loops), seconds)
            return
        seconds = self.capture(self.stage.check(seed=0), config.batch_buckets)
        for strength in config.fast_path.image_to_image_strengths:
            seconds += self.capture(self.stage.check(seed=0, strength=strength), config.batch_buckets)
        warmup = sum(loop.warmup_s for loop in self.loops.values())
        record = sum(loop.record_s for loop in self.loops.values())
        log.info("captured %d denoising-loop graphs in %.1f s (warm-up %.1f s, recording %.1f s)", len(self.loops), seconds, warmup, record)

    def find(self, params: GenerationParams, n: int, reports: bool = False) -> CapturedLoop | None:
        """The smallest captured bucket that holds n images of this key; with `reports`, only
        a loop captured as step graphs (progress runs the eager loop otherwise)."""
        if reports and not self.step_graphs:
            return None
        best = None
        for (bucket, *key), loop in self.loops.items():
            if tuple(key) == params.loop_key() and bucket >= n and (best is None or bucket < best.bucket):
                best = loop
        return best
