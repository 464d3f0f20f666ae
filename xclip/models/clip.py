"""The CLIP family (HF ``CLIPModel``): CLS-pooled vision tower, causal text tower pooled at EOS."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from xclip.models.hf import HFDualEncoder
from xclip.core.transformer import Positions, UpperEncoder


class ClipAdapter(HFDualEncoder):
    family = "clip"
    n_image_prefix = 1  # CLS

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def _text_layers(self) -> Sequence[nn.Module]:
        return self.model.text_model.encoder.layers

    def _image_layers(self) -> Sequence[nn.Module]:
        return self.model.vision_model.encoder.layers

    def pooled_index(self, input_ids: Tensor) -> Tensor:
        eos = self.model.config.text_config.eos_token_id
        if eos == 2:  # legacy configs: HF pools at the largest id, which is EOS in CLIP's vocabulary
            return input_ids.argmax(dim=-1)
        return (input_ids == eos).int().argmax(dim=-1)

    def _text_positions(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Positions, Tensor, list[int]]:
        n_tokens = input_ids.shape[1]
        causal = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=input_ids.device).tril()
        mask = (causal[None] & attention_mask.bool()[:, None, :])[:, None]  # (B, 1, S, S)
        eos_index = self.pooled_index(input_ids)
        # causal attention: tokens after EOS cannot reach the pooled state, their contributions are 0
        n_positions = (eos_index + 1).tolist()
        return Positions(mask=mask, pooled_index=eos_index), eos_index, n_positions

    def _text_embeddings(self, input_ids: Tensor) -> Tensor:
        return self.model.text_model.embeddings(input_ids=input_ids)

    def _image_embeddings(self, pixel_values: Tensor) -> Tensor:
        vision = self.model.vision_model
        return vision.pre_layrnorm(vision.embeddings(pixel_values))

    def text_upper(self, layer: int) -> UpperEncoder:
        readout = nn.Sequential(self.model.text_model.final_layer_norm, self.model.text_projection)
        return UpperEncoder(blocks=self.text_blocks[layer:], pooled_readout=readout)

    def image_upper(self, layer: int) -> UpperEncoder:
        readout = nn.Sequential(self.model.vision_model.post_layernorm, self.model.visual_projection)
        return UpperEncoder(blocks=self.image_blocks[layer:], pooled_readout=readout)

    def image_pooled_index(self, n_images: int) -> Tensor:
        return torch.zeros(n_images, dtype=torch.long, device=self.device)
