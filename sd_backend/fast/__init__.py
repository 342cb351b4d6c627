"""The GPU fast path: this project's kernels inside diffusers' modules, and the whole
denoising loop as CUDA graphs. Three layers, each importing only those below it:

1. `sd_kernels` (the repository's `kernels/` folder): the OpenAI-Triton ops, tensors in
   and tensors out, each beside its torch reference. No diffusers.
2. `sd_backend.fast.modules`: diffusers' modules with those ops swapped in, one file per
   module replaced (attention, transformer block, ResNet block, norms, GEGLU, time
   embedding), and `patch_model`, which swaps them into a UNet or a VAE. Every patched
   module holds the model's `runtime.FastPath`: the deployment's FastPathOptions and the
   per-shape choice between a kernel and torch's op.
3. `step_constants.StepConstants` (a loop's step-invariant work done once, its UNet calls
   made explicitly) and `graphs.LoopGraphs` (captured loops per graph key, one memory pool).
   `levels` applies a deployment's opt_level to a stage at load.

Where a request meets it: `sd_backend.stages.UNetStage.from_config` calls
`levels.optimize_unet_stage`, and `UNetStage.run_group` replays a captured loop when one
holds the request's key (steps, size, scheduler, guidance on or off), else runs
`sd_backend.denoise.denoise` eagerly through the patched modules.
"""
