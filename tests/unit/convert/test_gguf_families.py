"""GGUF files of Qwen 2, Qwen 3, GPT-2, SmolLM3, Gemma 2 and Llama 3.1's RoPE scaling, written as llama.cpp's
``convert_hf_to_gguf.py`` writes them.

Each file is written from a random ``transformers`` model, the reference: zmaj's logits must be that model's,
and so must ``transformers``' own reading of the file, which checks that the file was written the way llama.cpp
writes one (names, metadata keys, what is transposed, what is left out). What the converter does per family:
Qwen 2 and 3 are Llama's tensors under their own metadata prefix with the q and k rows unpermuted (llama.cpp
rotates halves for them), Qwen 2 adds q/k/v biases and Qwen 3 per-head q/k norms and its own head_dim; GPT-2's
``Conv1D`` weights are transposed to ``[out, in]``, its ``c_attn`` stays one ``attn_qkv`` tensor, and its tied
unembedding is left out (newer converters) or written as a copy of the embedding (older ones); Llama 3.1's
scaling is evaluated into a divisor per RoPE plane (``rope_freqs``), which ``transformers`` does not read, so those
files are checked against the model they were written from alone.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tests.integration.test_llama_parity import NO_SPECIAL_TOKENS
from tests.unit.convert.test_gguf import (
    SMALL,
    VOCAB,
    Tensors,
    gemma_cpp_tensors,
    llama_cpp_metadata,
    llama_cpp_tensors,
    llama_model,
    write_gguf,
)
from zmaj.convert import gguf as zgguf
from zmaj.convert import hf
from zmaj.models.common import Batch
from zmaj.models.gemma3 import Gemma3Config
from zmaj.models.gpt import GPTConfig
from zmaj.models.llama import LlamaConfig
from zmaj.models.registry import architecture, config_from_json, config_to_json
from zmaj.nn.rope import FrequencyFactors, LinearScaling, Llama3Scaling

M = TypeVar("M", bound=transformers.PreTrainedModel)
Changes = dict[str, np.ndarray | None]
"""Tensors to replace, by name; ``None`` drops one."""
TOKENS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


def moved_off_defaults(model: M) -> M:
    """``model`` in eval mode with its norms and biases moved off one and zero, so that a dropped, swapped or
    misread one shows in the logits."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def logits_of_file(path: Path) -> torch.Tensor:
    config, params = zgguf.load_gguf(path)
    with torch.no_grad():
        return architecture(config).forward(params, Batch(tokens=TOKENS), config=config)


def transformers_logits_of_file(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )(TOKENS).logits


def reference_logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


# --- Qwen 2 and Qwen 3 ---------------------------------------------------------------------------------------

QWEN_SMALL: dict[str, Any] = SMALL | {"rms_norm_eps": 1e-6}  # test_gguf's tiny Llama, Qwen's epsilon
QWEN3_HEAD_DIM = 128  # not 64 / 4; transformers takes Qwen3Config's 128 whatever the file says
QWEN_RENAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def qwen_model(family: str, tie: bool) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if family == "qwen2":
        return moved_off_defaults(
            transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN_SMALL, tie_word_embeddings=tie))
        )
    config = transformers.Qwen3Config(**QWEN_SMALL, head_dim=QWEN3_HEAD_DIM, tie_word_embeddings=tie)
    return moved_off_defaults(transformers.Qwen3ForCausalLM(config))


def qwen_tensors(model: transformers.PreTrainedModel) -> Tensors:
    """The model's tensors under llama.cpp's names, q and k rows as they are."""
    tensors: Tensors = {}
    for name, value in model.state_dict().items():
        array = value.numpy()
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = array
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = array
        elif name == "lm_head.weight":
            if not model.config.tie_word_embeddings:
                tensors["output.weight"] = array
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            tensors[f"blk.{layer}.{QWEN_RENAMES[module]}.{kind}"] = array
    return tensors


def qwen_metadata(family: str) -> dict[str, Any]:
    keys = {
        "context_length": 256,
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "rope.freq_base": 50_000.0,
        "attention.layer_norm_rms_epsilon": 1e-6,
    }
    if family == "qwen3":
        keys |= {"attention.key_length": QWEN3_HEAD_DIM, "attention.value_length": QWEN3_HEAD_DIM}
    return {f"{family}.{key}": value for key, value in keys.items()} | {
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)]
    }


def qwen_file(tmp_path: Path, family: str, tie: bool, changes: Changes | None = None) -> Path:
    """A tiny Qwen GGUF, with ``changes`` to its tensors."""
    tensors = qwen_tensors(qwen_model(family, tie)) | (changes or {})
    kept = {name: t for name, t in tensors.items() if t is not None}
    return write_gguf(tmp_path / f"{family}.gguf", family, qwen_metadata(family), kept)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_llama_cpp_qwen_file_gives_the_logits_of_its_model(tmp_path: Path, family: str, tie: bool) -> None:
    path = qwen_file(tmp_path, family, tie)
    config = zgguf.config_from_gguf(zgguf.read_gguf(path))
    assert isinstance(config, LlamaConfig)
    assert (config.qkv_bias, config.qk_norm, config.tie_embeddings) == (
        family == "qwen2",
        family == "qwen3",
        tie,
    )
    assert config.head_dim == (QWEN3_HEAD_DIM if family == "qwen3" else 16)
    expected = reference_logits(qwen_model(family, tie))
    assert (transformers_logits_of_file(path) - expected).abs().max().item() <= 1e-5
    assert (logits_of_file(path) - expected).abs().max().item() <= 1e-5


def test_a_qwen2_file_without_biases_loads_without_them(tmp_path: Path) -> None:
    """llama.cpp reads Qwen 2's q/k/v biases as optional; a file without them is the model whose biases are 0."""
    model = qwen_model("qwen2", tie=True)
    no_biases: Changes = {name: None for name in qwen_tensors(model) if name.endswith(".bias")}
    path = qwen_file(tmp_path, "qwen2", tie=True, changes=no_biases)
    config = zgguf.config_from_gguf(zgguf.read_gguf(path))
    assert isinstance(config, LlamaConfig)
    assert not config.qkv_bias
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    assert (logits_of_file(path) - reference_logits(model)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        ("qwen3", {"blk.1.attn_k_norm.weight": None}, "no tensor 'blk.1.attn_k_norm.weight'"),
        ("qwen3", {"blk.0.attn_q.bias": np.zeros(512, np.float32)}, "would not read: blk.0.attn_q.bias"),
        ("qwen2", {"blk.1.attn_v.bias": None}, "no tensor 'blk.1.attn_v.bias'"),
    ],
)
def test_a_qwen_file_missing_a_tensor_its_family_has_or_holding_one_it_lacks_is_named(
    tmp_path: Path, family: str, change: Changes, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        zgguf.load_gguf(qwen_file(tmp_path, family, tie=True, changes=change))


def test_a_qwen_file_with_yarn_is_refused(tmp_path: Path) -> None:
    """Qwen 2.5's long-context variants write YaRN, which zmaj does not compute: past the original context
    every position would be rotated wrongly."""
    metadata = qwen_metadata("qwen2") | {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0}
    path = write_gguf(tmp_path / "m.gguf", "qwen2", metadata, qwen_tensors(qwen_model("qwen2", tie=True)))
    with pytest.raises(ValueError, match="qwen2: RoPE scaling 'yarn' is not supported"):
        zgguf.load_gguf(path)


# --- GPT-2 ---------------------------------------------------------------------------------------------------

# llama.cpp's converter writes 4 * n_embd as the MLP width and transformers sizes the position table by its
# default n_positions (1024) whatever context_length says, so the tiny model keeps both.
GPT2_SMALL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "n_positions": 1024,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "initializer_range": 0.1,
    "bos_token_id": 0,  # not GPT-2's 50256, outside this vocabulary
    "eos_token_id": 0,
}
GPT2_RENAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def gpt2_model(tie: bool) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(**GPT2_SMALL, tie_word_embeddings=tie)
    return moved_off_defaults(transformers.GPT2LMHeadModel(config))


def gpt2_file(tmp_path: Path, output: str) -> tuple[Path, transformers.GPT2LMHeadModel]:
    """A tiny GPT-2 GGUF with its unembedding ``output``: ``tied`` (no output.weight), ``copy`` (the
    embedding's copy, as older converters wrote it) or ``own`` (a matrix of its own)."""
    model = gpt2_model(tie=output != "own")
    tensors: Tensors = {}
    for name, value in model.state_dict().items():
        name = name.removeprefix("transformer.")
        array = value.numpy()
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            array = np.ascontiguousarray(array.T)  # Conv1D's [in, out] written as [out, in]
        if name == "wte.weight":
            tensors["token_embd.weight"] = array
        elif name == "wpe.weight":
            tensors["position_embd.weight"] = array
        elif name.startswith("ln_f."):
            tensors[f"output_norm.{name.removeprefix('ln_f.')}"] = array
        elif name == "lm_head.weight":
            if output == "own":
                tensors["output.weight"] = array
        else:
            layer, rest = name.removeprefix("h.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            tensors[f"blk.{layer}.{GPT2_RENAMES[module]}.{kind}"] = array
    if output == "copy":
        tensors["output.weight"] = tensors["token_embd.weight"]
    metadata = {
        "gpt2.context_length": 1024,
        "gpt2.embedding_length": 64,
        "gpt2.block_count": 2,
        "gpt2.feed_forward_length": 256,
        "gpt2.attention.head_count": 4,
        "gpt2.attention.layer_norm_epsilon": 1e-5,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)],
    }
    return write_gguf(tmp_path / "gpt2.gguf", "gpt2", metadata, tensors), model


@pytest.mark.parametrize("output", ["tied", "copy", "own"])
def test_a_llama_cpp_gpt2_file_gives_the_logits_of_its_model(tmp_path: Path, output: str) -> None:
    path, model = gpt2_file(tmp_path, output)
    config, params = zgguf.load_gguf(path)
    assert config == GPTConfig(
        vocab_size=VOCAB,
        context=1024,
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_ff=256,
        norm_eps=float(np.float32(1e-5)),  # stored as float32
        activation="gelu_tanh",
        tie_embeddings=output != "own",
    )
    assert ("unembed" in params) == (output == "own")  # a copy is held once, as the checkpoint had it
    expected = reference_logits(model)
    assert (transformers_logits_of_file(path) - expected).abs().max().item() <= 1e-5
    assert (logits_of_file(path) - expected).abs().max().item() <= 1e-5


def test_a_gpt2_files_fused_qkv_is_cut_into_q_k_and_v_in_order(tmp_path: Path) -> None:
    """GPT-2's ``c_attn`` computes q, k and v one after another (``GPT2Attention`` splits its output in three).
    A key bias read from another third moves every score of a query by one amount, which softmax cancels, so
    the logits cannot tell; the parameters, which export writes back, can."""
    path, model = gpt2_file(tmp_path, "tied")
    _, params = zgguf.load_gguf(path)
    state = model.state_dict()
    for i in range(2):
        weights = state[f"transformer.h.{i}.attn.c_attn.weight"].T.split(64)  # Conv1D's [in, out]
        biases = state[f"transformer.h.{i}.attn.c_attn.bias"].split(64)
        for part, weight, bias in zip("qkv", weights, biases, strict=True):
            assert torch.equal(params["blocks", "attn", part, "weight"][i], weight), (i, part)
            assert torch.equal(params["blocks", "attn", part, "bias"][i], bias), (i, part)


def rewritten(path: Path, changes: Tensors) -> Path:
    """A copy of the GGUF file at ``path`` (its tensors as float32) with ``changes`` to its tensors."""
    file = zgguf.read_gguf(path)
    tensors: Tensors = {name: zgguf.dequantize_tensor(t).numpy() for name, t in file.tensors.items()}
    metadata = {key: value for key, value in file.metadata.items() if not key.startswith("general.")}
    architecture = file.metadata["general.architecture"]
    return write_gguf(path.with_name(f"changed-{path.name}"), architecture, metadata, tensors | changes)


def test_an_unembedding_stored_as_the_embeddings_bytes_in_another_type_is_its_own(tmp_path: Path) -> None:
    """Only the same bytes of the same type are a copy: float16 bytes read as bfloat16 are other numbers."""
    path, _ = gpt2_file(tmp_path, "copy")
    embedding = zgguf.dequantize_tensor(zgguf.read_gguf(path).tensors["token_embd.weight"]).numpy()
    half = embedding.astype(np.float16)
    changed = rewritten(
        path, {"token_embd.weight": half, "output.weight": (half.view(np.uint8), GGMLQuantizationType.BF16)}
    )
    config, params = zgguf.load_gguf(changed)
    assert not config.tie_embeddings
    as_bfloat16 = torch.from_numpy(half.view(np.int16).copy()).view(torch.bfloat16).float()
    assert torch.equal(params["unembed", "weight"], as_bfloat16)
    assert not torch.equal(params["unembed", "weight"], params["embed", "weight"])


def test_a_copy_is_compared_to_its_last_byte(tmp_path: Path) -> None:
    """The bytes are compared a chunk at a time (here a row at a time): an unembedding that differs from the
    embedding in its last value alone is a matrix of its own."""
    path, _ = gpt2_file(tmp_path, "copy")
    embedding = zgguf.dequantize_tensor(zgguf.read_gguf(path).tensors["token_embd.weight"]).numpy()
    last_changed = embedding.copy()
    last_changed[-1, -1] += 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zgguf, "DEQUANTIZE_CHUNK", embedding.shape[-1])
        assert zgguf.config_from_gguf(zgguf.read_gguf(path)).tie_embeddings
        changed = zgguf.read_gguf(rewritten(path, {"output.weight": last_changed}))
        assert not zgguf.config_from_gguf(changed).tie_embeddings


def test_a_misshapen_fused_qkv_is_named_with_the_shape_of_all_three(tmp_path: Path) -> None:
    path, _ = gpt2_file(tmp_path, "tied")
    damaged = rewritten(path, {"blk.1.attn_qkv.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(
        ValueError, match=re.escape("'blk.1.attn_qkv.weight' has shape (128, 64), expected (192, 64)")
    ):
        zgguf.load_gguf(damaged)


# --- tokenizers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "pre"), [("qwen2", "qwen2"), ("gpt2", "gpt-2")])
def test_a_byte_level_tokenizer_of_the_family_encodes_as_transformers(
    tmp_path: Path, family: str, pre: str
) -> None:
    """Qwen splits digits one by one before BPE, GPT-2 keeps runs of them: the pre-tokenizer named in the file
    decides, as ``transformers`` builds it."""
    alphabet = list(bytes_to_unicode().values())
    merges = ["1 2", "12 3", "Ġ t", "Ġt h", "Ġth e"]
    tokens = [*alphabet, *("".join(merge.split(" ")) for merge in merges), "<|endoftext|>"]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
        "tokenizer.ggml.add_bos_token": False,
    }
    path = write_gguf(tmp_path / "m.gguf", family, metadata, {"w": np.zeros(4, dtype=np.float32)})
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = zgguf.tokenizer_from_gguf(path)
    texts = ["the 123 12345 then", " the<|endoftext|>x", "ünï 漢字 \n\t 1234"]
    for text in texts:
        assert ours.tokenizer.encode(text).ids == reference(text).input_ids
    assert ours.eos_id == reference.eos_token_id == len(tokens) - 1
    digits = ours.tokenizer.encode("123").ids
    assert digits == (
        [tokens.index("1"), tokens.index("2"), tokens.index("3")] if pre == "qwen2" else [tokens.index("123")]
    )


# --- Llama 3.1's RoPE scaling, as per-plane factors ----------------------------------------------------------


def llama_cpp_rope_factors(head_dim: int, base: float, scaling: Llama3Scaling) -> np.ndarray:
    """``rope_freqs`` as llama.cpp's converter computes it from Llama 3.1's scaling parameters
    (``LlamaModel.generate_extra_tensors``): float32 frequencies, each plane's divisor decided one by one."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    context, low, high = (
        scaling.original_max_position_embeddings,
        scaling.low_freq_factor,
        scaling.high_freq_factor,
    )
    factors: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            factors.append(1)
        elif wavelen > context / low:
            factors.append(scaling.factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


META_LLAMA32 = Llama3Scaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
# A ramp over a 64-token original context: planes of every kind (kept, blended, slowed) within a tiny model.
SHORT_RAMP = Llama3Scaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


def scaled_llama(scaling: Llama3Scaling | None) -> transformers.LlamaForCausalLM:
    """test_gguf's tiny Llama (its seed, its norms moved off one) with ``scaling`` as its rope parameters."""
    rope = {"rope_type": "default"} if scaling is None else scaling.model_dump()
    config = transformers.LlamaConfig(
        **{k: v for k, v in SMALL.items() if k != "rope_theta"},
        rope_parameters=rope | {"rope_theta": SMALL["rope_theta"]},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(llama_model(tie=False).state_dict())
    return model


def llama3_file(tmp_path: Path, scaling: Llama3Scaling, metadata: dict[str, Any] | None = None) -> Path:
    model = scaled_llama(scaling)
    tensors = llama_cpp_tensors(model)
    tensors["rope_freqs.weight"] = llama_cpp_rope_factors(16, SMALL["rope_theta"], scaling)
    keys = llama_cpp_metadata(model.config) | (metadata or {})
    return write_gguf(tmp_path / "llama3.gguf", "llama", keys, tensors)


def llama_logits(model: transformers.LlamaForCausalLM, start: int) -> torch.Tensor:
    positions = torch.arange(start, start + TOKENS.shape[1]).expand_as(TOKENS)
    with torch.no_grad():
        return model(TOKENS, position_ids=positions).logits


def zmaj_llama_logits(path: Path, start: int) -> torch.Tensor:
    config, params = zgguf.load_gguf(path)
    positions = torch.arange(start, start + TOKENS.shape[1]).expand_as(TOKENS)
    with torch.no_grad():
        return architecture(config).forward(params, Batch(tokens=TOKENS, positions=positions), config=config)


def test_llama_31_rope_factors_are_read_as_the_scaling_they_were_computed_from(tmp_path: Path) -> None:
    """Llama 3.1, 3.2 and 3.3 GGUF files hold their RoPE scaling only as rope_freqs, which zmaj refused as a
    tensor it would not read. Read as Meta's parameters, the model is the checkpoint the file came from, at the
    positions past the original context (8192) where the scaling matters most and at the first ones."""
    path = llama3_file(tmp_path, META_LLAMA32)
    config = zgguf.config_from_gguf(zgguf.read_gguf(path))
    assert isinstance(config, LlamaConfig)
    assert config.rope_scaling == META_LLAMA32
    reference = scaled_llama(META_LLAMA32)
    for start in (0, 20_000):
        expected = llama_logits(reference, start)
        assert (zmaj_llama_logits(path, start) - expected).abs().max().item() <= 1e-5
    unscaled = llama_logits(scaled_llama(None), 20_000)
    assert (unscaled - llama_logits(reference, 20_000)).abs().max().item() > 1e-2  # the scaling shows


def test_rope_factors_of_other_parameters_are_kept_as_llama_cpp_computes_with_them(tmp_path: Path) -> None:
    """Factors that are not Meta's parameters' divide the frequencies as they are; transformers has no rope_type
    for that, so export says so rather than write a model that rotates otherwise."""
    path = llama3_file(tmp_path, SHORT_RAMP)
    config = zgguf.config_from_gguf(zgguf.read_gguf(path))
    assert isinstance(config, LlamaConfig)
    assert config.rope_scaling == FrequencyFactors(
        factors=tuple(llama_cpp_rope_factors(16, SMALL["rope_theta"], SHORT_RAMP).tolist())
    )
    assert len(set(config.rope_scaling.factors)) > 2  # kept, blended and slowed planes
    expected = llama_logits(scaled_llama(SHORT_RAMP), 0)
    assert (zmaj_llama_logits(path, 0) - expected).abs().max().item() <= 1e-5
    assert (llama_logits(scaled_llama(None), 0) - expected).abs().max().item() > 1e-2
    # Far in, a divisor's float32 rounding (relative 6e-8) turns into angles off by 20,000 times that: 3.8e-4
    # here, as in llama.cpp, which divides by the same float32 numbers.
    far = llama_logits(scaled_llama(SHORT_RAMP), 20_000)
    assert (zmaj_llama_logits(path, 20_000) - far).abs().max().item() <= 1e-3
    with pytest.raises(ValueError, match="transformers has no rope_type that divides each frequency"):
        hf.config_to_hf(config)
    # A zmaj model folder (convert.py --to zmaj) keeps them.
    assert config_from_json(json.loads(json.dumps(config_to_json(config))), "model.json") == config


def test_rope_factors_off_meta_parameters_by_more_than_float32_rounding_are_kept(tmp_path: Path) -> None:
    """Read as Meta's parameters only where they give the same factors to float32 rounding: one plane's factor
    off by one part in 10,000 is a model that rotates otherwise, kept as the file's factors."""
    path = llama3_file(tmp_path, META_LLAMA32)
    factors = llama_cpp_rope_factors(16, SMALL["rope_theta"], META_LLAMA32)
    blended = int(np.argmax((factors > 1) & (factors < META_LLAMA32.factor)))  # not the largest: the factor
    assert 1 < factors[blended] < META_LLAMA32.factor
    factors[blended] *= np.float32(1 + 1e-4)
    config = zgguf.config_from_gguf(zgguf.read_gguf(rewritten(path, {"rope_freqs.weight": factors})))
    assert isinstance(config, LlamaConfig)
    assert config.rope_scaling == FrequencyFactors(factors=tuple(factors.tolist()))


@pytest.mark.parametrize(
    ("factors", "metadata", "message"),
    [
        (np.ones(4, np.float32), {}, r"'rope_freqs\.weight' has shape \(4,\), expected \(8,\)"),
        (np.array([1, 1, 1, 1, 1, 1, 0, 8], np.float32), {}, "holds factors that are not positive"),
        (np.ones(8, np.float32), {"llama.rope.scaling.factor": 2.0}, "linear RoPE scaling together with"),
    ],
)
def test_rope_factors_that_cannot_be_read_are_refused(
    tmp_path: Path, factors: np.ndarray, metadata: dict[str, Any], message: str
) -> None:
    path = llama3_file(tmp_path, META_LLAMA32, metadata)
    damaged = rewritten(path, {"rope_freqs.weight": factors})
    with pytest.raises(ValueError, match=message):
        zgguf.load_gguf(damaged)


def test_a_qwen_file_with_rope_factors_is_refused(tmp_path: Path) -> None:
    """llama.cpp applies rope_freqs to Llama alone; a Qwen file's is a tensor it never reads, and zmaj neither."""
    path = qwen_file(tmp_path, "qwen2", tie=True)
    damaged = rewritten(path, {"rope_freqs.weight": np.ones(8, np.float32)})
    config = zgguf.config_from_gguf(zgguf.read_gguf(damaged))
    assert isinstance(config, LlamaConfig)
    assert config.rope_scaling is None
    with pytest.raises(ValueError, match=r"would not read: rope_freqs\.weight"):
        zgguf.load_gguf(damaged)


def test_configs_need_one_factor_per_rope_plane() -> None:
    """Checked when a config is built (a model.json read), not at the first forward."""
    three = FrequencyFactors(factors=(1.0,) * 3)
    with pytest.raises(ValueError, match="3 RoPE frequency factors, but head_dim 16 has 8 planes"):
        LlamaConfig(vocab_size=8, d_model=64, n_heads=4, rope_scaling=three)
    with pytest.raises(ValueError, match="3 RoPE frequency factors, but head_dim 32 has 16 planes"):
        Gemma3Config(vocab_size=8, d_model=64, n_layers=1, n_heads=2, head_dim=32, local_rope_scaling=three)


def test_a_llama_config_needs_one_rope_flag_per_layer() -> None:
    with pytest.raises(ValueError, match="rope_layers lists 1 layers but n_layers is 2"):
        LlamaConfig(vocab_size=8, d_model=64, n_layers=2, n_heads=4, rope_layers=(False,))


@dataclass
class Bar:
    """What a progress bar is told: its total, and the steps it is advanced by."""

    total: int | None
    n: int = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_the_progress_bar_counts_the_tensors_it_dequantises(tmp_path: Path) -> None:
    """A copied unembedding and rope_freqs are read into the config, not dequantised as parameters: counted in
    the bar's total, they left it at 96%."""
    bars: list[Bar] = []

    def recorded(items: None, total: int | None, what: str, unit: str = "it") -> Bar:
        bars.append(Bar(total))
        return bars[-1]

    gpt2_path, _ = gpt2_file(tmp_path, "copy")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zgguf, "progress", recorded)
        for path in (gpt2_path, llama3_file(tmp_path, META_LLAMA32)):
            zgguf.load_gguf(path)
    # GPT-2: 12 tensors in each of 2 layers and 4 global ones; Llama: 9 a layer, 3 global
    assert [(bar.n, bar.total) for bar in bars] == [(28, 28), (21, 21)]


# --- SmolLM3: Llama with every 4th layer without positions ----------------------------------------------------


def test_a_llama_cpp_smollm3_file_gives_the_logits_of_its_model(tmp_path: Path) -> None:
    """llama.cpp's converter writes SmolLM3 as Llama (q/k rows permuted) under its own prefix, and its code, not
    the file, leaves every 4th layer unrotated. ``transformers`` reads no SmolLM3 GGUF, so the reference is the
    model the file was written from: 4 layers, the last without positions."""
    torch.manual_seed(0)
    config = transformers.SmolLM3Config(
        **{k: v for k, v in SMALL.items() if k != "num_hidden_layers"},
        num_hidden_layers=4,
        **NO_SPECIAL_TOKENS,
    )
    model = moved_off_defaults(transformers.SmolLM3ForCausalLM(config))
    assert model.config.no_rope_layers == [1, 1, 1, 0]
    metadata = {
        key.replace("llama.", "smollm3.", 1): value
        for key, value in llama_cpp_metadata(model.config).items()  # type: ignore[arg-type]
    }
    path = write_gguf(tmp_path / "smollm3.gguf", "smollm3", metadata, llama_cpp_tensors(model))  # type: ignore[arg-type]
    loaded = zgguf.config_from_gguf(zgguf.read_gguf(path))
    assert isinstance(loaded, LlamaConfig)
    assert loaded.rope_layers == (True, True, True, False)
    assert (logits_of_file(path) - reference_logits(model)).abs().max().item() <= 1e-5


# --- Gemma 2: Gemma 3's tensors less the q/k norms, its scores and logits soft-capped ----------------------------


def gemma2_model(
    caps: tuple[float, float],
    rope: dict[str, Any] | None = None,
    window: int = 16,
    layer_types: list[str] | None = None,
) -> transformers.Gemma2ForCausalLM:
    """A tiny Gemma 2 with the given (attention, logit) caps and RoPE parameters (default: base 10k, unscaled);
    its window, 16 by default, slides within the 40 tokens; its layers alternate local and global unless
    ``layer_types`` says otherwise."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        # As in Gemma 2 2B and 9B: llama.cpp scales by head_dim ** -0.5 (bar the 27B model), and transformers'
        # GGUF reader takes Gemma2Config's query_pre_attn_scalar, 256, so the two agree only at this head_dim.
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=window,
        max_position_embeddings=256,
        initializer_range=0.1,
        attn_logit_softcapping=caps[0],
        final_logit_softcapping=caps[1],
        rope_parameters=rope,
        layer_types=layer_types,
    )
    model = transformers.Gemma2ForCausalLM(config)
    model.set_attn_implementation("eager")
    return moved_off_defaults(model)


def gemma2_metadata(caps: tuple[float, float] | None) -> dict[str, Any]:
    """What llama.cpp's converter writes for Gemma 2 (no RoPE base: llama.cpp's default, 10k, is Gemma 2's);
    ``caps=None`` leaves out the keys llama.cpp reads as optional, the caps and the window."""
    keys: dict[str, Any] = {
        "context_length": 256,
        "embedding_length": 64,
        "block_count": 4,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.key_length": 256,
        "attention.value_length": 256,
        "attention.layer_norm_rms_epsilon": 1e-6,
    }
    if caps is not None:
        keys |= {
            "attn_logit_softcapping": caps[0],
            "final_logit_softcapping": caps[1],
            "attention.sliding_window": 16,
        }
    return {f"gemma2.{key}": value for key, value in keys.items()} | {
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)]
    }


def test_a_llama_cpp_gemma2_file_gives_the_logits_of_its_model(tmp_path: Path) -> None:
    """Caps these small values reach (1 and 2), read from the file: without either, the logits move by > 0.1.
    Another RoPE base and a linear scaling, which Gemma 2 applies to every layer, local and global."""
    caps = (1.0, 2.0)
    model = gemma2_model(caps, {"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0})
    metadata = gemma2_metadata(caps) | {
        "gemma2.rope.freq_base": 100.0,
        "gemma2.rope.scaling.type": "linear",
        "gemma2.rope.scaling.factor": 4.0,
    }
    path = write_gguf(tmp_path / "gemma2.gguf", "gemma2", metadata, gemma_cpp_tensors(model, True))
    config, params = zgguf.load_gguf(path)
    assert isinstance(config, Gemma3Config)
    assert config.layer_types == ("sliding_attention", "full_attention") * 2
    assert (config.attn_logit_softcap, config.final_logit_softcap, config.qk_norm) == (*caps, False)
    assert config.rope_base == config.local_rope_base == 100.0
    assert config.rope_scaling == config.local_rope_scaling == LinearScaling(factor=4.0)
    expected = reference_logits(model)
    assert (logits_of_file(path) - expected).abs().max().item() <= 1e-5
    for cap in ("attn_logit_softcap", "final_logit_softcap"):
        uncapped = config.model_copy(update={cap: None})
        with torch.no_grad():
            logits = architecture(uncapped).forward(params, Batch(tokens=TOKENS), config=uncapped)
        assert (logits - expected).abs().max().item() > 0.1, cap


def test_a_gemma2_file_without_its_caps_reads_as_llama_cpp_and_transformers_read_it(tmp_path: Path) -> None:
    """llama.cpp reads the caps and the window as optional, 50, 30 and 4096 without them (Gemma 2's), as
    transformers' GGUF reader does, which reads no cap at all; both readings give the logits of that model."""
    model = gemma2_model((50.0, 30.0), window=4096)
    tensors = gemma_cpp_tensors(model, True)
    path = write_gguf(tmp_path / "gemma2.gguf", "gemma2", gemma2_metadata(None), tensors)
    config = zgguf.config_from_gguf(zgguf.read_gguf(path))
    assert isinstance(config, Gemma3Config)
    assert (config.attn_logit_softcap, config.final_logit_softcap, config.sliding_window) == (
        50.0,
        30.0,
        4096,
    )
    expected = reference_logits(model)
    assert (transformers_logits_of_file(path) - expected).abs().max().item() <= 1e-5
    assert (logits_of_file(path) - expected).abs().max().item() <= 1e-5


def test_a_gemma2_file_with_q_k_norms_is_refused_naming_them(tmp_path: Path) -> None:
    """Gemma 2 has no QK-norm: a file that holds its tensors is not one llama.cpp would read as Gemma 2."""
    tensors = gemma_cpp_tensors(gemma2_model((50.0, 30.0)), True)
    tensors |= {f"blk.{i}.attn_q_norm.weight": np.ones(256, dtype=np.float32) for i in range(4)}
    path = write_gguf(tmp_path / "gemma2.gguf", "gemma2", gemma2_metadata(None), tensors)
    with pytest.raises(ValueError, match=r"tensors zmaj would not read: blk\.0\.attn_q_norm\.weight"):
        zgguf.load_gguf(path)


@pytest.mark.parametrize(
    ("family", "n_layers", "scalar"),
    [
        ("gemma2", 46, 16.0),
        ("gemma2", 26, 32.0),
        ("gemma2", 48, 32.0),
        ("gemma3", 62, 16.0),
        ("gemma3", 18, 32.0),
        ("gemma3", 64, 32.0),
    ],
)
def test_only_the_27b_models_scale_scores_by_the_width_per_head(
    tmp_path: Path, family: str, n_layers: int, scalar: float
) -> None:
    """llama.cpp knows the 27B models by their depth (Gemma 2's 46 layers, Gemma 3's 62), and scales their scores
    by ``(d_model / n_heads) ** -0.5``, as their configs' ``query_pre_attn_scalar`` says (here 64 / 4); every
    other size by ``head_dim ** -0.5`` (here 32), deeper ones too (llama.cpp compares the depth for equality).
    The file holds one tensor a layer, all the config reads."""
    metadata = {
        key.replace("gemma2.", f"{family}.", 1): value
        for key, value in gemma2_metadata((50.0, 30.0)).items()
        if "key_length" not in key and "value_length" not in key
    }
    metadata |= {f"{family}.block_count": n_layers, f"{family}.attention.key_length": 32}
    tensors: Tensors = {f"blk.{i}.attn_norm.weight": np.ones(64, dtype=np.float32) for i in range(n_layers)}
    config = zgguf.config_from_gguf(
        zgguf.read_gguf(write_gguf(tmp_path / "g.gguf", family, metadata, tensors))
    )
    assert isinstance(config, Gemma3Config)
    assert config.query_pre_attn_scalar == scalar
    assert config.head_dim == 32


@pytest.mark.parametrize(
    ("pattern", "layer_types"),
    [
        (4, ["sliding_attention"] * 3 + ["full_attention"]),  # a period: every 4th layer global
        (
            [False, True, True, False],
            ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        ),
        (0, ["sliding_attention"] * 4),  # llama.cpp: a period of 0 leaves no layer global
    ],
)
def test_a_sliding_window_pattern_in_the_file_says_which_layers_are_local(
    tmp_path: Path, pattern: int | list[bool], layer_types: list[str]
) -> None:
    """llama.cpp reads ``attention.sliding_window_pattern`` (a period, or a flag per layer) before it falls back
    on the architecture's own alternation; read as 1:1, these files are over 1 off."""
    model = gemma2_model((1.0, 2.0), layer_types=layer_types)
    metadata = gemma2_metadata((1.0, 2.0)) | {"gemma2.attention.sliding_window_pattern": pattern}
    path = write_gguf(tmp_path / "gemma2.gguf", "gemma2", metadata, gemma_cpp_tensors(model, True))
    config = zgguf.config_from_gguf(zgguf.read_gguf(path))
    assert isinstance(config, Gemma3Config)
    assert list(config.layer_types) == layer_types
    assert (logits_of_file(path) - reference_logits(model)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pattern", [[True, False], "2", [0.5, 0.0, 0.0, 1.0]])
def test_a_sliding_window_pattern_that_is_no_pattern_is_refused(tmp_path: Path, pattern: Any) -> None:
    tensors = gemma_cpp_tensors(gemma2_model((50.0, 30.0)), True)
    metadata = gemma2_metadata((50.0, 30.0)) | {"gemma2.attention.sliding_window_pattern": pattern}
    path = write_gguf(tmp_path / "gemma2.gguf", "gemma2", metadata, tensors)
    with pytest.raises(ValueError, match=r"gemma2\.attention\.sliding_window_pattern is .*(period|flag)"):
        zgguf.config_from_gguf(zgguf.read_gguf(path))


def test_a_gemma2_file_with_an_unembedding_of_its_own_is_refused(tmp_path: Path) -> None:
    """llama.cpp's Gemma 2 unembeds through the embedding and refuses a file that holds another matrix."""
    tensors = gemma_cpp_tensors(gemma2_model((50.0, 30.0)), True)
    tensors["output.weight"] = np.ones((VOCAB, 64), dtype=np.float32)
    path = write_gguf(tmp_path / "gemma2.gguf", "gemma2", gemma2_metadata((50.0, 30.0)), tensors)
    with pytest.raises(ValueError, match=r"Gemma 2 file with an output\.weight other than its embedding"):
        zgguf.config_from_gguf(zgguf.read_gguf(path))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_gemma_file_with_partial_rope_is_refused(tmp_path: Path, family: str) -> None:
    """llama.cpp rotates ``rope.dimension_count`` features of each head; zmaj's Gemma rotates all of them."""
    tensors = gemma_cpp_tensors(gemma2_model((50.0, 30.0)), True)
    metadata = {
        key.replace("gemma2.", f"{family}.", 1): value for key, value in gemma2_metadata((50.0, 30.0)).items()
    }
    path = write_gguf(
        tmp_path / "g.gguf", family, metadata | {f"{family}.rope.dimension_count": 128}, tensors
    )
    with pytest.raises(ValueError, match=f"{family}: RoPE over 128 of 256 head features"):
        zgguf.config_from_gguf(zgguf.read_gguf(path))
