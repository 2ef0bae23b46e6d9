"""Fine-tuning helpers: prompt tokens get exactly zero gradient, data order is a pure function of the step,
batches line targets and masks up with the tokens, evaluation scores with the checker, and specs refuse what
cannot work."""

import argparse
import errno
import json
import os
import shutil
import weakref
from datetime import date, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from tensordict import TensorDict

from tests.integration import finetune_fixtures
from tests.unit.train.test_loop import logged
from zmaj import checkpoint
from zmaj.convert.load import Pretrained, load_model, resolve, save_zmaj
from zmaj.models import llama, lora
from zmaj.specfile import SpecError
from zmaj.tasks import FEW_SHOT_STOP, accuracy_interval, get_task
from zmaj.train import finetune, runs
from zmaj.train.optim import leaf_keys
from zmaj.train.parallel import Parallel
from zmaj.train.spec import parse
from zmaj.train.step import accumulate_grads, bind, init_state

TOKENIZER = finetune_fixtures.tokenizer()
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5\nAnswer: 5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "Answer: 8"},
]


def test_sft_example_marks_exactly_the_assistant_turns() -> None:
    ids, mask = finetune.sft_example(TOKENIZER, CONVERSATION, 512, "sample")
    assistant = TOKENIZER.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert assistant == "2 + 3 = 5\nAnswer: 5<|end|>Answer: 8<|end|>"


def test_a_conversation_cut_before_its_answer_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="conversation 7: no assistant token within the first 4 tokens"):
        finetune.sft_example(TOKENIZER, CONVERSATION, 4, "conversation 7")


@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(2, 12), min_size=1, max_size=4))
def test_masked_batch_targets_are_the_next_tokens_and_learned_only_where_flagged(
    seed: int, lengths: list[int]
) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, 50, (n,), generator=generator).tolist()
        flags = (torch.rand(n, generator=generator) < 0.5).tolist()
        rows.append((ids, flags))
    batch = finetune.masked_batch(rows)
    assert batch.targets is not None
    assert batch.loss_mask is not None
    for row, (ids, flags) in enumerate(rows):
        for t in range(batch.tokens.shape[1]):
            real = t + 1 < len(ids)
            assert bool(batch.loss_mask[row, t]) == (real and flags[t + 1])
            if real:
                assert (int(batch.tokens[row, t]), int(batch.targets[row, t])) == (ids[t], ids[t + 1])


def test_prompt_tokens_get_exactly_zero_gradient(device: torch.device) -> None:
    """Changing what a prompt position "should" predict (its target) changes neither the loss nor the grads."""
    config = finetune_fixtures.CONFIG
    params = llama.init(config, 0, device)
    forward = bind(llama.forward, config=config)
    rows = [
        finetune.sft_example(TOKENIZER, CONVERSATION, 512, "a"),
        finetune.sft_example(TOKENIZER, CONVERSATION[:3], 512, "b"),
    ]
    batch = finetune.masked_batch(rows).to(device)
    assert batch.targets is not None
    assert batch.loss_mask is not None
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, config.vocab_size, batch.targets.shape, generator=generator).to(device)
    perturbed = type(batch)(
        tokens=batch.tokens,
        targets=torch.where(batch.loss_mask, batch.targets, noise),
        loss_mask=batch.loss_mask,
    )
    assert perturbed.targets is not None
    assert not torch.equal(perturbed.targets, batch.targets)
    grads, loss, _ = accumulate_grads(params, [batch], forward, [None])
    grads2, loss2, _ = accumulate_grads(params, [perturbed], forward, [None])
    assert torch.equal(loss, loss2)
    for key in grads.keys(True, True):
        assert torch.equal(grads.get(key), grads2.get(key)), key


@given(n=st.integers(1, 9), seed=st.integers(0, 100), start=st.integers(0, 40), count=st.integers(1, 30))
def test_the_data_stream_is_whole_epochs_and_a_pure_function_of_the_position(
    n: int, seed: int, start: int, count: int
) -> None:
    stream = finetune.draw(n, seed, 0, start + count)
    assert finetune.draw(n, seed, start, count) == stream[start:]
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))


def tiny_model() -> Pretrained:
    config = finetune_fixtures.CONFIG
    return Pretrained(config, llama.init(config, 0), TOKENIZER)


def test_evaluate_task_scores_with_the_checker_and_a_wilson_interval() -> None:
    task = get_task("always-right")
    result = finetune.evaluate_task(
        tiny_model(), task, task.problems("test", 5), max_new_tokens=3, batch_size=2
    )
    assert (result.n, result.accuracy, result.format_rate) == (5, 1.0, 1.0)
    assert (result.low, result.high) == accuracy_interval(5, 5)[1:]
    arithmetic = get_task("arithmetic", digits=1)
    wrong = finetune.evaluate_task(
        tiny_model(), arithmetic, arithmetic.problems("test", 4), max_new_tokens=3, batch_size=4, few_shot=2
    )
    assert wrong.accuracy == 0.0  # a random model writes no "Answer:" line
    assert 1 <= wrong.mean_length <= 3


def test_batched_answers_equal_one_at_a_time() -> None:
    """Left padding and batching change nothing about a greedy answer."""
    prompts = [
        TOKENIZER.encode_chat([{"role": "user", "content": text}]) for text in ("What is 1 + 1?", "Hi", "eee")
    ]
    together = finetune.sample_answers(tiny_model(), prompts, 5, batch_size=3)
    alone = [finetune.sample_answers(tiny_model(), [p], 5, batch_size=1)[0] for p in prompts]
    assert together == alone


def test_evaluate_task_reads_an_answer_cut_by_the_token_limit_without_its_last_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same right answer twice, once ended by a stop token and once by the limit, which may have cut it."""
    task = get_task("arithmetic", digits=1)
    problems = task.problems("test", 2)
    (stop, *_) = TOKENIZER.stop_ids
    answers = [TOKENIZER.encode(f"Answer: {p.answer}", add_special_tokens=False) for p in problems]
    monkeypatch.setattr(finetune, "sample_answers", lambda *args, **kwargs: [answers[0], [*answers[1], stop]])
    result = finetune.evaluate_task(tiny_model(), task, problems, max_new_tokens=8, batch_size=2)
    assert (result.accuracy, result.format_rate) == (0.5, 0.5)
    assert result.completions == tuple(f"Answer: {p.answer}" for p in problems)  # shown whole


def test_an_answer_stopped_by_itself_at_a_stop_token_or_few_shot_at_the_blank_line() -> None:
    (stop, *_) = TOKENIZER.stop_ids
    line = TOKENIZER.encode("Answer: 2", add_special_tokens=False)
    blank = TOKENIZER.encode(f"Answer: 2{FEW_SHOT_STOP}", add_special_tokens=False)
    for few_shot in (False, True):
        assert finetune.stopped_by_itself(TOKENIZER, [*line, stop], few_shot)
        assert not finetune.stopped_by_itself(TOKENIZER, line, few_shot)
        assert not finetune.stopped_by_itself(TOKENIZER, [], few_shot)
        assert finetune.stopped_by_itself(TOKENIZER, blank, few_shot) == few_shot


def test_a_few_shot_completion_is_cut_at_the_blank_line() -> None:
    ids = TOKENIZER.encode(f"1 + 1 = 2\nAnswer: 2{FEW_SHOT_STOP}Question: What", add_special_tokens=False)
    assert finetune.completion_text(TOKENIZER, ids, few_shot=True) == "1 + 1 = 2\nAnswer: 2"


def test_a_lora_target_that_matches_nothing_is_named() -> None:
    spec = parse(
        finetune.SFTSpec,
        {
            "name": "x",
            "model": "m",
            "lora": {"targets": ["attn.q", "attn.nope"]},
            "train": {"steps": 1, "batch_size": 1},
            "data": {"kind": "task", "task": "arithmetic", "n": 1},
        },
        "spec",
    )
    begin = finetune.Start(tiny_model(), "m")
    with pytest.raises(SpecError, match=r"lora\.targets: LoRA target 'attn\.nope' matches no matrix"):
        finetune.trainable(spec, begin, Parallel())


SFT = {
    "name": "x",
    "model": "m",
    "train": {"steps": 1, "batch_size": 2},
    "data": {"kind": "task", "task": "arithmetic", "n": 1},
}
GRPO = {
    "name": "x",
    "model": "m",
    "train": {"steps": 1, "prompts_per_step": 2},
    "task": {"name": "arithmetic"},
}
DPO = {
    "name": "x",
    "model": "m",
    "train": {"steps": 1, "batch_size": 2},
    "pairs": {"kind": "task", "task": {"name": "arithmetic"}, "n_prompts": 2},
}
FSDP = Parallel(kind="fsdp", rank=0, size=2)


@pytest.mark.parametrize(
    ("kind", "raw", "parallel", "reads_start"),
    [
        (finetune.SFTSpec, SFT, Parallel(), False),
        (finetune.SFTSpec, SFT, FSDP, False),
        (finetune.GRPOSpec, GRPO, Parallel(), False),  # no KL penalty: no reference
        (finetune.GRPOSpec, {**GRPO, "grpo": {"kl_beta": 0.1}}, Parallel(), True),
        (finetune.GRPOSpec, {**GRPO, "grpo": {"kl_beta": 0.1}, "reference": "r"}, Parallel(), False),
        (finetune.DPOSpec, DPO, Parallel(), True),
        (finetune.DPOSpec, DPO, FSDP, True),
        (finetune.SFTSpec, {**SFT, "lora": {"targets": ["attn.q"]}}, Parallel(), True),
    ],
)
def test_a_run_holds_one_copy_of_the_starting_weights_and_a_second_only_to_read_them(
    kind: type[finetune.FinetuneSpec], raw: dict[str, Any], parallel: Parallel, reads_start: bool
) -> None:
    """Full fine-tuning trains the model's own tensors where nothing reads the starting model again (the start
    keeps their shapes, on the meta device), and a copy where something does (DPO's reference, GRPO's KL
    penalty's), so that training never writes into it; fully sharded, the trained share is a copy of this rank's
    pieces. A second copy of the weights beside AdamW's state was a fifth of full fine-tuning's memory."""
    spec = parse(kind, raw, "spec")
    base = tiny_model()
    owned, after = finetune.trainable(spec, finetune.Start(base, "m"), parallel)
    kept = after.model.params
    base_storage = {base.params.get(key).data_ptr() for key in base.params.keys(True, True)}
    for key in kept.keys(True, True):
        assert (kept.get(key).device.type != "meta") == reads_start, key
        assert kept.get(key).shape == base.params.get(key).shape, key
    if spec.lora is not None:
        assert set(owned.keys(True, True)).isdisjoint(base.params.keys(True, True))
        return
    for key in leaf_keys(owned):
        piece = parallel.piece(base.params, key, base.params.get(key))
        assert torch.equal(owned.get(key), piece), key
        shared = owned.get(key).data_ptr() in base_storage
        assert shared == (not reads_start and not parallel.sharded), key
    # A resume reads the checkpoint into the shapes alone: no values of the start are kept beside it.
    shapes, resumed = finetune.trainable(spec, finetune.Start(base, "m"), parallel, resuming=True)
    for key in leaf_keys(owned):
        assert shapes.get(key).device.type == "meta", key
        assert shapes.get(key).shape == owned.get(key).shape, key
    for key in kept.keys(True, True):  # nor does the start keep them, unless the run reads it
        assert (resumed.model.params.get(key).device.type != "meta") == reads_start, key


@pytest.mark.parametrize(
    ("kind", "raw", "reads_start"),
    [
        (finetune.SFTSpec, SFT, False),
        (finetune.SFTSpec, {**SFT, "lora": {"targets": ["attn.q"]}}, True),
        (finetune.DPOSpec, DPO, True),
        (finetune.GRPOSpec, GRPO, False),
        (finetune.GRPOSpec, {**GRPO, "grpo": {"kl_beta": 0.1}}, True),
    ],
)
def test_a_start_the_run_only_reads_keeps_its_block_matrices_in_the_matmuls_precision(
    kind: type[finetune.FinetuneSpec], raw: dict[str, Any], reads_start: bool
) -> None:
    """``frozen``: under bf16, LoRA's base and the references keep their block matrices in bf16 and let the
    float32 ones go (nothing else holds them: 14 GB of an 8B Llama); a start the run trains, or a float32
    run, keeps its tensors."""
    spec = parse(kind, raw, "spec")
    begin = finetune.Start(tiny_model(), "m")
    params = begin.model.params
    assert finetune.frozen(spec, begin, torch.float32).model.params is params
    matrix, norm = (
        weakref.ref(params["blocks", "attn", "q", "weight"]),
        params["blocks", "attn_norm", "weight"],
    )
    expected = params["blocks", "attn", "q", "weight"].to(torch.bfloat16)
    after = finetune.frozen(spec, begin, torch.bfloat16)
    del begin, params
    kept = after.model.params
    assert (kept["blocks", "attn", "q", "weight"].dtype == torch.bfloat16) == reads_start
    assert (matrix() is None) == reads_start
    if reads_start:
        assert torch.equal(kept["blocks", "attn", "q", "weight"], expected)
    assert kept["blocks", "attn_norm", "weight"] is norm


def test_a_lora_start_kept_in_bf16_is_evaluated_merged_in_bf16() -> None:
    """The loop's evaluations of a LoRA run whose base is stored in bf16 answer in bf16, as GRPO samples: the
    adapters merged into the stored matrices, every tensor bf16 (not a mix the first matmul refuses, nor a float32
    copy of every matrix, which outgrew what storing them saved)."""
    spec = parse(finetune.SFTSpec, {**SFT, "lora": {"targets": ["attn.q"]}}, "spec")
    fresh, begin = finetune.trainable(spec, finetune.Start(tiny_model(), "m"), Parallel())
    adapters = fresh.apply(lambda t: t + 0.1)  # B no longer zero
    assert adapters is not None
    begin = finetune.frozen(spec, begin, torch.bfloat16)
    full = finetune.full_params(spec, begin, adapters)
    assert {t.dtype for t in full.values(True, True)} == {torch.bfloat16}
    assert spec.lora is not None
    update = spec.lora.scale * (adapters["attn", "q", "b"] @ adapters["attn", "q", "a"])
    stored = begin.model.params["blocks", "attn", "q", "weight"]
    assert torch.equal(full["blocks", "attn", "q", "weight"], (stored.float() + update).to(torch.bfloat16))
    k = ("blocks", "attn", "k", "weight")  # not adapted: the stored matrix itself
    assert full.get(k) is begin.model.params.get(k)
    # A base stored in float32 (a float32 run) merges in float32, as before.
    float32 = finetune.full_params(spec, finetune.Start(tiny_model(), "m"), adapters)
    assert {t.dtype for t in float32.values(True, True)} == {torch.float32}


def test_a_lora_run_from_a_start_kept_in_bf16_names_its_base_as_saved(tmp_path: Path) -> None:
    """``lora.json``'s fingerprint is of the model as loaded, taken before ``frozen`` casts its matrices: a
    fingerprint of the cast base named no model on disk, and loading the run refused its own base."""
    model = finetune_fixtures.tiny_model(tmp_path / "model")
    raw = {**SFT, "model": str(model), "lora": {"targets": ["attn.q"]}, "max_len": 64}
    spec = parse(finetune.SFTSpec, raw, "spec")
    begin = finetune.start(spec, torch.device("cpu"))
    adapters, begin = finetune.trainable(spec, begin, Parallel())
    begin = finetune.frozen(spec, begin, torch.bfloat16)
    args = argparse.Namespace(resume=None, run_dir=tmp_path / "run", stop_after=None)
    with runs.open_run(spec, args, Parallel(), partial(finetune.write_run_files, spec, begin)) as run:
        checkpoint.save(run.dir, init_state(adapters), runs.describe_meta(run))
    loaded = load_model(run.dir)  # refused unless the record names the base on disk
    saved = load_model(model).params
    for key in saved.keys(True, True):
        assert torch.equal(loaded.params.get(key), saved.get(key)), key  # adapters start at zero: the base
    again = finetune.start(spec, torch.device("cpu"), resume=run.dir)  # the resume's check passes
    assert again.base_sha256 == begin.base_sha256
    shutil.rmtree(model)
    finetune_fixtures.tiny_model(model, seed=1)  # the same shape, other weights, where the base was
    with pytest.raises(ValueError, match=r"the base model .*/model is not the one this run trained on"):
        finetune.start(spec, torch.device("cpu"), resume=run.dir)  # not adapters trained on it


def test_fully_sharded_full_fine_tuning_never_copies_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under fsdp a rank's share is a copy of its pieces: cloning the whole first (DPO's copy) would put a
    second whole model on every rank for a moment, which is what fsdp exists to save."""
    spec = parse(finetune.DPOSpec, DPO, "spec")
    begin = finetune.Start(tiny_model(), "m")

    def whole_copy(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the whole model was copied")

    monkeypatch.setattr(TensorDict, "clone", whole_copy)
    finetune.trainable(spec, begin, FSDP)


@pytest.mark.parametrize("parallel", [Parallel(), FSDP])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sharded_reference_is_a_ranks_share_and_the_whole_is_let_go(
    parallel: Parallel, dtype: torch.dtype
) -> None:
    """DPO's frozen reference under fsdp: each rank keeps its share, as of what it trains (the whole model
    on every rank is what fsdp exists to save); one process or data-parallel, the start's own tensors. Under
    bf16 its block matrices are stored in bf16, the share's cut first (a whole bf16 copy beside the whole
    float32 model held it one and a half times on every rank), and the start goes on from the same tensors."""
    base = tiny_model()
    reference, after = finetune.sharded_reference(finetune.Start(base, "m"), parallel, dtype)
    for key in leaf_keys(base.params):
        whole = base.params.get(key)
        piece = parallel.piece(base.params, key, whole)
        matrix = key[0] == "blocks" and whole.ndim == 3
        assert torch.equal(reference.get(key), piece.to(dtype) if matrix else piece), key
        assert reference.get(key).dtype == (dtype if matrix else torch.float32), key
        assert (reference.get(key) is whole) == (
            not parallel.sharded and not (matrix and dtype != torch.float32)
        )
        if parallel.sharded:
            assert after.model.params.get(key).device.type == "meta", key
        else:
            assert after.model.params.get(key) is reference.get(key), key


def test_full_params_are_cast_to_the_dtype_asked_for() -> None:
    """GRPO samples from ``full_params(..., run.dtype)``: under bf16, full fine-tuning's float32 parameters in
    bf16, and LoRA's adapters merged into a float32 base in float32, then cast (the dtype given, not the base's)."""
    base = tiny_model()
    spec = parse(finetune.SFTSpec, SFT, "spec")
    begin = finetune.Start(base, "m")
    assert finetune.full_params(spec, begin, base.params) is base.params
    cast = finetune.full_params(spec, begin, base.params, torch.bfloat16)
    for key in base.params.keys(True, True):
        assert torch.equal(cast.get(key), base.params.get(key).to(torch.bfloat16)), key
    adapted = parse(finetune.SFTSpec, {**SFT, "lora": {"targets": ["attn.q"]}}, "spec")
    fresh, begin = finetune.trainable(adapted, finetune.Start(tiny_model(), "m"), Parallel())
    adapters = fresh.apply(lambda t: t + 0.1)  # B no longer zero
    assert adapters is not None
    assert adapted.lora is not None
    merged = finetune.full_params(adapted, begin, adapters, torch.bfloat16)
    q = ("blocks", "attn", "q", "weight")
    update = adapted.lora.scale * (adapters["attn", "q", "b"] @ adapters["attn", "q", "a"])
    assert torch.equal(merged.get(q), (begin.model.params.get(q) + update).to(torch.bfloat16))
    for key in base.params.keys(True, True):
        assert merged.get(key).dtype == torch.bfloat16, key
        if key != q:
            assert torch.equal(merged.get(key), base.params.get(key).to(torch.bfloat16)), key


def test_an_optimizer_whose_groups_do_not_fit_what_is_trained_is_refused_before_the_run() -> None:
    """Muon takes the matrices under ``blocks`` by default, and LoRA's adapters are not there: every one would
    have been AdamW's in silence, or the run failed at its first step. Full fine-tuning's matrices are Muon's."""
    muon = {"steps": 1, "batch_size": 2, "optimizer": {"kind": "muon"}}  # SFT's train, Muon's optimizer
    spec = parse(finetune.SFTSpec, {**SFT, "lora": {"targets": ["attn.q"]}, "train": muon}, "spec")
    with pytest.raises(ValueError, match="kind muon, but no parameter is Muon's"):
        finetune.trainable(spec, finetune.Start(tiny_model(), "m"), Parallel())
    finetune.trainable(
        parse(finetune.SFTSpec, {**SFT, "train": muon}, "spec"), finetune.Start(tiny_model(), "m"), Parallel()
    )


def test_fully_sharded_training_of_rows_the_ranks_cannot_split_is_refused_naming_the_parameter() -> None:
    """``torch.chunk`` splits 301 rows in 151 and 150 without a word: ranks holding pieces of different sizes,
    and checkpoints whose parameter counts are no model's."""
    config = finetune_fixtures.CONFIG.model_copy(update={"vocab_size": 301})
    begin = finetune.Start(Pretrained(config, llama.init(config, 0), TOKENIZER), "m")
    spec = parse(finetune.SFTSpec, SFT, "spec")
    with pytest.raises(
        ValueError, match=r"parameter embed\.weight has 301 rows along dimension 0, which 2 ranks"
    ):
        finetune.trainable(spec, begin, FSDP)
    finetune.trainable(spec, begin, Parallel(kind="dp", rank=0, size=2))  # data parallel keeps them whole


def test_grpo_without_a_kl_penalty_reads_no_reference() -> None:
    """``kl_beta`` 0 (the default) has no reference: returned anyway, it was the start full fine-tuning let go
    (on the meta device), or a second model loaded for nothing."""
    begin = finetune.Start(tiny_model(), "m")
    for raw in (GRPO, {**GRPO, "reference": "/no/such/model"}):
        spec = parse(finetune.GRPOSpec, raw, "spec")
        assert finetune.reference_params(spec, begin, torch.device("cpu")) is None


def test_a_grpo_reference_saved_in_bf16_is_read_in_float32(tmp_path: Path) -> None:
    """As the start is (``finetune.start``): a float32 run's reference forward multiplies float32 activations by
    its weights, which a bf16 model on disk, used as saved, did not match."""
    model = load_model(finetune_fixtures.tiny_model(tmp_path / "model"))
    half = save_zmaj(model.to(dtype=torch.bfloat16), tmp_path / "half")
    spec = parse(finetune.GRPOSpec, {**GRPO, "reference": str(half), "grpo": {"kl_beta": 0.1}}, "spec")
    params = finetune.reference_params(spec, finetune.Start(tiny_model(), "m"), torch.device("cpu"))
    assert params is not None
    saved = load_model(half).params
    for key in saved.keys(True, True):
        assert params.get(key).dtype == torch.float32, key
        assert torch.equal(params.get(key), saved.get(key).float()), key


def test_start_reads_the_model_in_float32_names_it_absolutely_and_keeps_the_specs_day(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lora.json`` names ``model_path`` wherever the run is loaded from (a relative path named another model
    there); a bf16 model on disk is trained from a float32 copy; the chat template tells ``chat_date``."""
    half = save_zmaj(
        load_model(finetune_fixtures.tiny_model(tmp_path / "model")).to(dtype=torch.bfloat16),
        tmp_path / "half",
    )
    monkeypatch.chdir(tmp_path)
    raw = {**SFT, "model": "half", "max_len": 64, "chat_date": "2026-12-06"}
    begin = finetune.start(parse(finetune.SFTSpec, raw, "spec"), torch.device("cpu"))
    assert begin.model_path == str(half.resolve())
    assert {t.dtype for t in begin.model.params.values(True, True)} == {torch.float32}
    saved = load_model(half).params
    assert all(torch.equal(begin.model.params.get(k), saved.get(k).float()) for k in saved.keys(True, True))
    assert begin.model.tokenizer.today == date(2026, 12, 6)


@pytest.mark.parametrize(
    ("kind", "raw", "message"),
    [
        (
            finetune.SFTSpec,
            {**SFT, "max_len": 200},
            r"^max_len: 200 tokens do not fit the model's context of 128",
        ),
        (
            finetune.GRPOSpec,
            {
                **GRPO,
                "train": {"steps": 1, "prompts_per_step": 250},
                "task": {"name": "arithmetic", "options": {"digits": 1}},
                "grpo": {"max_new_tokens": 6},
            },
            "distinct train problems of the 250 asked",
        ),
        (
            finetune.SFTSpec,
            {**SFT, "max_len": 64, "eval": {"task": "arithmetic", "n": 8, "max_new_tokens": 120}},
            r"^eval: a prompt of \d+ tokens plus max_new_tokens=120 is past the model's context of 128",
        ),
    ],
)
def test_start_refuses_what_would_fail_inside_the_run(
    tmp_path: Path, kind: type[finetune.FinetuneSpec], raw: dict[str, Any], message: str
) -> None:
    """A length past the context, a GRPO step with more problems than the split holds, an eval prompt whose
    answer runs past the context: each failed at the first step or evaluation, inside the run."""
    spec = parse(kind, {**raw, "model": str(finetune_fixtures.tiny_model(tmp_path / "model"))}, "spec")
    with pytest.raises(ValueError, match=message):
        finetune.start(spec, torch.device("cpu"))


def test_the_longest_prompt_is_the_one_checked_against_the_context() -> None:
    """``check_prompts`` of prompts of two lengths: the longest's answer must fit, whatever the shortest's."""
    task = get_task("long-or-short")
    problems = task.problems("test", 8)
    lengths = [len(TOKENIZER.encode_chat([{"role": "user", "content": p.prompt}])) for p in problems]
    assert min(lengths) < max(lengths)
    model, longest = tiny_model(), max(lengths)
    room = model.config.context - longest
    finetune.check_prompts(model, task, problems, room, None, None, "eval")
    with pytest.raises(
        ValueError, match=rf"^eval: a prompt of {longest} tokens plus max_new_tokens={room + 1} "
    ):
        finetune.check_prompts(model, task, problems, room + 1, None, None, "eval")


def test_grpo_refuses_truncated_sampling_and_bad_task_options() -> None:
    raw = {
        "name": "x",
        "model": "m",
        "train": {"steps": 1, "prompts_per_step": 1},
        "task": {"name": "arithmetic"},
    }
    parse(finetune.GRPOSpec, raw, "spec")
    parse(finetune.GRPOSpec, {**raw, "grpo": {"sampling": {"temperature": 0.7}}}, "spec")  # tempered: fine
    for sampling in (
        {"temperature": 0.0},
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.0, "top_p": 0.9},
    ):
        with pytest.raises(SpecError, match="without top_k/top_p"):
            parse(finetune.GRPOSpec, {**raw, "grpo": {"sampling": sampling}}, "spec")
    with pytest.raises(SpecError, match="digits"):
        parse(finetune.GRPOSpec, {**raw, "task": {"name": "arithmetic", "options": {"digits": 0}}}, "spec")


def test_lengths_past_the_models_context_are_refused_naming_the_field() -> None:
    """A model with learned positions would fail at the first long example, mid-run, with an IndexError."""
    raw = {
        "name": "x",
        "model": "m",
        "train": {"steps": 1, "batch_size": 1},
        "data": {"kind": "task", "task": "arithmetic", "n": 1},
    }
    sft = parse(finetune.SFTSpec, {**raw, "max_len": 64}, "spec")
    finetune.check_lengths(sft, context=64)
    with pytest.raises(
        SpecError, match=r"^max_len: 64 tokens do not fit the model's context of 32; lower it$"
    ):
        finetune.check_lengths(sft, context=32)
    graded = sft.model_copy(
        update={"max_len": 16, "eval": finetune.EvalConfig(task="arithmetic", max_new_tokens=40)}
    )
    with pytest.raises(SpecError, match=r"^eval\.max_new_tokens: 41 tokens do not fit"):
        finetune.check_lengths(graded, context=32)
    finetune.fits_context(24, 8, 32, "grpo")
    with pytest.raises(ValueError, match=r"^grpo: a prompt of 25 tokens plus max_new_tokens=8 is past"):
        finetune.fits_context(25, 8, 32, "grpo")


def test_on_policy_pairs_refuse_greedy_sampling() -> None:
    """Greedy answers to a problem are all one answer: no pair, found only after every answer was sampled."""
    pairs = {"kind": "task", "task": {"name": "arithmetic"}, "n_prompts": 4, "k": 2}
    parse(finetune.PairsFromTask, pairs, "spec")  # temperature 1 by default
    with pytest.raises(SpecError, match=r"sampling\.temperature is 0 .* no pair"):
        parse(finetune.PairsFromTask, {**pairs, "sampling": {"top_k": 50}}, "spec")


def test_a_new_run_folder_is_a_model_path_with_the_spec_chat_template(tmp_path: Path) -> None:
    model = finetune_fixtures.tiny_model(tmp_path / "model")
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|end|>{% endfor %}"
    raw = {
        "name": "x",
        "model": str(model),
        "chat_template": template,
        "train": {"steps": 1, "batch_size": 1},
        "data": {"kind": "task", "task": "arithmetic", "n": 1},
        "max_len": 64,  # within the tiny model's context
    }
    spec = parse(finetune.SFTSpec, raw, "spec")
    begin = finetune.start(spec, torch.device("cpu"))
    args = argparse.Namespace(resume=None, run_dir=tmp_path / "run", stop_after=None)
    write = partial(finetune.write_run_files, spec, begin)
    with runs.open_run(spec, args, Parallel(), write) as run:
        checkpoint.save(
            run.dir, init_state(finetune.trainable(spec, begin, Parallel())[0]), runs.describe_meta(run)
        )
    loaded = load_model(run.dir)
    assert loaded.tokenizer.chat_template == template
    assert loaded.tokenizer.render_chat([{"role": "user", "content": "hi"}], False) == "[user] hi<|end|>"
    for key in loaded.params.keys(True, True):
        assert torch.equal(loaded.params.get(key), begin.model.params.get(key))
    with pytest.raises(runs.UserError, match="already holds a run"):
        runs.open_run(spec, args, Parallel(), write)


def _run_with_a_checkpoint(spec: finetune.FinetuneSpec, run_dir: Path) -> Path:
    begin = finetune.start(spec, torch.device("cpu"))
    args = argparse.Namespace(resume=None, run_dir=run_dir, stop_after=None)
    with runs.open_run(spec, args, Parallel(), partial(finetune.write_run_files, spec, begin)) as run:
        checkpoint.save(
            run.dir, init_state(finetune.trainable(spec, begin, Parallel())[0]), runs.describe_meta(run)
        )
    return run.dir


def test_a_run_named_as_the_model_is_pinned_to_its_checkpoint_of_the_time(tmp_path: Path) -> None:
    """A LoRA run over another run merges its adapters into the checkpoint it trained on, even after that run
    went on and pruned it: ``lora.json`` and ``spec.yaml`` name the checkpoint's pinned copy, not the run."""
    raw = {
        "name": "x",
        "model": str(finetune_fixtures.tiny_model(tmp_path / "model")),
        "train": {"steps": 1, "batch_size": 1},
        "data": {"kind": "task", "task": "arithmetic", "n": 1},
        "max_len": 64,
    }
    base = _run_with_a_checkpoint(parse(finetune.SFTSpec, raw, "spec"), tmp_path / "base")
    trained_on = checkpoint.latest(base).resolve()
    (tmp_path / "lora.yaml").write_text(json.dumps({**raw, "model": str(base), "lora": {"rank": 2}}))
    args = argparse.Namespace(spec=tmp_path / "lora.yaml", overrides=[], resume=None, run_dir=None)
    spec = finetune.read_spec(finetune.SFTSpec, args)
    pinned = Path(spec.model)
    assert pinned.parent == trained_on.parent
    assert pinned.name.startswith(f"pinned-{trained_on.name}-")
    assert (pinned / checkpoint.PARAMS).stat().st_ino == (trained_on / checkpoint.PARAMS).stat().st_ino
    assert finetune.read_spec(finetune.SFTSpec, args).model == spec.model  # the same weights: the same pin
    args.spec = tmp_path / "step.yaml"  # a checkpoint named as it is, too
    args.spec.write_text(json.dumps({**raw, "model": str(trained_on), "lora": {"rank": 2}}))
    assert finetune.read_spec(finetune.SFTSpec, args).model == spec.model
    model = str(raw["model"])
    relative = {**raw, "model": os.path.relpath(model)}  # resumed from elsewhere, it would name another model
    (tmp_path / "relative.yaml").write_text(json.dumps(relative))
    args.spec = tmp_path / "relative.yaml"
    assert finetune.read_spec(finetune.SFTSpec, args).model == str(Path(model).resolve())
    adapted = _run_with_a_checkpoint(spec, tmp_path / "lora")
    before = load_model(trained_on).params
    later = init_state(llama.init(finetune_fixtures.CONFIG, seed=1))
    for step in (5, 6):  # the base run goes on, keeping its newest checkpoint
        later["opt", "step"] = torch.tensor(step)
        checkpoint.save(base, later, {})
        checkpoint.prune(base, 1)
    assert not trained_on.exists()
    assert checkpoint.latest_intact(base) == base / "checkpoints" / "step-0000006"  # pins are no checkpoints

    merged = load_model(adapted).params
    # A resume keeps what its spec.yaml names, a pin or (a run begun before pins) the checkpoint itself: pinned
    # again, it was refused as "written with another model".
    resume = argparse.Namespace(spec=None, overrides=[], resume=adapted, run_dir=None)
    assert finetune.read_spec(finetune.SFTSpec, resume).model == spec.model
    saved = (adapted / "spec.yaml").read_text()
    (adapted / "spec.yaml").write_text(saved.replace(spec.model, str(trained_on)))
    assert finetune.read_spec(finetune.SFTSpec, resume).model == str(trained_on)
    runs.check_written_by(checkpoint.latest(adapted), finetune.read_spec(finetune.SFTSpec, resume))
    for key in before.keys(True, True):  # the adapters' B starts at zero: merged, they change nothing
        assert torch.equal(merged.get(key), before.get(key))


def test_a_run_from_before_chat_date_resumes_on_the_day_its_first_session_began(tmp_path: Path) -> None:
    """A run whose spec.yaml has no ``chat_date`` (written before the field) renders its conversations on the
    day its first session started (``run.jsonl``): not today, nor the day of its latest session."""
    raw = {**SFT, "model": str(finetune_fixtures.tiny_model(tmp_path / "model")), "max_len": 64}
    run_dir = _run_with_a_checkpoint(parse(finetune.SFTSpec, raw, "spec"), tmp_path / "run")
    written = yaml.safe_load((run_dir / "spec.yaml").read_text())
    written.pop("chat_date", None)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(written))
    days = [datetime(2020, 3, 1, 23, 59), datetime(2020, 3, 2, 0, 30), datetime(2020, 3, 4, 12, 0)]
    events = ["start", "end", "start"]
    sessions = [
        {"event": e, "time": d.timestamp(), "hardware": "cpu"} for e, d in zip(events, days, strict=True)
    ]
    (run_dir / "run.jsonl").write_text("".join(json.dumps(record) + "\n" for record in sessions))
    args = argparse.Namespace(spec=None, overrides=[], resume=run_dir, run_dir=None)
    assert finetune.read_spec(finetune.SFTSpec, args).chat_date == date(2020, 3, 1)


def test_pinning_is_one_folder_when_two_processes_pin_at_once_and_a_warning_where_it_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank of a torchrun job pins: the second rename failed (ENOTEMPTY), leaving its staged copy. A base
    on a read-only mount (EROFS, no PermissionError) was a traceback."""
    state = init_state(llama.init(finetune_fixtures.CONFIG, seed=0))
    source = checkpoint.save(tmp_path / "base", state, {})
    real = checkpoint._linked_copy

    def racing(*args: Any) -> Path:
        staged = real(*args)
        monkeypatch.setattr(checkpoint, "_linked_copy", real)
        checkpoint.pin(source)  # another process, first
        return staged

    monkeypatch.setattr(checkpoint, "_linked_copy", racing)
    kept = checkpoint.pin(source)
    assert sorted(p.name for p in source.parent.iterdir()) == sorted(["latest", source.name, kept.name])
    # Hard links: no byte copied while the checkpoint lives.
    assert (kept / checkpoint.PARAMS).stat().st_ino == (source / checkpoint.PARAMS).stat().st_ino

    def read_only(checkpoint: Path) -> Path:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(checkpoint))

    monkeypatch.setattr(checkpoint, "pin", read_only)
    with logged("WARNING") as lines:
        assert finetune.pinned(str(tmp_path / "base")) == str(source)
    assert "could not be pinned" in "".join(lines)


def test_a_new_runs_folder_is_refused_where_it_is_holds_or_lies_inside_a_model_the_run_reads(
    tmp_path: Path,
) -> None:
    """``--run-dir`` naming the model (or GRPO's reference) wrote the run's files over the model's: its
    tokenizer files changed, and it loaded as its old weights, not the run's. A resume writes where it was."""
    model = finetune_fixtures.tiny_model(tmp_path / "models" / "model")
    spec = Path(__file__).resolve().parents[3] / "specs" / "finetune" / "grpo-tiny.yaml"
    overrides = [f"reference={model}", "model=pypi:smollm2-135m-instruct"]  # a name, never looked at here
    args = argparse.Namespace(spec=spec, overrides=overrides, resume=None)
    for run_dir, relation in [(model, "is"), (model.parent, "holds"), (model / "run", "lies inside")]:
        args.run_dir = run_dir
        with pytest.raises(runs.UserError, match=f"--run-dir {run_dir} {relation} the reference {model}, "):
            finetune.read_spec(finetune.GRPOSpec, args)
    args.run_dir = tmp_path / "run"
    assert finetune.read_spec(finetune.GRPOSpec, args).reference == str(model.resolve())


def test_adapters_merge_in_the_base_models_dtype(tmp_path: Path) -> None:
    """float32 adapters over a bf16 model: every merged weight stays bf16, so the model runs as one dtype."""
    model = load_model(finetune_fixtures.tiny_model(tmp_path / "model")).to(dtype=torch.bfloat16)
    config = lora.LoraConfig(rank=2)
    adapters = lora.init_adapters(model.params, config).apply(
        lambda t: torch.ones_like(t, dtype=torch.float32)
    )
    assert adapters is not None
    merged = lora.merge(model.params, adapters, config)
    assert {t.dtype for t in merged.values(True, True) if t.is_floating_point()} == {torch.bfloat16}
    torch.testing.assert_close(
        merged.get(("blocks", "attn", "q", "weight")).float(),
        model.params.get(("blocks", "attn", "q", "weight")).float() + 2 * config.scale,  # rank 2 of ones
        atol=0.02,
        rtol=0.01,
    )


def test_an_unknown_shipped_model_is_named() -> None:
    with pytest.raises(
        ValueError, match="unknown model 'pypi:nope'; shipped models: pypi:smollm2-135m-instruct"
    ):
        resolve("pypi:nope")


@pytest.mark.parametrize("name", ["nosuch_module_zmaj", "nosuch_package_zmaj.tasks"])
def test_an_import_of_no_module_is_named(name: str) -> None:
    with pytest.raises(FileNotFoundError, match=rf"^--import {name}: no such module$"):
        finetune.import_modules([name])


@given(st.integers(1, 20), st.integers(0, 5), st.integers(0, 60), st.integers(0, 45))
def test_draw_is_the_stream_of_shuffled_epochs(n: int, seed: int, start: int, count: int) -> None:
    """Item i of the stream is item ``i mod n`` of epoch ``i // n``'s order, across epoch boundaries too."""
    expected = [finetune.epoch_order(n, seed, i // n)[i % n] for i in range(start, start + count)]
    assert finetune.draw(n, seed, start, count) == expected


@pytest.mark.parametrize("where", ["eval", "task"])
def test_a_system_text_with_half_a_surrogate_pair_is_refused_naming_the_field(where: str) -> None:
    """A spec's system message reached the tokenizer, whose TypeError was a traceback after the run folder was
    made (GRPO's task.system, eval.system)."""
    kind: type[BaseModel] = finetune.EvalConfig if where == "eval" else finetune.RLTask
    fields = {"task" if where == "eval" else "name": "arithmetic", "system": "half \ud83d"}
    with pytest.raises(ValidationError, match=r"system\n.*not UTF-8 text \(U\+D83D at character 5\)"):
        kind.model_validate(fields)


def test_the_sft_fingerprint_changes_with_any_id_mask_or_boundary() -> None:
    """What an SFT run records of its conversations: ids, assistant masks and where each example ends."""
    examples = [([1, 2, 3], [False, True, True]), ([4, 5], [False, True])]
    variants = [
        [([1, 2, 3], [False, True, True]), ([4, 6], [False, True])],
        [([1, 2, 3], [False, False, True]), ([4, 5], [False, True])],
        [
            ([1, 2], [False, True]),
            ([3, 4, 5], [True, False, True]),
        ],  # the same ids and masks, split elsewhere
    ]
    fingerprints = {finetune.fingerprint(examples), *(finetune.fingerprint(v) for v in variants)}
    assert len(fingerprints) == 4
    # Without the lengths these two would hash the same bytes: ids 1 and 257 as int64, masks as one byte each.
    assert finetune.fingerprint([([1], [True]), ([1], [True])]) != finetune.fingerprint(
        [([1, 257], [False, True])]
    )
    assert finetune.fingerprint([(list(ids), list(mask)) for ids, mask in examples]) == finetune.fingerprint(
        examples
    )


def test_evaluate_task_few_shot_reads_an_answer_ended_by_the_blank_line_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Few-shot, the blank line ends an answer (no stop token): read as cut by the limit, its "Answer:" line,
    the last before the blank, would be dropped and every few-shot answer scored wrong."""
    task = get_task("arithmetic", digits=1)
    problems = task.problems("test", 2)
    answers = [
        TOKENIZER.encode(f"Answer: {p.answer}{FEW_SHOT_STOP}Question: What", add_special_tokens=False)
        for p in problems
    ]
    monkeypatch.setattr(finetune, "sample_answers", lambda *args, **kwargs: answers)
    result = finetune.evaluate_task(tiny_model(), task, problems, max_new_tokens=8, batch_size=2, few_shot=2)
    assert (result.accuracy, result.format_rate) == (1.0, 1.0)
