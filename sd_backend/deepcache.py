"""DeepCache (Ma, Fang and Wang, CVPR 2024): a UNet's deep features change little from one
denoising step to the next, so the loop runs the whole UNet only at every N-th step and,
in between, only its shallow branch, fed with the deep feature the last full step left.

The computation equals the DeepCache package's `DeepCacheSDHelper` (0.1.1,
`set_params(cache_interval=N, cache_branch_id=k)`, uniform skipping):
- branch k is (block, layer) = divmod(k, 3), the helper's numbering (3 = the positions of an
  up block of a UNet with 2 layers per block, as SD 1.x, 2.x and SDXL have);
- at a cached step the UNet runs its time embedding, conv_in, the down blocks before
  `block` and the first `layer` (resnet, attention) pairs of down block `block`; then up
  block len(up_blocks) - 1 - block from position 2 - layer (for 2 layers per block) on,
  whose input is the hidden state that entered that position at the last full step,
  then the later up blocks and the output head; the mid block and everything deeper are
  not computed;
- a step is full when (i - i0) % N == 0 for i the position of its timestep's first
  occurrence in the scheduler's timesteps and i0 the loop's first (the helper's step
  counter: PNDM's repeated second timestep counts as one position).

The full steps run UNet2DConditionModel.forward's own sequence of module calls (the same
ops in the same order, so the same numbers) while keeping that hidden state: whole blocks
are called as the forward calls them, and only the two blocks the branch cuts through (its
down block's first pairs, its up block from the entry position) repeat their forward's
loop of resnet, attention and resampler calls. Inside a captured loop the cache is
one of the graph's intermediate tensors: a key's full and cached steps are fixed, so the
whole loop stays one static graph.
"""

from __future__ import annotations

LAYERS_PER_BRANCH_BLOCK = 3  # DeepCacheSDHelper's `cache_branch_id % 3` / `// 3`


def full_steps(scheduler_timesteps, loop_timesteps, interval: int) -> list[bool]:
    """Per loop step, whether it runs the whole UNet (DeepCacheSDHelper's uniform schedule)."""
    first: dict[float, int] = {}
    for position, t in enumerate(scheduler_timesteps.tolist()):
        first.setdefault(t, position)
    positions = [first[t] for t in loop_timesteps.tolist()]
    return [(p - positions[0]) % interval == 0 for p in positions]


def check_branch(unet, branch: int) -> tuple[int, int]:
    """(block, layer) of cache branch `branch` on this UNet; ValueError naming the setting."""
    block, layer = divmod(branch, LAYERS_PER_BRANCH_BLOCK)
    blocks = len(unet.down_blocks)
    if branch < 0 or block >= blocks:
        raise ValueError(f"cache_branch: {branch} is outside this UNet; allowed 0 to {blocks * LAYERS_PER_BRANCH_BLOCK - 1}")
    pairs = len(unet.down_blocks[block].resnets)
    positions = len(unet.up_blocks[blocks - 1 - block].resnets)
    if layer > pairs or layer >= positions:
        raise ValueError(
            f"cache_branch: {branch} is layer {layer} of block {block}, which has {pairs} layers in this UNet; "
            f"allowed layers 0 to {min(pairs, positions - 1)}"
        )
    config = unet.config
    unsupported = [
        name for name, value in (
            ("class_embed_type", config.class_embed_type), ("center_input_sample", config.center_input_sample),
            ("time_cond_proj_dim", config.time_cond_proj_dim),
        ) if value
    ]
    if config.addition_embed_type not in (None, "text_time"):
        unsupported.append("addition_embed_type")
    if unsupported:
        raise ValueError(f"cache_interval: DeepCache does not run on a UNet with {', '.join(unsupported)}")
    return block, layer


class DeepCache:
    """The UNet calls of one denoising loop with DeepCache.

    unet: a diffusers UNet2DConditionModel (plain or patched by sd_backend.fast).
    full: per loop step, whether it runs the whole UNet (see `full_steps`).
    branch: the cache branch (see the module docstring; 0 caches the most).
    """

    def __init__(self, unet, full: list[bool], branch: int):
        if not full or not full[0]:
            raise ValueError("DeepCache: the loop's first step must run the whole UNet")
        self.unet = unet
        self.full = full
        self.block, self.layer = check_branch(unet, branch)
        self.up = len(unet.up_blocks) - 1 - self.block  # the up block the shallow branch enters
        self.entry = len(unet.up_blocks[self.up].resnets) - 1 - self.layer  # ... at this position
        self.cache = None  # (rows, C, h, w): the hidden state entering that position at the last full step

    def keep_rows(self, start: int) -> None:
        """Keep the cache's rows from `start` on (a guidance cutoff keeps the conditional half)."""
        if self.cache is not None:
            self.cache = self.cache[start:]

    def __call__(self, step: int, sample, timestep, embeds, added_cond_kwargs=None):
        """The noise prediction of loop step `step`: unet(sample, timestep, embeds) with DeepCache."""
        unet, full = self.unet, self.full[step]
        # forward's own preamble: time (and SDXL's added) embedding, conditioning, conv_in
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=embeds, added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        embeds = unet.process_encoder_hidden_states(encoder_hidden_states=embeds, added_cond_kwargs=added_cond_kwargs)
        forward_upsample_size = any(size % 2**unet.num_upsamplers != 0 for size in sample.shape[-2:])
        hidden = unet.conv_in(sample)
        skips = (hidden,)

        for block in unet.down_blocks if full else unet.down_blocks[: self.block]:
            hidden, outputs = _run_block(block, hidden, emb, embeds)
            skips += outputs
        if full:
            if unet.mid_block is not None:
                hidden = _run_mid(unet.mid_block, hidden, emb, embeds)
        else:  # the first pairs of the branch's own block; its deeper skips feed up blocks not run
            hidden, outputs = _down_pairs(unet.down_blocks[self.block], hidden, emb, embeds, self.layer)
            skips += outputs
            hidden = self.cache

        upsample_size = None
        for index in range(0 if full else self.up, len(unet.up_blocks)):
            block = unet.up_blocks[index]
            begin = self.entry if (index == self.up and not full) else 0
            take = len(block.resnets) - begin
            outputs, skips = skips[-take:], skips[:-take]
            if index < len(unet.up_blocks) - 1 and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            if index != self.up:
                hidden = _run_block(block, hidden, emb, embeds, outputs, upsample_size)
                continue
            hidden, entering = _up_positions(block, hidden, outputs, emb, embeds, upsample_size, begin, self.entry)
            if full:
                self.cache = entering
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def _attend(attention, hidden, embeds):
    return attention(
        hidden, encoder_hidden_states=embeds, cross_attention_kwargs=None, attention_mask=None,
        encoder_attention_mask=None, return_dict=False,
    )[0]


def _cross_kwargs(block, embeds) -> dict:
    if not getattr(block, "has_cross_attention", False):
        return {}
    return dict(encoder_hidden_states=embeds, attention_mask=None, cross_attention_kwargs=None, encoder_attention_mask=None)


def _run_block(block, hidden, emb, embeds, skips=None, upsample_size=None):
    """A whole down block (skips None) or up block, called as UNet2DConditionModel.forward calls it."""
    if skips is None:
        return block(hidden_states=hidden, temb=emb, **_cross_kwargs(block, embeds))
    return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=skips, upsample_size=upsample_size, **_cross_kwargs(block, embeds))


def _run_mid(block, hidden, emb, embeds):
    return block(hidden, emb, **_cross_kwargs(block, embeds))


def _down_pairs(block, hidden, emb, embeds, pairs: int):
    """The first `pairs` (resnet, attention) pairs of a down block, as its forward runs them."""
    attentions = getattr(block, "attentions", None)
    outputs = ()
    for i in range(pairs):
        hidden = block.resnets[i](hidden, emb)
        if attentions is not None:
            hidden = _attend(attentions[i], hidden, embeds)
        outputs += (hidden,)
    return hidden, outputs


def _up_positions(block, hidden, skips, emb, embeds, upsample_size, begin: int, keep: int):
    """An up block from position `begin` on, as its forward runs it (FreeU off); also returns
    the hidden state that entered position `keep` (None when it is before `begin`)."""
    import torch

    attentions = getattr(block, "attentions", None)
    entering = None
    for j in range(begin, len(block.resnets)):
        if j == keep:
            entering = hidden
        hidden = torch.cat([hidden, skips[-1]], dim=1)
        skips = skips[:-1]
        hidden = block.resnets[j](hidden, emb)
        if attentions is not None:
            hidden = _attend(attentions[j], hidden, embeds)
    if block.upsamplers is not None:
        for upsampler in block.upsamplers:
            hidden = upsampler(hidden, upsample_size)
    return hidden, entering
