"""The SigLIP family (HF ``SiglipModel``): no CLS token, attention-pooling image head, text pooled at the
last position of a caption padded to the full context (64 tokens), as the model was trained."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from xclip.models.hf import HFDualEncoder
from xclip.core.transformer import Positions, UpperEncoder, attention


class SiglipAdapter(HFDualEncoder):
    family = "siglip"
    n_image_prefix = 0
    padding = "max_length"  # the text tower was trained on captions padded to its whole context

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    def _text_layers(self) -> Sequence[nn.Module]:
        return self.model.text_model.encoder.layers

    def _image_layers(self) -> Sequence[nn.Module]:
        return self.model.vision_model.encoder.layers

    def _attention_mask(self, mask: Tensor) -> Tensor:
        return torch.ones_like(mask)  # no padding mask: the padding tokens take part in attention

    def pooled_index(self, input_ids: Tensor) -> Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)

    def _text_positions(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Positions, Tensor, list[int]]:
        is_eos = input_ids == self.eos_token_id
        # first EOS; a caption cut at the context length may have none, then the last position stands in
        eos_index = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), input_ids.shape[1] - 1)
        # bidirectional attention without a padding mask: every position carries a contribution
        n_positions = [input_ids.shape[1]] * input_ids.shape[0]
        return Positions(mask=None, pooled_index=self.pooled_index(input_ids)), eos_index, n_positions

    def _text_embeddings(self, input_ids: Tensor) -> Tensor:
        return self.model.text_model.embeddings(input_ids=input_ids)

    def _image_embeddings(self, pixel_values: Tensor) -> Tensor:
        return self.model.vision_model.embeddings(pixel_values)

    def text_upper(self, layer: int) -> UpperEncoder:
        text = self.model.text_model
        return UpperEncoder(blocks=self.text_blocks[layer:], pooled_readout=nn.Sequential(text.final_layer_norm, text.head))

    def image_upper(self, layer: int) -> UpperEncoder:
        vision = self.model.vision_model
        return UpperEncoder(blocks=self.image_blocks[layer:], readout=AttentionPoolReadout(vision.post_layernorm, vision.head))

    def image_pooled_index(self, n_images: int) -> Tensor | None:
        return None

    @property
    def logit_bias(self) -> float:
        return float(self.model.logit_bias.detach())


class AttentionPoolReadout(nn.Module):
    """SigLIP's ``post_layernorm`` + multihead attention-pooling head, with AD-friendly attention."""

    def __init__(self, post_layernorm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.post_layernorm = post_layernorm
        self.head = head

    def forward(self, hidden: Tensor) -> Tensor:
        head = self.head
        mha = head.attention  # nn.MultiheadAttention with packed in-projection
        hidden = self.post_layernorm(hidden)
        width = hidden.shape[-1]
        w_q, w_k, w_v = mha.in_proj_weight.split(width)
        b_q, b_k, b_v = mha.in_proj_bias.split(width)
        n_heads = mha.num_heads

        def split(x: Tensor) -> Tensor:
            return x.reshape(*x.shape[:-1], n_heads, width // n_heads).transpose(-3, -2)

        probe = head.probe.expand(hidden.shape[0], -1, -1)
        pooled = attention(
            split(nn.functional.linear(probe, w_q, b_q)),
            split(nn.functional.linear(hidden, w_k, b_k)),
            split(nn.functional.linear(hidden, w_v, b_v)),
            None,
        )
        pooled = mha.out_proj(pooled.transpose(-3, -2).flatten(-2))
        pooled = pooled + head.mlp(head.layernorm(pooled))
        return pooled[:, 0]
