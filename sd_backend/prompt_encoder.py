"""Prompts to the UNet's text conditioning, as diffusers' pipelines encode them.

SD 1.x/2.x: one CLIP text model, its last hidden state (77, width). SDXL: two (CLIP ViT-L
and OpenCLIP bigG with a projection), each one's penultimate hidden state side by side
(77, 768 + 1280) and the second one's projected pooled embedding (1280,)
(`StableDiffusionXLPipeline.encode_prompt` with clip_skip None).
"""

from __future__ import annotations

from typing import Any, Sequence

from .family import ModelFamily


class PromptEncoder:
    def __init__(self, encoders: Sequence[tuple[Any, Any]], family: ModelFamily):
        self.encoders = list(encoders)  # (tokenizer, text model) in diffusers' order
        self.family = family

    @property
    def max_tokens(self) -> int:
        return self.encoders[0][0].model_max_length

    def dropped_tokens(self, prompt: str) -> int:
        """Tokens past the 77-token limit that truncation removes (diffusers warns of the same)."""
        tokenizer = self.encoders[0][0]
        return max(0, len(tokenizer(prompt, truncation=False).input_ids) - tokenizer.model_max_length)

    def __call__(self, texts: Sequence[str]):
        """(embeds (n, 77, width), pooled (n, pooled width)) of `texts`. The pooled embedding
        is SDXL's text_embeds; for SD 1.x/2.x, CLIP's pooler output (the UNet does not use it)."""
        import torch

        hidden, pooled = [], None
        with torch.inference_mode():
            for tokenizer, model in self.encoders:
                ids = tokenizer(
                    list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
                ).input_ids.to(model.device)
                if not self.family.is_sdxl:
                    out = model(ids)
                    return out[0], out[1]
                projection = getattr(model, "text_projection", None)
                if projection is None:
                    hidden.append(model(ids, output_hidden_states=True).hidden_states[-2])
                    continue
                # CLIPTextModelWithProjection.forward, with its projection taken one prompt at a time:
                # diffusers encodes each prompt alone, and a (1, d) product rounds unlike an (n, d) one
                out = model.text_model(ids, output_hidden_states=True)
                if pooled is None:  # the projected model's text_embeds, as diffusers picks it
                    pooled = torch.cat([projection(row[None]) for row in out.pooler_output])
                hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled
