"""bench_e2e.py's --tome rows: ToMe (token merging, the `tomesd` package 0.1.3) on eager and
the stages systems, in exact mode and with the --tome-skipping settings, timed as the exact
row and compared with the same system without ToMe on the same seed."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import traceback

from e2e_systems import psnr, rel_l2, setting_key, skipping_label, timings  # benchmarks/, the script's own folder

TOMESD_VERSION = "0.1.3"  # tome_applied sets its `_tome_info["size"]`, an internal of this version


def tome_unet(system):
    """The UNet2DConditionModel that tomesd patches, or None where it cannot (torch.compile'd)."""
    unet = system.engine.unet.unet if hasattr(system, "engine") else system.pipe.unet
    return None if hasattr(unet, "_orig_mod") else unet


@contextlib.contextmanager
def tome_applied(system, ratio: float, size: int):
    """ToMe on the system's UNet for the duration: tomesd 0.1.3's apply_patch with its defaults
    (merge in self-attention only, max_downsample 1, sx = sy = 2) and use_rand=False (no random
    dst choice: the same merge on every run). A stages system's captured loops are set aside,
    so every loop of a ToMe row is captured (and its per-shape dispatch timed) with ToMe on;
    afterwards the patch is removed and the exact loops put back."""
    import tomesd

    unet = tome_unet(system)
    tomesd.apply_patch(unet, ratio=ratio, use_rand=False)
    # tomesd reads the latent size that a forward pre-hook on the UNet records; DeepCache's
    # steps call the UNet's blocks, never its forward, so the hook would not run there
    scale = system.engine.unet.vae_scale if hasattr(system, "engine") else system.pipe.vae_scale_factor
    unet._tome_info["size"] = (size // scale, size // scale)
    graphs = system.engine.unet.graphs if hasattr(system, "engine") else None
    exact_loops = None
    if graphs is not None:
        exact_loops, graphs.loops = graphs.loops, {}
    try:
        yield
    finally:
        tomesd.remove_patch(unet)
        if graphs is not None:
            graphs.loops = exact_loops


def tome_rows(name: str, system, args, reference, own: dict, eager_tome: dict) -> list[dict]:
    """The --tome rows of one system: each ratio in exact mode and, on stages systems, with each
    --tome-skipping setting; timed as the exact row, with their distance from this system
    without ToMe (exact mode, and the same skipping setting alone), same seed. Eager's ToMe
    latents go into `eager_tome` (ratio -> latents); other systems report their distance from them."""
    if tome_unet(system) is None:
        print(f"--- {name}: no ToMe rows (a torch.compile'd UNet: tomesd's class swap needs a re-trace)", flush=True)
        return []
    stages = hasattr(system, "capture")
    settings = [{}] + (args.tome_skipping if stages else [])
    rows = []
    try:
        for setting in settings:  # the no-ToMe latents of each setting, before the patch
            if setting_key(setting) not in own:
                own[setting_key(setting)] = system.latents(seed=1, **setting)
        for ratio in args.tome:
            with tome_applied(system, ratio, args.size):
                rows += [tome_row(name, system, args, reference, own, eager_tome, ratio, setting) for setting in settings]
    except Exception as err:  # noqa: BLE001 - ToMe failing must not lose the system's exact and skipping rows
        traceback.print_exc()
        rows.append({"system": f"{name} tome", "error": f"{type(err).__name__}: {err}"[:2000]})
    return rows


def tome_row(name: str, system, args, reference, own: dict, eager_tome: dict, ratio: float, setting: dict) -> dict:
    label = " ".join(filter(None, [name, f"tome {ratio}", skipping_label(setting)]))
    print(f"--- {label}", flush=True)
    try:
        row = {"system": label, "tome_ratio": ratio, "skipping": setting}
        row["capture_s"] = system.capture(args.batch, **setting) if hasattr(system, "capture") else None
        row |= timings(system, args, **setting)
        latents = system.latents(seed=1, **setting)
        exact = own[()]
        row["latents_rel_l2_vs_exact"] = rel_l2(latents, exact)
        image = system.decode(latents)
        row["image_psnr_vs_exact_db"] = psnr(image, system.decode(exact))
        if setting:  # what ToMe adds on top of the skipping setting alone
            alone = own[setting_key(setting)]
            row["latents_rel_l2_vs_same_skipping"] = rel_l2(latents, alone)
            row["image_psnr_vs_same_skipping_db"] = psnr(image, system.decode(alone))
        if reference is not None:
            row["latents_rel_l2_vs_eager_fp16"] = rel_l2(latents, reference["latents"])
            if not setting and ratio in eager_tome:  # does ToMe on this path compute what diffusers + tomesd does?
                row["latents_rel_l2_vs_eager_same_tome"] = rel_l2(latents, eager_tome[ratio])
        elif name == "eager":  # eager is the reference: its exact latents are eager fp16's
            row["latents_rel_l2_vs_eager_fp16"] = row["latents_rel_l2_vs_exact"]
            eager_tome[ratio] = latents
    except Exception as err:  # noqa: BLE001 - one setting failing must not lose the others
        traceback.print_exc()
        row = {"system": label, "error": f"{type(err).__name__}: {err}"[:2000]}
    print(json.dumps(row), flush=True)
    return row


def parse_ratios(text: str) -> list[float]:
    ratios = []
    for item in filter(None, text.split(",")):
        try:
            ratio = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a ToMe ratio (e.g. 0.5)") from None
        if not 0.0 < ratio <= 0.75:  # tomesd: at most 1 - 1/(sx*sy) of the tokens, 0.75 at its sx = sy = 2
            raise argparse.ArgumentTypeError(f"{item!r}: a ToMe ratio is above 0 and at most 0.75")
        ratios.append(ratio)
    return ratios


def check_tomesd() -> str:
    """tomesd's version, before any GPU time is spent; SystemExit where it is missing or another."""
    try:
        version = importlib.metadata.version("tomesd")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"--tome needs tomesd=={TOMESD_VERSION} (pip install tomesd=={TOMESD_VERSION}; on the offline GPU host, "
            f"in the wheelhouse: ../shared/gpu-host/make_wheelhouse.sh .whl tomesd=={TOMESD_VERSION})"
        ) from None
    if version != TOMESD_VERSION:
        raise SystemExit(f"--tome: tomesd {version} is installed; this benchmark reads internals of {TOMESD_VERSION}")
    return version
