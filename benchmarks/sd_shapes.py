"""The shapes each op meets in Stable Diffusion 1.5 at 512x512: the kernel table's rows."""

# (name, batch, heads, q_len, kv_len, head_dim): SD 1.5 UNet, 8 heads, CLIP context of 77 tokens
ATTENTION = [
    ("unet self 64x64", 2, 8, 4096, 4096, 40),
    ("unet self 32x32", 2, 8, 1024, 1024, 80),
    ("unet self 16x16", 2, 8, 256, 256, 160),
    ("unet self 8x8", 2, 8, 64, 64, 160),
    ("unet cross 64x64", 2, 8, 4096, 77, 40),
    ("unet cross 32x32", 2, 8, 1024, 77, 80),
    ("unet cross 16x16", 2, 8, 256, 77, 160),
    ("unet cross 8x8", 2, 8, 64, 77, 160),
    # batch 8 with guidance: where the batch-8 target's attention time is
    ("unet self 64x64", 16, 8, 4096, 4096, 40),
    ("unet self 32x32", 16, 8, 1024, 1024, 80),
    ("unet self 16x16", 16, 8, 256, 256, 160),
    ("unet cross 64x64", 16, 8, 4096, 77, 40),
]

# (name, shape, groups, eps, silu): every distinct GroupNorm input of the SD 1.5 UNet (batch 2)
# and VAE decoder (batch 1); ResNet norms are followed by SiLU, which the Triton op fuses
GROUP_NORM = [
    ("unet resnet", (2, 320, 64, 64), 32, 1e-5, True),
    ("unet resnet", (2, 640, 64, 64), 32, 1e-5, True),
    ("unet resnet", (2, 960, 64, 64), 32, 1e-5, True),
    ("unet resnet", (2, 320, 32, 32), 32, 1e-5, True),
    ("unet resnet", (2, 640, 32, 32), 32, 1e-5, True),
    ("unet resnet", (2, 960, 32, 32), 32, 1e-5, True),
    ("unet resnet", (2, 1280, 32, 32), 32, 1e-5, True),
    ("unet resnet", (2, 1920, 32, 32), 32, 1e-5, True),
    ("unet resnet", (2, 640, 16, 16), 32, 1e-5, True),
    ("unet resnet", (2, 1280, 16, 16), 32, 1e-5, True),
    ("unet resnet", (2, 1920, 16, 16), 32, 1e-5, True),
    ("unet resnet", (2, 2560, 16, 16), 32, 1e-5, True),
    ("unet resnet", (2, 1280, 8, 8), 32, 1e-5, True),
    ("unet resnet", (2, 2560, 8, 8), 32, 1e-5, True),
    ("unet transformer", (2, 320, 64, 64), 32, 1e-6, False),
    ("unet transformer", (2, 640, 32, 32), 32, 1e-6, False),
    ("unet transformer", (2, 1280, 16, 16), 32, 1e-6, False),
    ("unet transformer", (2, 1280, 8, 8), 32, 1e-6, False),
    ("vae resnet", (1, 512, 64, 64), 32, 1e-6, True),
    ("vae resnet", (1, 512, 128, 128), 32, 1e-6, True),
    ("vae resnet", (1, 512, 256, 256), 32, 1e-6, True),
    ("vae resnet", (1, 256, 256, 256), 32, 1e-6, True),
    ("vae resnet", (1, 256, 512, 512), 32, 1e-6, True),
    ("vae resnet", (1, 128, 512, 512), 32, 1e-6, True),
    ("vae attention", (1, 512, 4096), 32, 1e-6, False),
]

# (name, shape): LayerNorm of the UNet transformer blocks (batch 2) and of CLIP ViT-L (cond + uncond)
LAYER_NORM = [
    ("unet 64x64", (2, 4096, 320)),
    ("unet 32x32", (2, 1024, 640)),
    ("unet 16x16", (2, 256, 1280)),
    ("unet 8x8", (2, 64, 1280)),
    ("clip", (2, 77, 768)),
]

# (name, shape of the projection output (..., 2F)): GEGLU of the UNet feed-forward, F = 4 * channels
GEGLU = [
    ("unet 64x64", (2, 4096, 2 * 1280)),
    ("unet 32x32", (2, 1024, 2 * 2560)),
    ("unet 16x16", (2, 256, 2 * 5120)),
    ("unet 8x8", (2, 64, 2 * 5120)),
]

# (name, shape, shortcut): ResnetBlock2D outputs of the UNet (batch 2, channels_last): conv2's bias,
# the residual, conv_shortcut's bias where the block changes channels, / output_scale_factor
BIAS_RESIDUAL = [
    ("unet resnet 64x64", (2, 320, 64, 64), False),
    ("unet resnet 32x32", (2, 640, 32, 32), True),
    ("unet resnet 32x32", (2, 640, 32, 32), False),
    ("unet resnet 16x16", (2, 1280, 16, 16), True),
    ("unet resnet 16x16", (2, 1280, 16, 16), False),
    ("unet resnet 8x8", (2, 1280, 8, 8), False),
    ("unet up resnet 64x64", (2, 320, 64, 64), True),
]
