"""The Multimodal mixture of Encoder-Decoder (MED): one BERT-style text transformer, three functionalities.

- unimodal text encoder: ``[CLS]`` first, bidirectional self-attention, no cross-attention;
- image-grounded text encoder: ``[ENC]`` first, cross-attention to the image tokens between the
  self-attention and the feed-forward block of every layer;
- image-grounded text decoder: ``[DEC]`` first, causal self-attention, cross-attention, LM head.

Encoder and decoder are two stacks of layers whose sub-modules are shared according to
``BlipConfig.sharing`` (the paper's Table 3): sharing is by module identity, so a shared weight is one
tensor whatever name reaches it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import TextConfig


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_positions, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        n, limit = past_length + input_ids.shape[1], self.position.num_embeddings
        if n > limit:
            raise ValueError(
                f"{n} token positions exceed text.max_positions ({limit}): use shorter texts or a smaller max_length"
            )
        pos = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.norm(self.word(input_ids) + self.position(pos)))


class Attention(nn.Module):
    """Multi-head attention with BERT's post-norm residual; self-attention when ``context`` is None."""

    def __init__(self, width: int, heads: int, context_width: int, eps: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(context_width, width)
        self.v = nn.Linear(context_width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context (the image tokens), computed once and reused for every step/beam."""
        return self.split(self.k(context)), self.split(self.v(context))

    def forward(self, x: torch.Tensor, mask=None, kv=None, past=None):
        """``attend``, then BERT's residual and LayerNorm."""
        h, new_past = self.attend(x, mask, kv, past)
        return self.norm(h + x), new_past

    def attend(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The attention branch before the residual and LayerNorm (NLVR2 merges two of them first). ``kv``:
        precomputed context keys/values [B', H, N, d] where B' divides B (beams share an image), or the raw context
        tokens [B', N, D] for ``attend_unprojected``. ``past``: cached self-attention keys/values; the new ones are
        returned for the next step."""
        b, t, w = x.shape
        q = self.split(self.q(x))
        new_past = None
        if isinstance(kv, torch.Tensor):
            return F.dropout(
                self.out(self.attend_unprojected(q, kv, mask).transpose(1, 2).reshape(b, t, w)),
                self.dropout,
                self.training,
            ), None
        if kv is None:
            k, v = self.split(self.k(x)), self.split(self.v(x))
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            new_past = (k, v)
        else:
            k, v = kv
        drop = self.dropout if self.training else 0.0
        groups = b // k.shape[0]
        if groups > 1:
            # Several sequences (beams, samples) attend to one image: fold them into the query axis so the
            # image's keys and values are never copied per sequence. A context mask is per image ([B', 1, 1, N]),
            # so it broadcasts over the folded queries.
            assert mask is None or (mask.shape[0] == k.shape[0] and mask.shape[2] == 1), "mask must be [B', 1, 1, N]"
            qf = (
                q.view(k.shape[0], groups, self.heads, t, -1)
                .transpose(1, 2)
                .reshape(k.shape[0], self.heads, groups * t, -1)
            )
            ctx = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, dropout_p=drop)
            ctx = ctx.view(k.shape[0], self.heads, groups, t, -1).transpose(1, 2).reshape(b, self.heads, t, -1)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        ctx = ctx.transpose(1, 2).reshape(b, t, w)
        return F.dropout(self.out(ctx), self.dropout, self.training), new_past

    def unprojected_is_cheaper(self, queries: int, context_tokens: int, context_width: int) -> bool:
        """Whether ``attend_unprojected`` costs fewer multiply-adds than projecting the context's keys and values
        (it does when few queries meet many context tokens: an ITM text against an image's 197 tokens)."""
        w, n = self.q.out_features, context_tokens
        unprojected = 2 * self.heads * queries * context_width * n + 2 * queries * w * context_width
        projected = 2 * n * context_width * w + 2 * queries * w * n
        return unprojected < 0.7 * projected  # the unprojected path's batched matmuls run further below the peak

    def attend_unprojected(self, q: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of queries [B, H, T, d] to raw context tokens [B', N, D] (B' divides B), without projecting the
        context: q·(W_k c) = (W_kᵀ q)·c per head, the key bias adds a constant per query row (softmax ignores it),
        and since each row of P sums to 1, P(W_v c + b_v) = W_v (P c) + b_v. Exact up to float rounding; inference
        only (attention dropout would break the row sums). Returns [B, H, T, d]."""
        b, h, t, d = q.shape
        bc, n, dc = context.shape
        g = b // bc  # several texts per context fold into the query axis, as in ``attend``
        q = q.view(bc, g, h, t, d).transpose(1, 2).reshape(bc, h, g * t, d)
        wk = self.k.weight.view(h, d, dc)
        wv = self.v.weight.view(h, d, dc)
        qk = torch.einsum("bhtd,hdc->bhtc", q * d**-0.5, wk).reshape(bc, h * g * t, dc)
        scores = torch.bmm(qk, context.transpose(1, 2)).view(bc, h, g * t, n)
        if mask is not None:
            scores = scores + mask
        pc = torch.bmm(scores.softmax(-1).view(bc, h * g * t, n), context).view(bc, h, g * t, dc)
        ctx = torch.einsum("bhtc,hdc->bhtd", pc, wv) + self.v.bias.view(1, h, 1, d)
        return ctx.view(bc, h, g, t, d).transpose(1, 2).reshape(b, h, t, d)


class FeedForward(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.fc2(F.gelu(self.fc1(x))), self.dropout, self.training)
        return self.norm(h + x)


class TextLayer(nn.Module):
    def __init__(self, cfg: TextConfig, vision_width: int):
        super().__init__()
        self.self_attn = Attention(cfg.width, cfg.heads, cfg.width, cfg.layer_norm_eps, cfg.dropout)
        self.cross_attn = Attention(cfg.width, cfg.heads, vision_width, cfg.layer_norm_eps, cfg.dropout)
        self.ffn = FeedForward(cfg)

    def forward(self, x, self_mask, image_kv=None, image_mask=None, past=None):
        x, new_past = self.self_attn(x, mask=self_mask, past=past)
        if image_kv is not None:
            x, _ = self.cross_attn(x, mask=image_mask, kv=image_kv)
        return self.ffn(x), new_past


class LMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.width, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


def padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, T] 1/0 mask -> additive [B, 1, 1, T] mask, or None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class MED(nn.Module):
    def __init__(self, cfg: TextConfig, vision_width: int, sharing: str):
        super().__init__()
        self.cfg = cfg
        self.sharing = sharing
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = nn.ModuleList(TextLayer(cfg, vision_width) for _ in range(cfg.depth))
        self.decoder = nn.ModuleList(TextLayer(cfg, vision_width) for _ in range(cfg.depth))
        self.decoder_embeddings = TextEmbeddings(cfg) if sharing == "none" else self.embeddings
        for enc, dec in zip(self.encoder, self.decoder):
            if sharing in ("all", "all_but_ca"):
                dec.self_attn = enc.self_attn
            if sharing in ("all", "all_but_sa"):
                dec.cross_attn = enc.cross_attn
            if sharing != "none":
                dec.ffn = enc.ffn
        self.lm_head = LMHead(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.decoder.weight = self.decoder_embeddings.word.weight

    # --- encoders -------------------------------------------------------------------------------
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bidirectional encoder; grounded in the image when ``image_embeds`` is given."""
        x = self.embeddings(input_ids)
        mask = padding_mask(attention_mask, x.dtype)
        img_mask = padding_mask(image_mask, x.dtype)
        # One-shot cross-attention (each layer's image keys/values used once): skip projecting the image tokens when
        # that is cheaper. Every layer has the same shapes, so the first one decides.
        unprojected = (
            image_embeds is not None
            and not self.training
            and self.encoder[0].cross_attn.unprojected_is_cheaper(
                input_ids.shape[0] // image_embeds.shape[0] * input_ids.shape[1], *image_embeds.shape[1:]
            )
        )
        for layer in self.encoder:
            if image_embeds is None or unprojected:  # the raw image tokens: attend_unprojected
                kv = image_embeds
            else:
                kv = layer.cross_attn.context_kv(image_embeds)
            x = self._run(layer, x, mask, kv, img_mask)
        return x

    def decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal decoder over a whole sequence (training, scoring); returns LM logits [B, T, V]. ``image_embeds``
        may have fewer rows than ``input_ids`` (B = B' * k, k consecutive sequences per context); ``image_mask``
        is then [B', N]."""
        x = self.decoder_embeddings(input_ids)
        t = input_ids.shape[1]
        causal = torch.full((t, t), torch.finfo(x.dtype).min, device=x.device, dtype=x.dtype).triu(1)[None, None]
        pad = padding_mask(attention_mask, x.dtype)
        mask = causal if pad is None else causal + pad
        img_mask = padding_mask(image_mask, x.dtype)
        for layer in self.decoder:
            x = self._run(layer, x, mask, layer.cross_attn.context_kv(image_embeds), img_mask)
        return self.lm_head(x)

    def _run(self, layer, x, mask, kv, img_mask):
        if self.cfg.grad_checkpointing and self.training:
            return checkpoint(lambda *a: layer(*a)[0], x, mask, kv, img_mask, use_reentrant=False)
        return layer(x, mask, kv, img_mask)[0]

    # --- incremental decoding (generation) -------------------------------------------------------
    def image_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.cross_attn.context_kv(image_embeds) for layer in self.decoder]

    def decode_step(
        self,
        input_ids: torch.Tensor,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]],
        past: list[tuple[torch.Tensor, torch.Tensor]] | None,
        context_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Feed new tokens [B, t] given the cache; returns logits of the last position and the new cache.
        Sequences are never padded during generation (all start with the same prompt), so no mask is needed
        beyond causality inside the new tokens. ``context_mask``: a [B', N] 1/0 mask of the context (padded
        question tokens when VQA's answer decoder attends to the question encoder)."""
        past_len = 0 if past is None else past[0][0].shape[2]
        x = self.decoder_embeddings(input_ids, past_length=past_len)
        t = input_ids.shape[1]
        mask = None
        if t > 1:
            full = torch.full((t, past_len + t), torch.finfo(x.dtype).min, device=x.device, dtype=x.dtype)
            mask = full.triu(past_len + 1)[None, None]
        ctx_mask = padding_mask(context_mask, x.dtype)
        new_past = []
        for i, layer in enumerate(self.decoder):
            x, p = layer(x, mask, image_kv[i], ctx_mask, None if past is None else past[i])
            new_past.append(p)
        return self.lm_head(x[:, -1]), new_past

    # --- one stack as a model of its own (the downstream heads) ----------------------------------
    def stack_state(self, stack: str) -> dict[str, torch.Tensor]:
        """The state of the ``encoder`` or ``decoder`` stack as the state dict of a ``sharing="all"`` MED (whose
        two stacks are one): VQA's question encoder and answer decoder, NLVR2's encoder start from these."""
        if stack not in ("encoder", "decoder"):
            raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")
        emb = self.embeddings if stack == "encoder" else self.decoder_embeddings
        out = {f"{name}.{k}": v for k, v in emb.state_dict().items() for name in ("embeddings", "decoder_embeddings")}
        for i, layer in enumerate(getattr(self, stack)):
            for k, v in layer.state_dict().items():
                out[f"encoder.{i}.{k}"] = out[f"decoder.{i}.{k}"] = v
        out.update({f"lm_head.{k}": v for k, v in self.lm_head.state_dict().items()})
        if (
            self.cfg.tie_word_embeddings
        ):  # the LM head reads this stack's own embeddings (they differ with sharing="none")
            out["lm_head.decoder.weight"] = emb.word.weight
        return out
