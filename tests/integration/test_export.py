"""``save_hf`` writes folders that ``transformers`` loads offline and that compute exactly what zmaj computes.

Every exportable variant (GPT with learned or sinusoidal positions or ReLU squared, Llama with and without RoPE
scaling, Qwen 2, Qwen 3, Gemma 3 with sliding layers and a logit cap; GPTs that GPT-2 cannot express, with zmaj's
own code for them) is a small random zmaj model whose every parameter, norms and biases included, is moved off its
init value, so a dropped or misplaced tensor would show.
Each is saved with the tokenizer of a tiny trained zmaj BPE, then loaded by ``AutoModelForCausalLM`` /
``AutoTokenizer`` and by ``load_model``.
"""

import importlib.util
import inspect
import json
from dataclasses import replace
from pathlib import Path

import huggingface_hub
import pytest
import tokenizers
import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tensordict import TensorDict

from zmaj import fileio
from zmaj.convert import export, hf, zmaj_gpt
from zmaj.convert.export import INDEX_FILE, save_hf
from zmaj.convert.load import Pretrained, load_model, save_zmaj
from zmaj.data import chat_template
from zmaj.data.model_tokenizer import ModelTokenizer, bos_eos_processor
from zmaj.data.tokenizer import BOS, END, EOS, PAD, Tokenizer
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import generate
from zmaj.models.common import Batch
from zmaj.models.gemma3 import Gemma3Config
from zmaj.models.gpt import GPTConfig
from zmaj.models.llama import LlamaConfig
from zmaj.models.registry import ModelConfig, architecture
from zmaj.nn.layers import sinusoidal_positions
from zmaj.nn.rope import LinearScaling, Llama3Scaling

VOCAB = 300
TEXTS = [
    "def parse(tokens):\n    return [t.strip() for t in tokens if t]\n",
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
    "Ünïcödé, émojis 🐉 and numbers 12345 all encode to bytes.",
] * 4
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the quick fox?"},
    {"role": "assistant", "content": "A fox, quick."},
    {"role": "user", "content": "And the dog?"},
]
TINY = {"vocab_size": VOCAB, "context": 64, "d_model": 32, "n_layers": 2, "n_heads": 4}
LLAMA = TINY | {"n_kv_heads": 2, "d_ff": 48}
VARIANTS: dict[str, ModelConfig] = {
    "gpt": GPTConfig(**TINY),
    "gpt-sinusoidal": GPTConfig(
        **TINY, positions="sinusoidal", bias=False, tie_embeddings=False, d_ff=40, activation="relu"
    ),
    "gpt-relu2": GPTConfig(**TINY, activation="relu2", tie_embeddings=False),
    # One layer has no skip to make: the flag (kept by a shrunk default spec) computes nothing, so GPT-2 can.
    "gpt-one-layer-skips": GPTConfig(**TINY | {"n_layers": 1}, unet_skips=True),
    # GPT-2 cannot express these: they go with zmaj's code for them (zmaj.convert.zmaj_gpt). The default
    # pre-training spec's model, shrunk; every option at once, three layers (the middle one unskipped); the
    # options around a position table or sinusoids.
    "gpt-modern": GPTConfig(
        **TINY | {"n_layers": 4},
        positions="rope",
        norm="rmsnorm",
        activation="gelu",
        qk_norm=True,
        bias=False,
        unet_skips=True,
    ),
    "gpt-everything": GPTConfig(
        **TINY | {"n_layers": 3},
        d_ff=40,
        positions="rope",
        rope_base=500.0,
        norm="rmsnorm",
        norm_eps=1e-6,
        activation="relu2",
        qk_norm=True,
        tie_embeddings=False,
        logit_softcap=2.0,  # small enough that these logits reach it
        value_embeds=1,
        unet_skips=True,
    ),
    "gpt-learned-values": GPTConfig(**TINY, bias=False, value_embeds=1, activation="silu", logit_softcap=3.0),
    "gpt-sinusoidal-skips": GPTConfig(**TINY, positions="sinusoidal", unet_skips=True, dropout=0.1),
    "llama": LlamaConfig(**LLAMA, activation="gelu_tanh"),
    "llama3": LlamaConfig(
        **LLAMA,
        tie_embeddings=True,
        rope_scaling=Llama3Scaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
        ),
    ),
    "llama-linear": LlamaConfig(**LLAMA, rope_base=500.0, rope_scaling=LinearScaling(factor=4.0)),
    "qwen2": LlamaConfig(**LLAMA, qkv_bias=True, tie_embeddings=True),
    "qwen3": LlamaConfig(**LLAMA, qk_norm=True, head_dim=12),
    "mistral": LlamaConfig(**LLAMA, sliding_window=5),
    "smollm3": LlamaConfig(**LLAMA, rope_layers=(False, True), tie_embeddings=True),
    "gemma3": Gemma3Config(
        **TINY | {"n_layers": 3},
        n_kv_heads=2,
        head_dim=8,
        d_ff=48,
        layer_types=("sliding_attention", "sliding_attention", "full_attention"),
        sliding_window=5,
        rope_scaling=LinearScaling(factor=2.0),
        query_pre_attn_scalar=12,
        final_logit_softcap=2.0,
    ),
}
# Caps these small values reach, so an export that dropped one would compute other logits.
VARIANTS["gemma2"] = Gemma3Config.model_validate(
    VARIANTS["gemma3"].model_dump()
    | {
        "layer_types": ("sliding_attention", "full_attention", "sliding_attention"),
        "rope_base": 100.0,
        "rope_scaling": None,
        "local_rope_base": 100.0,
        "query_pre_attn_scalar": 8,
        "qk_norm": False,
        "attn_logit_softcap": 0.5,
    }
)
HF_CLASSES = {
    "gpt": "GPT2LMHeadModel",
    "gpt-sinusoidal": "GPT2LMHeadModel",
    "gpt-relu2": "GPT2LMHeadModel",
    "gpt-one-layer-skips": "GPT2LMHeadModel",
    "gpt-modern": "ZmajGPTForCausalLM",
    "gpt-everything": "ZmajGPTForCausalLM",
    "gpt-learned-values": "ZmajGPTForCausalLM",
    "gpt-sinusoidal-skips": "ZmajGPTForCausalLM",
    "llama": "LlamaForCausalLM",
    "llama3": "LlamaForCausalLM",
    "llama-linear": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may come from the Hub: a folder that needed it would fail here."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    zmaj_tokenizer = Tokenizer.train(TEXTS, VOCAB)
    assert zmaj_tokenizer.vocab_size == VOCAB
    return ModelTokenizer.from_zmaj(zmaj_tokenizer)


def random_model(config: ModelConfig, tokenizer: ModelTokenizer, seed: int = 0) -> Pretrained:
    """A zmaj model whose parameters are all off their init values (norms off one or zero, biases off zero)."""
    params = architecture(config).init(config, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    moved = params.apply(lambda t: t + 0.1 * torch.randn(t.shape, generator=generator))
    assert isinstance(moved, TensorDict)
    return Pretrained(config, moved, tokenizer)


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(
    request: pytest.FixtureRequest, tokenizer: ModelTokenizer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Pretrained, Path]:
    model = random_model(VARIANTS[request.param], tokenizer)
    folder = save_hf(model, tmp_path_factory.mktemp("export") / request.param)
    return request.param, model, folder


OWN_CODE = [name for name, hf_class in HF_CLASSES.items() if hf_class == zmaj_gpt.ARCHITECTURE]


def hf_model(folder: Path) -> transformers.PreTrainedModel:
    """The folder's model as ``transformers`` loads it; with the folder's own code only where it has some, so
    that every other folder is shown to load without it."""
    own_code = (folder / zmaj_gpt.CODE.name).exists()
    model: transformers.PreTrainedModel = transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=own_code
    ).eval()
    return model


def test_transformers_logits_equal_zmaj(exported: tuple[str, Pretrained, Path]) -> None:
    name, model, folder = exported
    reference = hf_model(folder)
    assert type(reference).__name__ == HF_CLASSES[name]
    assert reference.dtype == torch.float32
    # Longer than the sliding window, and two rows.
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = reference(tokens).logits
        ours = model.architecture.logits(model.params, Batch(tokens=tokens), model.config)
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_greedy_continuation_equals_zmaj(exported: tuple[str, Pretrained, Path]) -> None:
    """Both generate 8 tokens, stopping at the same stop tokens (transformers reads them from
    ``generation_config.json``)."""
    _, model, folder = exported
    prompt = model.tokenizer.encode("The quick brown fox")
    cache = init_cache(model.config, 1, len(prompt) + 8)
    step = model.architecture.cached(model.config)
    [ours] = generate(step, model.params, cache, [prompt], 8, stop_tokens=model.tokenizer.stop_ids)
    with torch.no_grad():
        theirs = hf_model(folder).generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)  # type: ignore[operator]
    assert ours == theirs[0, len(prompt) :].tolist()


def test_round_trip_is_exact(exported: tuple[str, Pretrained, Path]) -> None:
    """zmaj -> Hugging Face -> zmaj gives the same config and parameters, bit for bit; a GPT without biases or
    with sinusoidal positions comes back with zero biases and the sinusoids as a learned table."""
    name, model, folder = exported
    back = load_model(folder)
    if name == "gpt-sinusoidal":
        assert isinstance(model.config, GPTConfig)
        assert back.config == model.config.model_copy(update={"positions": "learned", "bias": True})
        tokens = torch.randint(
            0, VOCAB, (1, model.config.context), generator=torch.Generator().manual_seed(3)
        )
        with torch.no_grad():
            before = model.architecture.logits(model.params, Batch(tokens=tokens), model.config)
            after = back.architecture.logits(back.params, Batch(tokens=tokens), back.config)
        assert torch.equal(before, after)
        table = sinusoidal_positions(torch.arange(model.config.context), model.config.d_model)
        assert torch.equal(back.params["positions", "weight"], table)
        biases = [
            t for key, t in back.params.items(True, True) if key[-1] == "bias" and isinstance(t, torch.Tensor)
        ]
        assert biases
        assert all(torch.equal(t, torch.zeros_like(t)) for t in biases)
        kept = set(model.params.keys(True, True))
    else:
        # The one-layer model's unet_skips computes nothing (its weight is empty): it comes back without it.
        one_layer = name == "gpt-one-layer-skips"
        unused = {"unet_skips": False} if one_layer else {}
        assert back.config == model.config.model_copy(update=unused)
        kept = set(back.params.keys(True, True))
        assert kept == set(model.params.keys(True, True)) - (
            {("unet_skips", "weight")} if one_layer else set()
        )
    for key in kept:
        assert torch.equal(back.params.get(key), model.params.get(key)), key
    assert back.tokenizer.tokenizer.get_vocab() == model.tokenizer.tokenizer.get_vocab()
    assert all(back.tokenizer.encode(text) == model.tokenizer.encode(text) for text in TEXTS)
    assert replace(back.tokenizer, tokenizer=model.tokenizer.tokenizer) == model.tokenizer


def test_own_code_goes_with_exactly_the_gpts_gpt2_cannot_express(
    exported: tuple[str, Pretrained, Path],
) -> None:
    name, _, folder = exported
    config = json.loads((folder / "config.json").read_text())
    code = folder / zmaj_gpt.CODE.name
    if name in OWN_CODE:
        assert code.read_bytes() == zmaj_gpt.CODE.read_bytes()
        assert config["auto_map"] == zmaj_gpt.AUTO_MAP
        assert config["model_type"] == zmaj_gpt.MODEL_TYPE
    else:
        assert not code.exists()
        assert "auto_map" not in config


def padded_rows(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of random tokens, the first left-padded by 5 and the second right-padded by 4, and their mask."""
    tokens = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, -4:] = 0
    return tokens, mask


@pytest.mark.parametrize("name", OWN_CODE)
def test_own_code_reads_padded_rows_and_generates_in_batches_as_zmaj(
    name: str, tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """Padding (keys masked, positions counted over real tokens, as zmaj's cached forward counts them) and
    ``generate`` on a left-padded batch, with and without its key/value cache; the loss ``labels`` give."""
    model = random_model(VARIANTS[name], tokenizer)
    reference = hf_model(save_hf(model, tmp_path / name))
    tokens, mask = padded_rows(24)
    batch = Batch(tokens=tokens, is_token=mask.bool(), positions=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        theirs = reference(tokens, attention_mask=mask).logits
        ours = model.architecture.logits(model.params, batch, model.config)
        assert (theirs - ours)[mask.bool()].abs().max().item() <= 1e-5
        assert theirs.isfinite().all()
        # A padding query sees itself: a row of scores all masked is NaN in SDPA kernels without torch's guard.
        assert type(reference)._mask(mask, 2, 24, 0, tokens.device).any(-1).all()  # type: ignore[attr-defined]
        unpadded = model.architecture.logits(model.params, Batch(tokens=tokens), model.config)
        loss = torch.nn.functional.cross_entropy(unpadded[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        assert abs(reference(tokens, labels=tokens).loss.item() - loss.item()) <= 1e-5

    prompts = [tokenizer.encode("The quick brown fox"), tokenizer.encode("A dog")]
    cache = init_cache(model.config, 2, max(map(len, prompts)) + 8)
    step = model.architecture.cached(model.config)
    greedy = generate(step, model.params, cache, prompts, 8, stop_tokens=tokenizer.stop_ids)
    width = max(map(len, prompts))
    assert tokenizer.pad_id is not None
    ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in prompts])
    left = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for use_cache in (True, False):
        with torch.no_grad():
            out = reference.generate(  # type: ignore[operator]
                ids, attention_mask=left, max_new_tokens=8, do_sample=False, use_cache=use_cache
            )
        for row, ours_row in zip(out[:, width:].tolist(), greedy, strict=True):
            assert row[: len(ours_row)] == ours_row, use_cache  # a row that stopped is padded after its stop


def test_own_code_builds_a_fresh_model_with_the_folders_tensors(
    tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """``from_config`` (to train in ``transformers`` from scratch) builds the same tensors, initialised as
    ``gpt.init`` initialises them: norms and skip weights at one, biases at zero, residual projections smaller."""
    model = random_model(VARIANTS["gpt-everything"], tokenizer)
    loaded = hf_model(save_hf(model, tmp_path / "model"))
    fresh = transformers.AutoModelForCausalLM.from_config(loaded.config, trust_remote_code=True)
    shapes = {name: t.shape for name, t in fresh.state_dict().items()}
    assert shapes == {name: t.shape for name, t in loaded.state_dict().items()}
    tensors = dict(fresh.state_dict())
    for name, tensor in tensors.items():
        if "norm" in name or name == "unet_skips.weight":
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith("bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
    std = VARIANTS["gpt-everything"].init_std
    assert abs(tensors["blocks.0.attn.q.weight"].std().item() - std) < 0.2 * std
    assert abs(tensors["blocks.0.attn.o.weight"].std().item() - std / 6**0.5) < 0.2 * std / 6**0.5


def test_own_code_trains_in_transformers_trainer_with_gradient_accumulation_as_without(
    tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """One SGD step on 4 rows, whole or as 2 accumulated halves, moves the weights alike. Trainer reads a forward
    with ``**kwargs`` as one that sums its loss over ``num_items_in_batch`` and stops dividing by the
    accumulation steps, which made the accumulated step twice as large (``accepts_loss_kwargs = False``)."""
    folder = save_hf(random_model(VARIANTS["gpt-modern"], tokenizer), tmp_path / "model")
    rows = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(6))
    data = [{"input_ids": row, "labels": row} for row in rows]

    def update(batch: int, accumulate: int) -> torch.Tensor:
        model = hf_model(folder).train()
        before = model.embed.weight.detach().clone()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"run-{batch}"),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate,
            max_steps=1,
            learning_rate=1.0,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=1e9,
            weight_decay=0.0,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
        )
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
        return model.embed.weight.detach() - before

    whole, halves = update(4, 1), update(2, 2)
    assert whole.abs().max().item() > 1e-3
    assert (whole - halves).abs().max().item() <= 1e-5 * whole.abs().max().item() + 1e-7


def test_own_code_gives_hidden_states_and_refuses_what_it_does_not_compute(
    tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """``output_hidden_states``: each block's input, then the final norm's output (as transformers' Llama gives
    them), equal to zmaj's; attention weights, embeddings for input and a static cache are refused by name;
    so is resizing the vocabulary of a model whose value embeddings are indexed by token."""
    model = random_model(VARIANTS["gpt-everything"], tokenizer)
    reference = hf_model(save_hf(model, tmp_path / "model"))
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        hidden = reference(tokens, output_hidden_states=True).hidden_states
        final = model.architecture.hidden_states(model.params, Batch(tokens=tokens), model.config)
    assert len(hidden) == model.config.n_layers + 1
    assert (hidden[-1] - final).abs().max().item() <= 1e-5
    assert torch.equal(hidden[0], model.params["embed", "weight"][tokens])
    with pytest.raises(ValueError, match="SDPA, which returns no attention weights"):
        reference(tokens, output_attentions=True)
    with pytest.raises(ValueError, match="reads token ids"):
        reference(inputs_embeds=torch.zeros(1, 3, 32))
    static = transformers.StaticCache(config=reference.config, max_cache_len=32)
    with pytest.raises(ValueError, match="DynamicCache only, not a static one"):
        reference(tokens, cache=static)
    with pytest.raises(ValueError, match="value embedding tables are indexed by token too"):
        reference.resize_token_embeddings(VOCAB + 8)
    untied = hf_model(
        save_hf(
            random_model(VARIANTS["gpt-modern"].model_copy(update={"tie_embeddings": False}), tokenizer),
            tmp_path / "untied",
        )
    )
    untied.resize_token_embeddings(VOCAB + 8)
    with torch.no_grad():
        assert untied(tokens).logits.shape[-1] == VOCAB + 8


def test_own_codes_config_takes_every_field_zmaj_writes() -> None:
    """``ZmajGPTConfig`` takes ``**kwargs`` (transformers' own keys), so a ``GPTConfig`` field added without a
    place in it would be stored and ignored by the model's code: its parameters are the fields written."""
    spec = importlib.util.spec_from_file_location("modeling_zmaj_gpt", zmaj_gpt.CODE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    taken = set(inspect.signature(module.ZmajGPTConfig.__init__).parameters) - {"self", "kwargs", "use_cache"}
    written = set(hf.config_to_hf(VARIANTS["gpt-everything"])) - {
        "model_type",
        "architectures",
        "auto_map",
    }
    assert taken == written


def test_a_damaged_own_code_folder_is_refused_by_name(tokenizer: ModelTokenizer, tmp_path: Path) -> None:
    folder = save_hf(random_model(VARIANTS["gpt-modern"], tokenizer), tmp_path / "model")
    weights = folder / export.WEIGHTS_FILE
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "blocks.1.attn.q_norm.weight"}, weights)
    with pytest.raises(ValueError, match=r"no tensor 'blocks\.1\.attn\.q_norm\.weight'"):
        load_model(folder)
    save_file(tensors | {"blocks.4.attn.q.weight": tensors["blocks.0.attn.q.weight"].clone()}, weights)
    with pytest.raises(ValueError, match=r"tensors this config does not: \['blocks.4.attn.q.weight'\]"):
        load_model(folder)
    save_file(tensors, weights)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"n_heads": 5}))
    with pytest.raises(ValueError, match=r"d_model \(32\) must be divisible by n_heads \(5\)"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(config | {"positions": "alibi"}))
    with pytest.raises(ValueError, match=r"config\.json: positions: Input should be 'learned'") as refused:
        load_model(folder)
    assert "\n" not in str(refused.value)


def test_config_files_name_the_special_tokens(
    exported: tuple[str, Pretrained, Path], tokenizer: ModelTokenizer
) -> None:
    _, _, folder = exported
    ids = {name: tokenizer.token_id(token) for name, token in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == {
        "bos_token_id": ids["bos"],
        "eos_token_id": [ids["eos"], tokenizer.token_id(END)],
        "pad_token_id": ids["pad"],
    }
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert {key: config[key] for key in generation} == generation


def test_eos_comes_first_among_the_stop_tokens(tokenizer: ModelTokenizer, tmp_path: Path) -> None:
    """Both files list EOS first whatever the ids' order (``transformers`` pads with the first when there is no
    pad token), and the folder loads back with the same stop tokens in the same order."""
    ending_turns = replace(tokenizer, eos_token=END, stop_tokens=(EOS,), pad_token=None)
    folder = save_hf(random_model(VARIANTS["gpt"], ending_turns), tmp_path / "model")
    end, eos = tokenizer.token_id(END), tokenizer.token_id(EOS)
    assert end is not None
    assert eos is not None
    assert end > eos  # sorted ids would not put this EOS first
    ids = [end, eos]
    for name in ("config.json", "generation_config.json"):
        assert json.loads((folder / name).read_text())["eos_token_id"] == ids, name
    assert load_model(folder).tokenizer.stop_ids == tuple(ids)


@pytest.mark.parametrize("add_bos", [False, True])
def test_autotokenizer_encodes_as_zmaj(add_bos: bool, tokenizer: ModelTokenizer, tmp_path: Path) -> None:
    """Plain texts (special-token text included, parsed as in transformers), a chat in zmaj's default template,
    and decoding; with a BOS-adding post-processor too, as Llama's tokenizers have."""
    if add_bos:
        rebuilt = tokenizers.Tokenizer.from_str(tokenizer.tokenizer.to_str())
        rebuilt.post_processor = bos_eos_processor(rebuilt, BOS, None)
        tokenizer = ModelTokenizer(
            rebuilt,
            BOS,
            EOS,
            PAD,
            add_bos=True,
            chat_template=chat_template.DEFAULT_TEMPLATE,
            stop_tokens=(END,),
        )
    folder = save_hf(random_model(VARIANTS["gpt"], tokenizer), tmp_path / "model")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in [*TEXTS[:3], "", " leading space", f"a{EOS}b {END}", "🐉🐉"]:
        ids = tokenizer.encode(text)
        assert theirs.encode(text) == ids, text
        assert (ids[:1] == [tokenizer.bos_id]) == add_bos
        assert theirs.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
    for generation_prompt in (True, False):
        chat = theirs.apply_chat_template(
            CHAT, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
        )
        assert chat == tokenizer.encode_chat(CHAT, generation_prompt)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (BOS, EOS, PAD)
    # transformers 4's fast tokenizer adds token_type_ids unless told not to, which generate(**inputs) refuses.
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_input_names"] == [
        "input_ids",
        "attention_mask",
    ]
    assert set(theirs("def ")) == {"input_ids", "attention_mask"}


def test_shards_past_the_limit_and_loads_back(tokenizer: ModelTokenizer, tmp_path: Path) -> None:
    model = random_model(VARIANTS["llama"], tokenizer)
    limit = 20_000
    folder = save_hf(model, tmp_path / "sharded", max_shard_bytes=limit)
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert sorted(p.name for p in folder.glob("model-*.safetensors")) == shards
    total = 0
    for shard in shards:
        with safe_open(folder / shard, framework="pt") as f:
            sizes = [f.get_tensor(name).numel() * 4 for name in f.keys()]  # noqa: SIM118
            assert sorted(f.keys()) == sorted(n for n, s in index["weight_map"].items() if s == shard)
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    back = load_model(folder)
    for key in model.params.keys(True, True):
        assert torch.equal(back.params.get(key), model.params.get(key))
    tokens = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = hf_model(folder)(tokens).logits
        ours = model.architecture.logits(model.params, Batch(tokens=tokens), model.config)
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_replaces_an_existing_folder_whole(tokenizer: ModelTokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "stale.txt").write_text("from an older save")
    save_hf(random_model(VARIANTS["llama"], tokenizer), folder, max_shard_bytes=20_000)
    save_hf(random_model(VARIANTS["gpt"], tokenizer), folder)
    assert not (folder / "stale.txt").exists()
    assert not (folder / INDEX_FILE).exists()
    assert not list(folder.glob("model-*"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert isinstance(load_model(folder).config, GPTConfig)


def test_a_failed_write_leaves_the_old_folder_and_no_staging(
    tokenizer: ModelTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills mid-save: the old folder stays as it was, and no hidden half-written copy piles up."""
    folder = tmp_path / "model"
    save_hf(random_model(VARIANTS["gpt"], tokenizer), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(*args: object, **kwargs: object) -> None:
        # What safetensors raises on a full disk: its own error, not an OSError (the programs' tracebacks).
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(fileio, "save_file", disk_full)
    with pytest.raises(OSError, match=r"cannot write .*model\.safetensors: .*No space left"):
        save_hf(random_model(VARIANTS["llama"], tokenizer), folder)
    with pytest.raises(OSError, match=r"cannot write .*params\.safetensors: .*No space left"):
        save_zmaj(random_model(VARIANTS["llama"], tokenizer), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_every_file_is_on_disk_before_the_folder_is_renamed_into_place(
    tokenizer: ModelTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a checkpoint's: a power cut after the rename must not publish files whose bytes were cached only."""
    flushed: list[Path] = []
    flush = fileio.fsync

    def recorded(path: Path) -> None:
        flushed.append(path)
        flush(path)

    monkeypatch.setattr(fileio, "fsync", recorded)
    folder = save_hf(random_model(VARIANTS["gpt"], tokenizer), tmp_path / "model", max_shard_bytes=20_000)
    staging = flushed[-2]  # the staging folder itself, then the parent once the rename is done
    assert staging.name.startswith(".model.")
    assert flushed[-1] == tmp_path
    # (the tokenizer's files, each written whole, flush the staging folder as they go too)
    files = {p.relative_to(staging) for p in flushed[:-2] if p != staging}
    assert files == {p.relative_to(folder) for p in folder.rglob("*")}
    assert len(files) > 5  # config, generation config, shards and their index, tokenizer files


REFUSED: list[tuple[ModelConfig, str]] = [
    (LlamaConfig(**LLAMA, qkv_bias=True, qk_norm=True), "qk_norm"),
    (LlamaConfig(**LLAMA, qk_norm=True, sliding_window=5), "qk_norm=True with sliding_window=5"),
    (LlamaConfig(**LLAMA, sliding_window=5, rope_layers=(True, False)), "sliding_window=5 with rope_layers"),
    (
        Gemma3Config(**TINY, n_kv_heads=2, head_dim=8, d_ff=48, query_pre_attn_scalar=12.5),
        "query_pre_attn_scalar",
    ),
    (
        Gemma3Config(**TINY, n_kv_heads=2, head_dim=8, d_ff=48, attn_logit_softcap=50.0),
        "qk_norm and attn_logit_softcap",
    ),
    # Without QK-norm it is Gemma 2, whose layers all rotate alike (here the default 1M and 10k bases).
    (Gemma3Config(**TINY, n_kv_heads=2, head_dim=8, d_ff=48, qk_norm=False), "rotate otherwise"),
    # transformers' Llama and Gemma configs refuse a width that is not a whole number of heads, head_dim or not.
    (LlamaConfig(**LLAMA | {"d_model": 36, "n_heads": 8}, head_dim=8), "d_model=36 with n_heads=8"),
    (
        Gemma3Config(**TINY | {"d_model": 36, "n_heads": 8}, n_kv_heads=2, head_dim=8, d_ff=48),
        "d_model=36 with n_heads=8: transformers' Gemma3ForCausalLM refuses",
    ),
]


@pytest.mark.parametrize(("config", "setting"), REFUSED)
def test_inexpressible_settings_are_refused_by_name(
    config: ModelConfig, setting: str, tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    (tmp_path / "kept").mkdir()
    # Folders above the destination that the save made are removed with it: they were left behind, empty.
    for destination in (
        tmp_path / "model",
        tmp_path / "new" / "a" / "model",
        tmp_path / "kept" / "b" / "model",
    ):
        with pytest.raises(ValueError, match=setting):
            save_hf(random_model(config, tokenizer), destination)
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"]
    assert list((tmp_path / "kept").iterdir()) == []


def test_mixed_dtypes_are_refused(tokenizer: ModelTokenizer, tmp_path: Path) -> None:
    """transformers casts a whole model to one ``dtype``, so a mixed one would not load as it is."""
    model = random_model(VARIANTS["llama"], tokenizer)
    model.params["final_norm", "weight"] = model.params["final_norm", "weight"].to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtypes"):
        save_hf(model, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("switch", "value"),
    [
        ("scale_attn_by_inverse_layer_idx", True),
        ("scale_attn_weights", False),
        ("add_cross_attention", True),
        ("activation_function", "quick_gelu"),
    ],
)
def test_loading_refuses_gpt2_switches_zmaj_lacks(switch: str, value: object) -> None:
    """The read direction of the same mapping: a GPT-2 config.json that zmaj's GPT would compute differently."""
    written = hf.config_to_hf(VARIANTS["gpt"])
    assert hf.config_from_hf(written) == VARIANTS["gpt"]
    with pytest.raises(ValueError, match=switch):
        hf.config_from_hf(written | {switch: value})


def test_a_shard_copies_the_views_and_writes_its_own_tensors_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers of a stacked parameter share its memory, so each is copied; a tensor of its own is not (copying
    every tensor held the whole model twice)."""
    stacked, own = torch.randn(3, 4, 5), torch.randn(4, 5)
    written: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(fileio, "save_file", lambda shard, path, metadata: written.update(shard))
    export._write_shard({"a": stacked[0], "b": stacked[1], "own": own}, ["a", "b", "own"], tmp_path / "x")
    assert written["own"].data_ptr() == own.data_ptr()
    for name, layer in (("a", 0), ("b", 1)):
        assert torch.equal(written[name], stacked[layer])
        assert written[name].untyped_storage().data_ptr() != stacked.untyped_storage().data_ptr()
