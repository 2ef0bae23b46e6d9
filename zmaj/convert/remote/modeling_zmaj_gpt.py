"""zmaj's GPT as a ``transformers`` model: the code an exported folder carries when GPT-2's classes cannot hold it.

``zmaj.convert.export`` copies this file beside ``config.json`` when a GPT uses a setting ``GPT2LMHeadModel``
lacks (rotary positions, RMSNorm, QK-norm, a logit soft-cap, value embeddings, U-net skips: the default
pre-training spec uses four), and names it in the config's ``auto_map``, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads the model, as the Hub's models with their own code load. It needs torch and ``transformers`` (4.57 or 5),
not zmaj (nor einops: heads are split with ``view`` and ``transpose``), and computes what
``zmaj.models.gpt.forward`` computes, written as modules in the style of ``transformers``' own models: tested
against zmaj to 1e-5 in float32, padded batches and ``generate`` with its key/value cache included
(``tests/integration/test_export.py``). Tensor names are zmaj's with the stacked layers unbound:
``blocks.0.attn.q.weight`` is layer 0 of zmaj's ``blocks.attn.q.weight``.

transformers 4 calls the key/value cache ``past_key_values`` and 5 calls it ``cache``; both are taken.
"""

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5 renamed the output's past_key_values to cache.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ZmajGPTConfig(PretrainedConfig):  # type: ignore[no-untyped-call]
    """zmaj's ``GPTConfig`` under its own field names; ``attribute_map`` gives transformers the names it reads."""

    model_type = "zmaj_gpt"
    attribute_map = {  # noqa: RUF012 (transformers' own class attribute)
        "num_hidden_layers": "n_layers",
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "context",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        context: int = 1024,
        d_model: int = 768,
        n_layers: int = 12,
        n_heads: int = 12,
        d_ff: int | None = None,
        positions: str = "learned",
        rope_base: float = 10_000.0,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        activation: str = "gelu_tanh",
        qk_norm: bool = False,
        bias: bool = True,
        logit_softcap: float | None = None,
        value_embeds: int = 0,
        unet_skips: bool = False,
        dropout: float = 0.0,
        init_std: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.context = context
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.d_ff = d_ff
        self.positions = positions
        self.rope_base = rope_base
        self.norm = norm
        self.norm_eps = norm_eps
        self.activation = activation
        self.qk_norm = qk_norm
        self.bias = bias
        self.logit_softcap = logit_softcap
        self.value_embeds = value_embeds
        self.unet_skips = unet_skips
        self.dropout = dropout
        self.init_std = init_std
        self.use_cache = use_cache  # in transformers 4's base config, not in 5's
        super().__init__(**kwargs)
        self.tie_word_embeddings = tie_word_embeddings  # after: transformers 4's __init__ sets its default


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # ReLU squared (Primer; the modded-nanogpt speedrun)
}


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, normalised in float32 at least, as zmaj's (and Llama's) is."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return F.rms_norm(wide, x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight


def norm(config: ZmajGPTConfig, size: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(size, config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the rotate-half layout: the plane (``x[i]``, ``x[i + head_dim / 2]``) turned by its angle."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def sinusoids(positions: Tensor, d_model: int) -> Tensor:
    """The original transformer's position encodings, sine and cosine interleaved."""
    exponents = torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)
    angles = positions.float()[..., None] * torch.exp(exponents * (-math.log(10_000.0) / d_model))
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class ResidualLinear(nn.Linear):
    """A projection that writes into the residual stream (attention's output, the MLP's down): GPT-2 initialises
    it with a smaller std."""


class Attention(nn.Module):
    def __init__(self, config: ZmajGPTConfig) -> None:
        super().__init__()
        d, self.n_heads = config.d_model, config.n_heads
        self.q, self.k, self.v = (nn.Linear(d, d, bias=config.bias) for _ in range(3))
        self.o = ResidualLinear(d, d, bias=config.bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # always RMSNorm, over each head, whatever the blocks' norm
            self.q_norm = RMSNorm(d // config.n_heads, config.norm_eps)
            self.k_norm = RMSNorm(d // config.n_heads, config.norm_eps)

    def forward(
        self,
        x: Tensor,
        angles: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        value_embedding: Tensor | None,
        cache: Cache | None,
        layer: int,
    ) -> Tensor:
        batch, seq, d = x.shape

        def heads(projected: Tensor) -> Tensor:
            return projected.view(batch, seq, self.n_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if value_embedding is not None:
            v = v + heads(value_embedding.to(v.device))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if angles is not None:
            q, k = rotate(q, *angles), rotate(k, *angles)
        if cache is not None:
            k, v = cache.update(k, v, layer)
        if mask is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        out: Tensor = self.o(attended.transpose(1, 2).reshape(batch, seq, d))
        return out


class MLP(nn.Module):
    def __init__(self, config: ZmajGPTConfig) -> None:
        super().__init__()
        d_ff = config.d_ff if config.d_ff is not None else 4 * config.d_model
        self.up = nn.Linear(config.d_model, d_ff, bias=config.bias)
        self.down = ResidualLinear(d_ff, config.d_model, bias=config.bias)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down(self.activation(self.up(x)))
        return out


class Block(nn.Module):
    """Pre-norm: attention, then the MLP, each added to the residual stream (dropout on what they add)."""

    def __init__(self, config: ZmajGPTConfig) -> None:
        super().__init__()
        self.attn_norm = norm(config, config.d_model)
        self.attn = Attention(config)
        self.mlp_norm = norm(config, config.d_model)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        angles: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        value_embedding: Tensor | None,
        cache: Cache | None,
        layer: int,
    ) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), angles, mask, value_embedding, cache, layer))
        out: Tensor = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return out


class SkipWeights(nn.Module):
    """The U-net skips' learned weights, one per first-half layer: a module of their own, so that the tensor is
    named ``unet_skips.weight`` as in zmaj and ``_init_weights`` finds it."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(count))


def value_table(layer: int, n_layers: int, count: int) -> int | None:
    """The value embedding table ``layer`` adds to its values: the first and the last ``count`` layers share the
    ``count`` tables in the same order; the layers between add none."""
    if layer < count:
        return layer
    if layer >= n_layers - count:
        return layer - (n_layers - count)
    return None


class ZmajGPTForCausalLM(PreTrainedModel, GenerationMixin):  # type: ignore[no-untyped-call]
    config_class = ZmajGPTConfig
    # Its loss is the mean over the batch it is given, so Trainer must divide it for gradient accumulation itself
    # (a forward with **kwargs reads to Trainer as one that sums over num_items_in_batch).
    accepts_loss_kwargs = False
    base_model_prefix = "zmaj_gpt"
    _no_split_modules = ["Block"]  # noqa: RUF012
    _supports_sdpa = True

    def __init__(self, config: ZmajGPTConfig) -> None:
        super().__init__(config)
        d, n = config.d_model, config.n_layers
        self.embed = nn.Embedding(config.vocab_size, d)
        if config.positions == "learned":
            self.positions = nn.Embedding(config.context, d)
        self.value_embeds = nn.ModuleList(
            nn.Embedding(config.vocab_size, d) for _ in range(config.value_embeds)
        )
        self.blocks = nn.ModuleList(Block(config) for _ in range(n))
        if config.unet_skips:
            self.unet_skips = SkipWeights(n // 2)
        self.final_norm = norm(config, d)
        if not config.tie_word_embeddings:  # tied, the embedding itself unembeds: no second matrix to tie
            self.unembed = nn.Linear(d, config.vocab_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()  # type: ignore[no-untyped-call]

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation, as zmaj's ``gpt.init``: a model built from a config trains as zmaj's would."""
        std = self.config.init_std
        if isinstance(module, ResidualLinear):  # the residual stream's variance then stays put with depth
            std /= math.sqrt(2 * self.config.n_layers)
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm | RMSNorm | SkipWeights):
            nn.init.ones_(module.weight)
        if isinstance(module, nn.LayerNorm) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        assert isinstance(value, nn.Embedding)
        self.embed = value

    def get_output_embeddings(self) -> nn.Module | None:
        """The unembedding where it is a matrix of its own; tied, the embedding unembeds and there is none."""
        return None if self.config.tie_word_embeddings else self.unembed

    def set_output_embeddings(self, value: nn.Module) -> None:
        assert isinstance(value, nn.Linear)
        self.unembed = value

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        if self.config.value_embeds:
            raise ValueError(
                "resize_token_embeddings: this model's value embedding tables are indexed by token too, and "
                "transformers resizes only the embedding and the unembedding"
            )
        resized: nn.Embedding = super().resize_token_embeddings(*args, **kwargs)
        return resized

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of every position (the last ``logits_to_keep`` where it is set), and with ``labels`` the mean
        next-token cross-entropy over those that are not -100, as transformers' causal models compute it.
        ``output_hidden_states`` gives each block's input, then the final norm's output."""
        config = self.config
        cache = cache if cache is not None else past_key_values
        if input_ids is None or inputs_embeds is not None:
            raise ValueError(
                "ZmajGPTForCausalLM reads token ids (value embeddings look them up): pass input_ids"
            )
        if output_attentions:
            raise ValueError("ZmajGPTForCausalLM attends through SDPA, which returns no attention weights")
        if getattr(cache, "is_compileable", False):
            raise ValueError(
                "ZmajGPTForCausalLM keeps keys and values in a DynamicCache only, not a static one"
            )
        if cache is None and (config.use_cache if use_cache is None else use_cache):
            cache = DynamicCache()
        batch, seq = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        # A token's position is the count of real tokens before it, as in zmaj's cached forward (cache_step).
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        elif position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, -1)
        mask = self._mask(attention_mask, batch, seq, past, input_ids.device)

        x = self.embed(input_ids)
        if config.positions == "learned":
            x = x + self.positions(position_ids)
        elif config.positions == "sinusoidal":
            x = x + sinusoids(position_ids, config.d_model).to(x.dtype)
        x = self.dropout(x)
        angles = None
        if config.positions == "rope":
            head_dim = config.d_model // config.n_heads
            exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=x.device).float() / head_dim
            turns = position_ids[..., None].float() * (1.0 / config.rope_base**exponents)
            angles = (turns.cos(), turns.sin())
        tables = [table(input_ids) for table in self.value_embeds]
        hidden: list[Tensor] = []
        outputs: list[Tensor] = []
        for layer, block in enumerate(self.blocks):
            mirror = config.n_layers - 1 - layer
            if (
                config.unet_skips and mirror < layer
            ):  # the second half takes the first half's outputs, mirrored
                x = x + self.unet_skips.weight[mirror].to(x) * outputs[mirror].to(x.device)
            table = value_table(layer, config.n_layers, config.value_embeds)
            hidden.append(x)
            x = block(x, angles, mask, None if table is None else tables[table], cache, layer)
            outputs.append(x)
        x = self.final_norm(x)
        hidden.append(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if config.tie_word_embeddings:
            logits = F.linear(x, self.embed.weight.to(x.device))
        else:
            logits = self.unembed(x)
        if config.logit_softcap is not None:
            logits = torch.tanh(logits / config.logit_softcap) * config.logit_softcap
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            **{_CACHE_FIELD: cache},  # type: ignore[arg-type]
        )

    @staticmethod
    def _mask(
        attention_mask: Tensor | None, batch: int, seq: int, past: int, device: torch.device
    ) -> Tensor | None:
        """Which keys each new token sees, ``[batch, seq, past + seq]``: itself and the real tokens before it;
        None where that is plain causal attention over the tokens given (SDPA's ``is_causal``, which GPU kernels
        run without a mask in memory).

        A padding query sees itself, so that its row of scores is never all masked (which SDPA answers with NaN).
        """
        if attention_mask is None and past == 0:
            return None
        keys = torch.arange(past + seq, device=device)
        queries = torch.arange(past, past + seq, device=device)[:, None]
        real = torch.ones(batch, past + seq, dtype=torch.bool, device=device)
        if attention_mask is not None:
            real = attention_mask[:, -(past + seq) :].bool()
        return (keys <= queries) & (real[:, None, :] | (keys == queries))
