"""Hugging Face checkpoint folders (``config.json`` plus safetensors) to zmaj configs and parameters, and back.

A folder written by ``save_pretrained`` or downloaded from the Hub is read directly, without instantiating
``transformers``: ``config.json`` picks the architecture by its ``model_type``, and the weights are read one tensor
at a time from ``model.safetensors`` or from the shards that ``model.safetensors.index.json`` lists (format:
https://huggingface.co/docs/safetensors). Every Hugging Face name lives in this file, in ``gpt2.py`` and in
``zmaj_gpt.py`` (a GPT that GPT-2 cannot express, exported with zmaj's code for it), and each table is read in
both directions: ``config_to_hf`` and ``params_to_hf`` are what ``zmaj.convert.export`` writes.

The Llama family (Llama, Qwen 2, Qwen 3) needs no reshaping: ``transformers`` stores ``nn.Linear`` weights
``[out, in]`` as zmaj does, and its q/k rows are already in the rotate-half order of ``zmaj.nn.rope``. So its
table is a plain rename, each per-layer row stacked over layers. So is Gemma 3's (``gemma3_text``), whose only
trap is a name: its ``post_attention_layernorm`` is the norm *after* attention, where Llama's is the one before
the MLP (Gemma's is ``pre_feedforward_layernorm``). Gemma 2 (``gemma2``) has Gemma 3's names, less the q/k norms.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors import SafetensorError, safe_open
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj import fileio
from zmaj.convert import gpt2, zmaj_gpt
from zmaj.convert.layers import stack_layers
from zmaj.models import gemma3, gpt, llama
from zmaj.models.gemma3 import Gemma3Config
from zmaj.models.gpt import GPTConfig
from zmaj.models.llama import LlamaConfig
from zmaj.nn.layers import Activation
from zmaj.nn.rope import FrequencyFactors, LinearScaling, Llama3Scaling
from zmaj.text import read_json

ModelConfig = GPTConfig | LlamaConfig | Gemma3Config

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
SUPPORTED_MODEL_TYPES = ("gpt2", *LLAMA_FAMILY, "gemma2", "gemma3_text", "gemma3", zmaj_gpt.MODEL_TYPE)

# (zmaj key, checkpoint name with {i} for the layer); per-layer rows are stacked over layers. A row is read only
# when the config's parameters have its key, so biases, QK-norms and the unembedding follow the config.
LLAMA_LAYER_TABLE: list[tuple[str, str]] = [
    ("attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("attn.q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("attn.k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("attn.v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("attn.q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("attn.k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("attn.v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("attn.o.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("mlp.gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("mlp.up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("mlp.down.weight", "model.layers.{i}.mlp.down_proj.weight"),
]
LLAMA_GLOBAL_TABLE: list[tuple[str, str]] = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("final_norm.weight", "model.norm.weight"),
    ("unembed.weight", "lm_head.weight"),
]
GEMMA3_LAYER_TABLE: list[tuple[str, str]] = [
    ("attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("attn.q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("attn.k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("attn.v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("attn.o.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("attn_post_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("mlp_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight"),
    ("mlp.gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("mlp.up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("mlp.down.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("mlp_post_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight"),
]
GEMMA3_GLOBAL_TABLE: list[tuple[str, str]] = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("final_norm.weight", "model.norm.weight"),
    ("unembed.weight", "lm_head.weight"),
]

_ACTIVATIONS: dict[str, Activation] = {
    "silu": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "relu2": "relu2",
}
_HF_ACTIVATIONS: dict[Activation, str] = {act: name for name, act in _ACTIVATIONS.items()}
_DEFAULT_CONTEXT = {
    "llama": 2048,
    "mistral": 131_072,
    "qwen2": 32_768,
    "qwen3": 32_768,
    "smollm3": 32_768,
    "gemma2": 8192,
    "gemma3_text": 131_072,
}
"""``max_position_embeddings`` of each model type's ``transformers`` config class, for a config without it."""
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
"""The ``transformers`` class (``config.json``'s ``architectures``) of each model type written here."""
BIASED_MLP = ("llama", "smollm3")
"""The Llama-family model types whose ``transformers`` model reads ``mlp_bias`` (biases on the MLP)."""
BIASED_ATTENTION = ("llama", "qwen3", "smollm3")
"""Those that read ``attention_bias`` (biases on q, k, v and the output projection)."""
WHOLE_HEADS = ("llama", "gemma2", "gemma3_text")
"""The model types whose ``transformers`` config refuses a ``hidden_size`` not divisible by the head count (its
``validate_architecture``), though their ``head_dim`` is set apart from it."""


GEMMA3_TEXT_SIZES = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
}
"""Gemma3TextConfig's sizes, where a multimodal Gemma 3's ``text_config`` leaves them out (4B's lists its width,
depth and MLP width alone); the rest are the defaults a ``gemma3_text`` config takes too."""
LANGUAGE_MODEL = {
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
    "lm_head.": "lm_head.",
}
"""Where a multimodal Gemma 3 checkpoint keeps its language model's tensors (as published, and as transformers 5
names them in memory), by the prefix a text-only checkpoint gives them; its vision tower and projector are not
read."""


def load_hf(path: str | Path, device: torch.device | str = "cpu") -> tuple[ModelConfig, TensorDict]:
    """The config and parameters of the Hugging Face checkpoint folder at ``path``; of a multimodal Gemma 3
    (``Gemma3ForConditionalGeneration``), its language model, which on text computes what it computes."""
    folder = Path(path)
    raw = read_json(folder / "config.json")
    config = config_from_hf(raw, str(folder / "config.json"))
    multimodal = isinstance(raw, Mapping) and raw.get("model_type") == "gemma3"
    with ExitStack() as files:
        tensors = _SafetensorsFolder(folder, files, device, LANGUAGE_MODEL if multimodal else None)
        config = _untied_where_stored(config, tensors, folder)
        if isinstance(config, GPTConfig):
            own_code = isinstance(raw, Mapping) and raw.get("model_type") == zmaj_gpt.MODEL_TYPE
            params = (zmaj_gpt if own_code else gpt2).params_from_hf(tensors, config)
            _check_shapes(params, gpt.init(config, 0, device="meta"))
        else:
            params = params_from_hf(tensors, config)
    declared = raw.get("dtype", raw.get("torch_dtype")) if isinstance(raw, Mapping) else None
    return config, _one_dtype(params, declared, folder)


def _untied_where_stored(config: ModelConfig, tensors: Mapping[str, Tensor], folder: Path) -> ModelConfig:
    """``config``, untied where the checkpoint stores an unembedding of its own that differs from its embedding.

    ``transformers`` ties the two only where the checkpoint does not hold two different matrices
    (``PreTrainedModel.tie_weights``: the config is then taken to be wrong), so such a checkpoint computes with the
    stored ``lm_head.weight``; reading it tied would drop that matrix and give other logits."""
    names = ("model.embed_tokens.weight", gpt2.PREFIX + "wte.weight", "wte.weight")
    embed = next((name for name in names if name in tensors), None)
    if not config.tie_embeddings or embed is None or "lm_head.weight" not in tensors:
        return config
    if torch.equal(tensors["lm_head.weight"], tensors[embed]):
        return config
    logger.warning(
        f"{folder}: config.json ties the unembedding to the embedding, but the checkpoint stores a different "
        "lm_head.weight; read untied, as transformers reads it"
    )
    return config.model_copy(update={"tie_embeddings": False})


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a Hugging Face ``config.json`` names (``dtype``), and that the export programs write, by name."""


def _one_dtype(params: TensorDict, declared: object, folder: Path) -> TensorDict:
    """``params`` in one floating dtype: a checkpoint that stores some tensors in another (float32 norms beside
    bfloat16 matrices) is cast to ``config.json``'s ``dtype``, as ``transformers`` loads it, rather than failing
    at the first matmul of two dtypes. Without one, to the widest stored, which loses nothing: ``transformers``
    (``dtype="auto"``) takes the first floating tensor's type instead, so its logits may then be the narrower
    type's."""
    stored = {t.dtype for t in params.values(True, True) if isinstance(t, Tensor) and t.is_floating_point()}
    if len(stored) <= 1:
        return params
    target = DTYPES.get(declared) if isinstance(declared, str) else None
    target = target or max(stored, key=lambda dtype: (torch.finfo(dtype).bits, str(dtype)))  # a set: no order
    logger.info(f"{folder}: tensors stored in {sorted(map(str, stored))}, all read as {target}")
    cast: TensorDict = params.to(target)
    return cast


def config_from_hf(raw: object, where: str = "config.json") -> ModelConfig:
    """A zmaj config from a ``config.json``'s JSON value (read from ``where``), chosen by its ``model_type``."""
    hf = _Fields(raw, where)
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            hf.size(key)
        return gpt2.config_from_hf(hf)
    if model_type == zmaj_gpt.MODEL_TYPE:
        return zmaj_gpt.config_from_hf(hf, where)
    if model_type in LLAMA_FAMILY:
        return _llama_config(hf)
    if model_type in ("gemma2", "gemma3_text"):
        return _gemma_config(hf, model_type)
    if model_type == "gemma3":
        text = hf.object("text_config")
        if text.get("model_type", "gemma3_text") != "gemma3_text":
            raise ValueError(f"{where}: text_config.model_type is {text['model_type']!r}, not 'gemma3_text'")
        if text.get("final_logit_softcapping") is not None:
            raise ValueError(
                f"{where}: text_config.final_logit_softcapping is set, but Gemma3ForConditionalGeneration does not "
                "apply it where Gemma3ForCausalLM does: which of the two the checkpoint means is unclear"
            )
        # Gemma3Config's own tie_word_embeddings (true by default) is the one transformers ties by.
        tied = {"tie_word_embeddings": hf.get("tie_word_embeddings", True)}
        return _gemma_config(
            _Fields(text.defaults(**GEMMA3_TEXT_SIZES) | tied, where, "gemma3", "text_config."), "gemma3_text"
        )
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


class _Fields(dict[str, Any]):
    """A JSON object of a checkpoint's files (``prefix`` names where it sits in the file); reading a field it
    lacks, or one of the wrong type, is a ValueError naming the file and the field (a bare ``KeyError``, a
    ``TypeError`` from ``float(None)`` or a ``ZeroDivisionError`` from a head count of 0 would name neither)."""

    def __init__(self, fields: object, where: str, needed_by: object = None, prefix: str = "") -> None:
        if not isinstance(fields, Mapping):
            raise ValueError(
                f"{where}{': ' + prefix.removesuffix('.') if prefix else ''} is not a JSON object"
            )
        super().__init__(fields)
        self.where, self.prefix = where, prefix
        self.needed_by = fields.get("model_type") if needed_by is None else needed_by

    def __missing__(self, key: str) -> Any:
        raise ValueError(f"{self.where} has no {self.prefix + key!r}, which {self.needed_by} needs")

    def object(self, key: str, required: bool = False) -> "_Fields":
        """The JSON object at ``key``; an optional one that is absent or null is empty."""
        value = self[key] if required else self.get(key) or {}
        return _Fields(value, self.where, self.needed_by, f"{self.prefix}{key}.")

    def defaults(self, **fields: Any) -> "_Fields":
        """These fields, with this object's own values over them."""
        return _Fields(fields | self, self.where, self.needed_by, self.prefix)

    def size(self, key: str, default: int | None = None) -> int:
        """A count or length; ``default`` stands for an absent or null field, as ``transformers`` reads
        ``head_dim: null``."""
        if default is not None and self.get(key) is None:
            return default
        value = self[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{self.where}: {self.prefix}{key} is {value!r}, not a positive integer")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        """A finite real number; ``default`` stands for an absent field. A null one is refused, as
        ``transformers`` keeps it and fails when it first computes with it (``rope_theta: null``)."""
        value = self[key] if default is None or key in self else default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{self.where}: {self.prefix}{key} is {value!r}, not a finite number")
        return float(value)

    def optional_number(self, key: str, default: float | None) -> float | None:
        """A finite real number or null (a switch that is off, as a soft-cap); ``default`` stands for an absent
        field."""
        if self.get(key, default) is None:
            return None
        return self.number(key, default)

    def string(self, key: str, default: str | None = None) -> str:
        """A string, such as an activation's name; ``default`` stands for an absent field."""
        value = self[key] if default is None or key in self else default
        if not isinstance(value, str):
            raise ValueError(f"{self.where}: {self.prefix}{key} is {value!r}, not a string")
        return value

    def strings(self, key: str) -> list[str] | None:
        """A list of strings (``layer_types``), or None for an absent or null field."""
        value = self.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{self.where}: {self.prefix}{key} is {value!r}, not a list of strings")
        return value


def _llama_config(hf: _Fields) -> LlamaConfig:
    """Llama, Mistral, Qwen 2, Qwen 3 or SmolLM3; a switch zmaj lacks (biases on every projection, sliding windows
    in some layers) is an error. SmolLM3 is Llama whose every 4th layer has no positions (:func:`_rope_layers`).

    Mistral is Llama with an optional sliding window over every layer: Mistral 7B v0.1's 4096 tokens (the
    window MistralConfig assumes when the key is absent), none since v0.2 and in Mistral NeMo and Small. A window
    at least as long as the context never slides within it, and is read as none.
    """
    model_type = hf["model_type"]
    # Only the models that read a switch refuse it: Mistral builds no biases and Qwen 2 its q/k/v ones alone,
    # whatever the config says, and Qwen 3 has no MLP biases.
    if model_type in BIASED_MLP and hf.get("mlp_bias", False):
        raise ValueError(f"{model_type}: mlp_bias=True is not supported")
    if model_type in BIASED_ATTENTION and hf.get("attention_bias", False):
        raise ValueError(
            f"{model_type}: attention_bias=True (a bias on the output projection too) is not supported"
        )
    rope_layers = _rope_layers(hf) if model_type == "smollm3" else None
    # MistralForCausalLM reads no layer_types (its window is every layer's); the others' list or derive them.
    if model_type != "mistral" and any(kind != "full_attention" for kind in _layer_types(hf, rope_layers)):
        raise ValueError(f"{model_type}: sliding-window layers are not supported")
    context = hf.size("max_position_embeddings", _DEFAULT_CONTEXT[model_type])
    window = None
    if model_type == "mistral" and hf.get("sliding_window", 4096) is not None:
        window = hf.size("sliding_window", 4096)
    # A window as long as the context never slides within it, and the programs run no model past its context.
    if window is not None and window >= context:
        window = None
    act = hf.string("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{model_type}: unsupported hidden_act {act!r}")
    params = _rope_parameters(hf)
    rope_type = params.get("rope_type", params.get("type"))
    # Phi-3's layout: transformers lets a top-level key win, for the scalings that read one (zmaj's: llama3).
    if rope_type == "llama3" and hf.get("original_max_position_embeddings") is not None:
        params = _Fields(
            params | {"original_max_position_embeddings": hf.size("original_max_position_embeddings")},
            hf.where,
            hf.needed_by,
            params.prefix,
        )
    base, scaling = _rope(
        hf, params, context, default_base=2_000_000.0 if model_type == "smollm3" else 10_000.0
    )
    n_heads = hf.size("num_attention_heads")
    default_head_dim = 128 if model_type == "qwen3" else hf.size("hidden_size") // n_heads
    # Qwen2Config and Qwen3Config default an absent count to 32 key/value heads, MistralConfig to 8, SmolLM3Config
    # to 4; a null one, and LlamaConfig either, to one per query head.
    absent_kv_heads = {"mistral": 8, "qwen2": 32, "qwen3": 32, "smollm3": 4}.get(model_type, n_heads)
    default_kv_heads = absent_kv_heads if "num_key_value_heads" not in hf else n_heads
    return LlamaConfig(
        vocab_size=hf.size("vocab_size"),
        context=context,
        d_model=hf.size("hidden_size"),
        n_layers=hf.size("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.size("num_key_value_heads", default_kv_heads),
        head_dim=hf.size("head_dim", default_head_dim),
        d_ff=hf.size("intermediate_size"),
        norm_eps=hf.number("rms_norm_eps", 1e-6),
        rope_base=base,
        rope_scaling=scaling,
        tie_embeddings=hf.get("tie_word_embeddings", model_type == "smollm3"),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        rope_layers=rope_layers,
        sliding_window=window,
        activation=_ACTIVATIONS[act],
        init_std=hf.number("initializer_range", 0.02),
    )


def _rope_layers(hf: _Fields) -> tuple[bool, ...]:
    """SmolLM3's ``no_rope_layers``, despite its name 1 where a layer rotates q and k and 0 where it has no
    positions (NoPE), or as SmolLM3Config derives it: none in every ``no_rope_layer_interval``-th layer."""
    n_layers = hf.size("num_hidden_layers")
    listed = hf.get("no_rope_layers")
    if listed is None:
        return llama.nope_every(hf.size("no_rope_layer_interval", 4), n_layers)
    # A longer list is cut to the layers there are, as SmolLM3's attention layers index it.
    if not (isinstance(listed, list) and len(listed) >= n_layers and all(type(v) is int for v in listed)):
        raise ValueError(
            f"{hf.where}: no_rope_layers is {listed!r}, not an integer for each of {n_layers} layers"
        )
    return tuple(v != 0 for v in listed[:n_layers])


def _layer_types(hf: _Fields, rope_layers: tuple[bool, ...] | None) -> list[str]:
    """Qwen's or SmolLM3's per-layer attention kinds, derived as ``transformers`` does when the config does not
    list them: SmolLM3 windows its NoPE layers (``rope_layers``), Qwen those from ``max_window_layers`` on."""
    layer_types = hf.strings("layer_types")
    if layer_types is not None:
        return layer_types
    if rope_layers is not None:
        windowed = hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None
        return ["sliding_attention" if windowed and not rope else "full_attention" for rope in rope_layers]
    # An absent window is the config class's default (4096), a null one none.
    if not hf.get("use_sliding_window", False) or hf.get("sliding_window", 4096) is None:
        return ["full_attention"] * hf.size("num_hidden_layers")
    first_windowed = hf.number("max_window_layers", 28.0)
    return [
        "sliding_attention" if i >= first_windowed else "full_attention"
        for i in range(hf.size("num_hidden_layers"))
    ]


def _rope_parameters(hf: _Fields) -> _Fields:
    """A config's one set of RoPE parameters: a legacy ``rope_scaling`` replaces ``rope_parameters``, as in
    transformers' ``convert_rope_params_to_dict``."""
    return hf.object("rope_scaling" if hf.get("rope_scaling") else "rope_parameters")


def _rope(
    hf: _Fields, params: _Fields, context: int, base_key: str = "rope_theta", default_base: float = 10_000.0
) -> tuple[float, LinearScaling | Llama3Scaling | None]:
    """RoPE's base and scaling, from ``params``: ``rope_parameters`` (transformers >= 5), or ``rope_scaling``.
    A base they lack is ``hf``'s ``base_key`` (the top-level ``rope_theta`` of older configs), else
    ``default_base``; Llama 3's original context, the model's ``context``."""
    base = params.number("rope_theta") if "rope_theta" in params else hf.number(base_key, default_base)
    # A null factor is an absent one, as transformers reads it.
    partial = params.get("partial_rotary_factor")
    partial = hf.get("partial_rotary_factor") if partial is None else partial
    if partial not in (None, 1):
        raise ValueError(f"partial_rotary_factor {partial!r} is not supported, only 1")
    rope_type = params.string("rope_type") if "rope_type" in params else params.string("type", "default")
    if rope_type == "default":
        return base, None
    if rope_type == "linear":
        return base, LinearScaling(factor=params.number("factor"))
    if rope_type == "llama3":
        return base, Llama3Scaling(
            factor=params.number("factor"),
            low_freq_factor=params.number("low_freq_factor"),
            high_freq_factor=params.number("high_freq_factor"),
            original_max_position_embeddings=params.get("original_max_position_embeddings", context),
        )
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")


def _gemma_config(hf: _Fields, model_type: str) -> Gemma3Config:
    """Gemma 2 or Gemma 3 text models; a switch zmaj lacks is an error, and absent keys take ``Gemma2Config``'s
    or ``Gemma3TextConfig``'s defaults (but the sizes, which every checkpoint's config records: one without them
    is refused, naming the key). The two differ in their defaults (Gemma 2 caps scores at 50 and logits at 30,
    alternates its layers 1:1 and reads a context of 8192), in Gemma 3's QK-norm, and in RoPE: Gemma 2 rotates
    every layer with one base.

    A Gemma 3 ``attn_logit_softcapping`` is refused rather than ignored: ``transformers`` stores it but its Gemma
    3 never applies it (QK-norm replaced Gemma 2's cap), so a checkpoint that sets it is ambiguous.
    """
    gemma2 = model_type == "gemma2"
    if hf.get("attention_bias", False):
        raise ValueError(f"{model_type}: attention_bias=True is not supported")
    if hf.get("use_bidirectional_attention", False):
        raise ValueError(
            f"{model_type}: use_bidirectional_attention=True (non-causal attention) is not supported"
        )
    if not gemma2 and hf.get("attn_logit_softcapping") is not None:
        raise ValueError(
            "gemma3_text: attn_logit_softcapping is not supported (transformers' Gemma 3 does not apply it)"
        )
    act = hf.string("hidden_activation", "gelu_pytorch_tanh")  # the MLP's; it never reads hidden_act
    if act not in _ACTIVATIONS:
        raise ValueError(f"{model_type}: unsupported hidden_activation {act!r}")
    n_layers = hf.size("num_hidden_layers")
    layer_types: Sequence[str] | None = hf.strings("layer_types")
    if layer_types is None and gemma2:
        layer_types = gemma3.interleaved_layer_types(n_layers, 2)  # Gemma2Config reads no period
    elif layer_types is None:
        # The period of the pattern, as transformers still accepts it: from sliding_window_pattern alone (the
        # _sliding_window_pattern it writes beside layer_types is never read back).
        pattern = hf.size("sliding_window_pattern") if "sliding_window_pattern" in hf else 6
        layer_types = gemma3.interleaved_layer_types(n_layers, pattern)
    context = hf.size("max_position_embeddings", _DEFAULT_CONTEXT[model_type])
    if gemma2:
        # One base and scaling for every layer, in rope_parameters (transformers >= 5) or the older keys.
        (base, scaling) = (local_base, local_scaling) = _rope(hf, _rope_parameters(hf), context)
    else:
        (base, scaling), (local_base, local_scaling) = _gemma3_rope(hf, context)
    window: dict[str, int] = {}
    if hf.get("sliding_window", 4096) is not None:  # absent: the config class's default; null: none
        window["sliding_window"] = hf.size("sliding_window", 4096)
    elif "sliding_attention" in layer_types:
        raise ValueError(f"{model_type}: sliding-window layers need sliding_window, which is null")
    return Gemma3Config(
        vocab_size=hf.size("vocab_size"),
        context=context,
        d_model=hf.size("hidden_size"),
        n_layers=n_layers,
        n_heads=hf.size("num_attention_heads"),
        n_kv_heads=hf.size("num_key_value_heads", 4),
        head_dim=hf.size("head_dim", 256),
        d_ff=hf.size("intermediate_size"),
        norm_eps=hf.number("rms_norm_eps", 1e-6),
        layer_types=tuple(layer_types),
        **window,
        rope_base=base,
        rope_scaling=scaling,
        local_rope_base=local_base,
        local_rope_scaling=local_scaling,
        query_pre_attn_scalar=hf.number("query_pre_attn_scalar", 256.0),
        final_logit_softcap=hf.optional_number("final_logit_softcapping", 30.0 if gemma2 else None),
        qk_norm=not gemma2,
        attn_logit_softcap=hf.optional_number("attn_logit_softcapping", 50.0) if gemma2 else None,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        activation=_ACTIVATIONS[act],
        init_std=hf.number("initializer_range", 0.02),
    )


RopeSetting = tuple[float, LinearScaling | Llama3Scaling | None]


def _gemma3_rope(hf: _Fields, context: int) -> tuple[RopeSetting, RopeSetting]:
    """(base, scaling) of the global layers, then of the local ones, as ``Gemma3TextConfig`` reads them.

    transformers >= 5 keys ``rope_parameters`` by layer type; earlier configs have ``rope_theta`` and
    ``rope_scaling`` for the global layers and ``rope_local_base_freq`` for the local ones. Mixed, the older keys
    still count (``convert_rope_params_to_dict``): ``rope_scaling`` is merged over the global layers' parameters,
    and a layer type's parameters without ``rope_theta`` take its top-level key (other keys there are ignored).
    """
    per_type, legacy = hf.object("rope_parameters"), hf.object("rope_scaling")
    full: dict[str, Any] = {"rope_type": "default"}  # what transformers gives a layer type without parameters
    if per_type.get("full_attention") is not None:
        full = per_type.object("full_attention")
    if (
        "type" in legacy
        and "rope_type" not in legacy
        and full.get("rope_type", legacy["type"]) != legacy["type"]
    ):
        raise ValueError(
            f"{hf.where}: rope_scaling has type {legacy['type']!r} but no rope_type, and transformers' Gemma 3 "
            f"keeps the global layers' rope_type {full['rope_type']!r} (ignoring the scaling): ambiguous"
        )
    prefix = "rope_scaling." if legacy else "rope_parameters.full_attention."
    merged = _Fields(full | legacy, hf.where, hf.needed_by, prefix)
    local = per_type.object("sliding_attention")
    return _rope(hf, merged, context, "rope_theta", 1e6), _rope(
        hf, local, context, "rope_local_base_freq", 1e4
    )


def params_from_hf(tensors: Mapping[str, Tensor], config: LlamaConfig | Gemma3Config) -> TensorDict:
    """zmaj Llama or Gemma 3 parameters from a Llama/Qwen/Gemma 3 state dict; a tensor missing or of the wrong
    shape is named."""
    expected, layer_table, global_table = _tables(config)

    def read(key: str, name: str) -> Tensor:
        if name not in tensors:
            raise ValueError(f"checkpoint has no tensor {name!r} (zmaj {key})")
        tensor = tensors[name]
        shape = expected.get(tuple(key.split("."))).shape
        if key.startswith("blocks."):
            shape = shape[1:]
        if tensor.shape != shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        return tensor

    wanted = {".".join(key) for key in expected.keys(include_nested=True, leaves_only=True)}
    flat = {key: read(key, name) for key, name in global_table if key in wanted}
    for key, name in layer_table:
        if f"blocks.{key}" in wanted:
            flat[f"blocks.{key}"] = stack_layers(
                (read(f"blocks.{key}", name.format(i=i)) for i in range(config.n_layers)),
                config.n_layers,
                f"checkpoint tensors {name}",
            )
    assert set(flat) == wanted, f"the tables miss {sorted(wanted - set(flat))}"
    params: TensorDict = TensorDict(flat).unflatten_keys(".")
    params["blocks"].batch_size = torch.Size([config.n_layers])
    return params


Table = list[tuple[str, str]]


def _tables(config: LlamaConfig | Gemma3Config) -> tuple[TensorDict, Table, Table]:
    """The parameters ``init`` would build (on the meta device), and the layer and global tables to name them."""
    if isinstance(config, Gemma3Config):
        return gemma3.init(config, 0, device="meta"), GEMMA3_LAYER_TABLE, GEMMA3_GLOBAL_TABLE
    return llama.init(config, 0, device="meta"), LLAMA_LAYER_TABLE, LLAMA_GLOBAL_TABLE


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of the ``transformers`` model that computes exactly what ``config`` does, which
    ``config_from_hf`` reads back; a setting no such model has is a ValueError naming it."""
    if isinstance(config, GPTConfig):
        return (
            gpt2.config_to_hf(config) if gpt2.inexpressible(config) is None else zmaj_gpt.config_to_hf(config)
        )
    hf = _gemma_to_hf(config) if isinstance(config, Gemma3Config) else _llama_to_hf(config)
    if hf["model_type"] in WHOLE_HEADS and config.d_model % config.n_heads:
        raise ValueError(
            f"{type(config).__name__} d_model={config.d_model} with n_heads={config.n_heads}: transformers' "
            f"{hf['architectures'][0]} refuses a hidden size that is not a multiple of the head count, whatever "
            "head_dim says"
        )
    return hf


def _llama_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """Llama, or Qwen 2 when q/k/v have biases (and o none, as in Qwen 2), or Qwen 3 when q and k are normed, or
    Mistral when every layer attends through a sliding window, or SmolLM3 when some layers have no positions."""
    # Each of these is what one transformers model adds to Llama, and that model has none of the others (Qwen 3's
    # attention_bias, say, would also bias the output projection).
    additions = {
        "qwen2": ("qkv_bias=True", config.qkv_bias),
        "qwen3": ("qk_norm=True", config.qk_norm),
        "mistral": (f"sliding_window={config.sliding_window}", config.sliding_window is not None),
        "smollm3": ("rope_layers (layers without positions)", config.rope_layers is not None),
    }
    used = [(model_type, setting) for model_type, (setting, on) in additions.items() if on]
    if len(used) > 1:
        raise ValueError(
            f"LlamaConfig {' with '.join(setting for _, setting in used)}: no transformers model has more than "
            f"one ({', '.join(f'{model_type} has {setting}' for model_type, setting in used)})"
        )
    model_type = used[0][0] if used else "llama"
    hf: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type]],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.d_ff,
        "hidden_act": _HF_ACTIVATIONS[config.activation],
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": _rope_to_hf(config.rope_base, config.rope_scaling),
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
    }
    if model_type == "llama":
        return hf | {"attention_bias": False, "mlp_bias": False}
    if model_type == "mistral":
        return hf | {"sliding_window": config.sliding_window}
    if model_type == "smollm3":
        assert config.rope_layers is not None
        no_rope_layers = [int(rotates) for rotates in config.rope_layers]
        return hf | {"no_rope_layers": no_rope_layers, "use_sliding_window": False, "attention_bias": False}
    qwen3 = {"attention_bias": False} if model_type == "qwen3" else {}
    return hf | qwen3 | {"use_sliding_window": False, "layer_types": ["full_attention"] * config.n_layers}


def _gemma_to_hf(config: Gemma3Config) -> dict[str, Any]:
    """``gemma3_text`` (``Gemma3ForCausalLM``), RoPE given per layer type as transformers >= 5 reads it; or,
    without QK-norm, ``gemma2`` (``Gemma2ForCausalLM``), which rotates every layer alike and may soft-cap the
    attention scores, as Gemma 3 does not."""
    model_type = "gemma3_text" if config.qk_norm else "gemma2"
    if config.query_pre_attn_scalar != int(config.query_pre_attn_scalar):
        raise ValueError(
            f"Gemma3Config query_pre_attn_scalar={config.query_pre_attn_scalar}: transformers' Gemma configs "
            "only take an integer"
        )
    if config.qk_norm and config.attn_logit_softcap is not None:
        raise ValueError(
            "Gemma3Config with qk_norm and attn_logit_softcap: transformers' Gemma 3 has QK-norm but never "
            "soft-caps the scores, and its Gemma 2 the reverse"
        )
    one_rope = (config.local_rope_base, config.local_rope_scaling) == (config.rope_base, config.rope_scaling)
    if not config.qk_norm and not one_rope:
        raise ValueError(
            "Gemma3Config without qk_norm (exported as Gemma 2) whose local layers rotate otherwise than its "
            "global ones: transformers' Gemma 2 rotates every layer alike"
        )
    hf = {
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type]],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.d_ff,
        "hidden_activation": _HF_ACTIVATIONS[config.activation],
        "rms_norm_eps": config.norm_eps,
        "layer_types": list(config.layer_types),
        "sliding_window": config.sliding_window,
        "query_pre_attn_scalar": int(config.query_pre_attn_scalar),
        "final_logit_softcapping": config.final_logit_softcap,
        "attn_logit_softcapping": config.attn_logit_softcap,
        "attention_bias": False,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
    }
    if not config.qk_norm:
        return hf | {"rope_parameters": _rope_to_hf(config.rope_base, config.rope_scaling)}
    return hf | {
        "rope_parameters": {
            "full_attention": _rope_to_hf(config.rope_base, config.rope_scaling),
            "sliding_attention": _rope_to_hf(config.local_rope_base, config.local_rope_scaling),
        }
    }


def _rope_to_hf(
    base: float, scaling: LinearScaling | Llama3Scaling | FrequencyFactors | None
) -> dict[str, Any]:
    """``rope_parameters`` as transformers >= 5 writes them, which ``_rope`` reads back."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": base}
    if isinstance(scaling, FrequencyFactors):
        raise ValueError(
            "RoPE frequency factors (a GGUF file's rope_freqs, not Llama 3.1's scaling): transformers has no "
            "rope_type that divides each frequency by a factor of its own"
        )
    return {**scaling.model_dump(), "rope_theta": base}


def params_to_hf(params: TensorDictBase, config: ModelConfig) -> dict[str, Tensor]:
    """The checkpoint's state dict, by Hugging Face name, that ``load_hf`` reads back into ``params``: the same
    tables read right to left, each stacked row unbound into its layers. Tensors may be views into ``params``."""
    if isinstance(config, GPTConfig):
        _check_shapes(params, gpt.init(config, 0, device="meta"))
        if gpt2.inexpressible(config) is not None:
            return zmaj_gpt.params_to_hf(params)
        return gpt2.params_to_hf(params, config)
    expected, layer_table, global_table = _tables(config)
    _check_shapes(params, expected)
    leaves = params.items(include_nested=True, leaves_only=True)
    flat = {".".join(key): t for key, t in leaves if isinstance(t, Tensor)}
    tensors = {name: flat[key] for key, name in global_table if key in flat}
    for key, name in layer_table:
        if f"blocks.{key}" in flat:
            tensors |= {name.format(i=i): layer for i, layer in enumerate(flat[f"blocks.{key}"].unbind(0))}
    return tensors


def _check_shapes(params: TensorDictBase, expected: TensorDictBase) -> None:
    """Every parameter ``init`` would build is present, with the shape it would have, and no other."""
    extra = set(params.keys(include_nested=True, leaves_only=True)) - set(
        expected.keys(include_nested=True, leaves_only=True)
    )
    if extra:
        raise ValueError(f"parameters {sorted('.'.join(key) for key in extra)} are not part of this model")
    for key in expected.keys(include_nested=True, leaves_only=True):
        name = ".".join(key)
        if key not in params.keys(include_nested=True, leaves_only=True):
            raise KeyError(f"converted parameters lack {name!r}")
        if params.get(key).shape != expected.get(key).shape:
            raise ValueError(
                f"{name} has shape {tuple(params.get(key).shape)}, expected {tuple(expected.get(key).shape)}"
            )


class _SafetensorsFolder(Mapping[str, Tensor]):
    """The tensors of a (possibly sharded) safetensors checkpoint, each read from disk when asked for.

    Reading lazily (and stacking as it reads, ``stack_layers``) means converting a large model holds one layer's
    tensor beyond the result, not a second copy of the model.
    """

    def __init__(
        self,
        folder: Path,
        files: ExitStack,
        device: torch.device | str,
        renames: Mapping[str, str] | None = None,
    ) -> None:
        """``renames`` maps stored name prefixes to the ones read (a tensor under none of them is left out)."""
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = _Fields(read_json(index), str(index), "a sharded checkpoint").object(
                "weight_map", True
            )
            shards = sorted(set(weight_map.values()))
        else:
            shards = ["model.safetensors"]
        self._file_of: dict[str, tuple[Any, str]] = {}  # a name read: its file, and its name there
        for shard in shards:
            fileio.check_readable(folder / shard)
            try:
                handle = files.enter_context(safe_open(folder / shard, framework="pt", device=str(device)))
            except SafetensorError as error:  # the library's message names no file
                raise ValueError(f"{folder / shard}: not a readable safetensors file ({error})") from None
            for stored in handle.keys():  # noqa: SIM118 (a safe_open handle is no iterable)
                if renames is None:
                    self._file_of[stored] = (handle, stored)
                for prefix, read_as in (renames or {}).items():
                    if stored.startswith(prefix):
                        self._file_of[read_as + stored.removeprefix(prefix)] = (handle, stored)

    def __getitem__(self, name: str) -> Tensor:
        handle, stored = self._file_of[name]
        tensor: Tensor = handle.get_tensor(stored)
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)
