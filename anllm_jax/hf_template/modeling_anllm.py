"""AnLLM (anchor-based LLM, Pang et al. 2024) for Hugging Face transformers: Llama weights whose attention follows the
anchor-based self-attention mask (AnSAN) and whose KV cache keeps only the anchors.

Written beside the weights by anllm-jax's HF export (`python -m anllm_jax.convert --to hf`); it imports only torch
and transformers. Load with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`; without
`trust_remote_code` transformers loads the same weights as a plain LlamaForCausalLM (full attention, full cache).

For query i and key j of one row, with seg(t) the number of anchors strictly before t and isA(t) whether token t is
an anchor (its id is in `config.anllm_anchor_ids`):

    allowed(i, j) = j <= i and neither is padding and (seg(j) == seg(i) or (isA(j) and not isA(i)))

After every forward, the cache keeps per row every anchor and the tokens after the last anchor: nothing a later
query could attend is dropped, and every entry keeps the rotary embedding of its true position, so cached
generation computes the same function as one forward over the whole row under the mask.
"""

from __future__ import annotations

import torch
from torch.nn import functional
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# transformers 5.2x names the cache `cache` in model outputs and inputs; earlier versions `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class AnchorCache(DynamicCache):
    """A DynamicCache that keeps, per row, only what a later query can attend under AnSAN.

    Besides each layer's keys and values [B, H, S, D] it holds per slot whether it is a real token (`valid`), an
    anchor (`anchor`) and its sentence (`seg`), and per row the anchors and tokens seen so far. Rows are padded to
    the longest row's kept entries (`valid` False on the padding).
    """

    def __init__(self, anchor_ids: torch.Tensor) -> None:
        super().__init__()
        self.anchor_ids = anchor_ids
        self.valid = self.anchor = self.seg = None  # [B, S]
        self.n_anchors = self.n_tokens = None  # [B]
        self.columns = 0  # columns fed, padding included: the length transformers' generate counts

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def crop(self, max_length: int) -> None:
        raise ValueError("the anchor cache drops entries as it goes and cannot be cropped (no assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for name in ("valid", "anchor", "seg", "n_anchors", "n_tokens"):
            setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.valid.device)))

    def queries(self, input_ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(anchor, seg, position) [B, T] of new tokens that continue each row."""
        B = input_ids.shape[0]
        start_anchors = self.n_anchors if self.n_anchors is not None else input_ids.new_zeros(B)
        start_tokens = self.n_tokens if self.n_tokens is not None else input_ids.new_zeros(B)
        anchor = torch.isin(input_ids, self.anchor_ids.to(input_ids.device)) & valid
        seg = start_anchors[:, None] + torch.cumsum(anchor, 1) - anchor.long()
        position = (start_tokens[:, None] + torch.cumsum(valid, 1) - 1).clamp(min=0)
        return anchor, seg, position

    def keys_info(self, anchor: torch.Tensor, seg: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(valid, anchor, seg) [B, S + T] of the cached slots followed by the new tokens."""
        if self.valid is None:
            return valid, anchor, seg
        return (torch.cat([self.valid, valid], 1), torch.cat([self.anchor, anchor], 1), torch.cat([self.seg, seg], 1))

    def advance(self, anchor: torch.Tensor, seg: torch.Tensor, valid: torch.Tensor) -> None:
        """Record the new tokens (their keys and values are already in the layers), then drop what no later query
        can attend: everything but the anchors and the tokens after the last anchor."""
        self.valid, self.anchor, self.seg = self.keys_info(anchor, seg, valid)
        self.n_anchors = (0 if self.n_anchors is None else self.n_anchors) + anchor.sum(1)
        self.n_tokens = (0 if self.n_tokens is None else self.n_tokens) + valid.sum(1)
        self.columns += anchor.shape[1]
        keep = self.valid & (self.anchor | (self.seg == self.n_anchors[:, None]))
        if bool((self.valid & ~keep).any()):
            self._compact(keep)

    def _compact(self, keep: torch.Tensor) -> None:
        # A stable sort of "not kept" moves the kept slots to the front of each row, in order.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        n_kept = keep.sum(1)
        idx = order[:, : int(n_kept.max())]
        self.valid = torch.arange(idx.shape[1], device=idx.device)[None, :] < n_kept[:, None]
        self.anchor = torch.gather(self.anchor, 1, idx) & self.valid
        self.seg = torch.gather(self.seg, 1, idx)
        for layer in self.layers:
            at = idx[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = torch.gather(layer.keys, 2, at), torch.gather(layer.values, 2, at)

    def stats(self) -> dict[str, int | float]:
        """Entries kept (summed over rows) against a full cache of the same tokens, and their bytes."""
        kept, full = int(self.valid.sum()), int(self.n_tokens.sum())
        keys = self.layers[0].keys
        per = 2 * len(self.layers) * keys.shape[1] * keys.shape[3] * keys.element_size()
        return {
            "cache_entries": kept,
            "full_cache_entries": full,
            "cache_bytes": kept * per,
            "full_cache_bytes": full * per,
            "reduction": 1.0 - kept / full if full else 0.0,
        }


class AnLLMForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM under the AnSAN mask, with the anchor cache for generation (`AnchorCache`).

    The attention is computed here (scaled-dot-product with the mask as an additive bias), so the model's
    `attn_implementation` setting is not used. Inputs must be token ids (anchors are ids); `attention_mask` is the
    usual 2-D padding mask (left or right padding).
    """

    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def anchor_ids(self) -> torch.Tensor:
        return torch.tensor(list(getattr(self.config, "anllm_anchor_ids", ())), dtype=torch.long)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: AnchorCache | None = None,
        past_key_values: AnchorCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("AnLLM needs input_ids (its anchors are token ids), not inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("AnLLM builds its own attention mask; pass the 2-D padding mask")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, AnchorCache):
            if cache.get_seq_length() > 0:
                raise ValueError("AnLLM generates with its own anchor cache; pass no cache or an AnchorCache")
            cache = None
        if use_cache and cache is None:
            cache = AnchorCache(self.anchor_ids())
        state = cache if cache is not None else AnchorCache(self.anchor_ids())
        B, T = input_ids.shape
        valid = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is not None:
            valid = attention_mask[:, -T:].bool()
        anchor, seg, position = state.queries(input_ids, valid)
        position_ids = position if position_ids is None else position_ids
        bias = self._mask_bias(state, anchor, seg, valid)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(h, position_ids)
        for i, layer in enumerate(self.model.layers[: self.config.num_hidden_layers]):
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), cos, sin, bias, cache, i)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if cache is not None:
            cache.advance(anchor, seg, valid)
        h = self.model.norm(h)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

    def _mask_bias(self, state: AnchorCache, anchor: torch.Tensor, seg: torch.Tensor, valid: torch.Tensor):
        """Additive bias [B, 1, T, S + T]: 0 where AnSAN allows query i to attend key j, the dtype's minimum
        elsewhere (finite, so a padding query's row stays finite)."""
        k_valid, k_anchor, k_seg = state.keys_info(anchor, seg, valid)
        T, S = anchor.shape[1], k_valid.shape[1] - anchor.shape[1]
        causal = torch.ones(T, S + T, dtype=torch.bool, device=anchor.device).tril(S)
        same = k_seg[:, None, :] == seg[:, :, None]
        earlier_anchor = k_anchor[:, None, :] & ~anchor[:, :, None]
        allowed = causal & valid[:, :, None] & k_valid[:, None, :] & (same | earlier_anchor)
        dtype = self.model.embed_tokens.weight.dtype
        bias = torch.zeros(allowed.shape, dtype=dtype, device=anchor.device)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def _attention(self, attn, x, cos, sin, bias, cache: AnchorCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        shape = (B, T, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, layer)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        dropout = attn.attention_dropout if self.training else 0.0
        o = functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scaling)
        return attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
