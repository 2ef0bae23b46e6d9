"""Fine-tuning's setup: defaults, refusals, seeds, prompts, scoring and on-policy DPO pairs, each pinned where a
plausible bug (a default changed, a refusal dropped, a seed or system message not passed through, a length one
short) would otherwise pass every other test. The toy model and tokenizer are ``test_finetune.py``'s."""

import argparse
import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import ValidationError
from tensordict import TensorDict

from tests.integration import finetune_fixtures
from zmaj.convert.load import Pretrained, load_model
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.infer.generate import Sampling
from zmaj.models import llama
from zmaj.specfile import SpecError
from zmaj.tasks import Problem, Reward, accuracy_interval, get_task
from zmaj.train import finetune, pairs
from zmaj.train.parallel import Parallel
from zmaj.train.spec import LoopConfig, SampleConfig, TrainConfig, parse

TOKENIZER = finetune_fixtures.tokenizer()
CONVERSATION = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5\nAnswer: 5"},
]
BASE = {"name": "x", "model": "m"}
SPECS = Path(__file__).resolve().parents[3] / "specs" / "finetune"


def tiny_model() -> Pretrained:
    config = finetune_fixtures.CONFIG
    return Pretrained(config, llama.init(config, 0), TOKENIZER)


# ------------------------------------------------------------------------------------ refusals and defaults


def test_a_run_name_with_a_nul_is_refused_naming_the_field() -> None:
    """A NUL in the name made no folder: a ValueError (embedded null byte) once the data was prepared."""
    with pytest.raises(ValidationError, match="names the run folder"):
        finetune.SFTSpec.model_validate(
            {
                "name": "a\0b",
                "model": "m",
                "train": {"steps": 1, "batch_size": 1},
                "data": {"kind": "task", "task": "arithmetic", "n": 1},
            }
        )


def test_sft_on_the_test_split_of_the_task_its_eval_scores_is_refused() -> None:
    """The split was accepted in silence, so an SFT run could learn the very problems its evaluation scores."""
    raw: dict[str, Any] = {
        "name": "memorise",
        "model": "m",
        "train": {"steps": 1, "batch_size": 1},
        "data": {"kind": "task", "task": "arithmetic", "split": "test", "n": 1},
        "eval": {"task": "arithmetic", "options": {"digits": 3}},  # the split is by question, not options
    }
    with pytest.raises(
        ValidationError, match="data: split test trains on the held-out problems of 'arithmetic'"
    ):
        finetune.SFTSpec.model_validate(raw)
    for changed in (
        {"eval": {"task": "countdown"}},
        {"eval": {**raw["eval"], "split": "train"}},
    ):
        finetune.SFTSpec.model_validate({**raw, **changed})  # another task's, or its train split
    finetune.SFTSpec.model_validate({**raw, "eval": None})
    finetune.SFTSpec.model_validate({**raw, "data": {**raw["data"], "split": "train"}})


def test_counts_that_must_be_positive_are_refused_at_zero() -> None:
    """grad_accum 0 made empty steps; top_k 0 masked every token; one answer per problem never makes a pair
    (found only after every answer was sampled)."""
    with pytest.raises(ValidationError, match="grad_accum"):
        TrainConfig(steps=1, batch_size=1, grad_accum=0)
    with pytest.raises(ValidationError, match="grad_accum"):
        finetune.SFTTrain(steps=1, batch_size=1, grad_accum=0)
    with pytest.raises(ValidationError, match="top_k"):
        SampleConfig(top_k=0)
    with pytest.raises(ValidationError, match="k\n"):
        finetune.PairsFromTask(task=finetune.RLTask(name="arithmetic"), n_prompts=2, k=1)
    # DPO's beta 0: the loss is log 2 whatever the policy, so every step trains nothing.
    with pytest.raises(ValidationError, match="beta"):
        finetune.DPOTrain(steps=1, batch_size=1, beta=0.0)


def test_defaults_are_the_documented_ones() -> None:
    """A changed default changes every run that leaves the field out, silently: fine-tuning at AdamW 1e-5 with
    no weight decay and 10 warmup steps, checkpoints every 100 steps (pre-training: 500, three kept, README),
    DPO's beta 0.1, 512-token examples, and an eval of 200 held-out problems."""
    train = finetune.SFTTrain(steps=1, batch_size=1)
    assert (train.optimizer.kind, train.optimizer.lr, train.optimizer.weight_decay) == ("adamw", 1e-5, 0.0)
    assert (train.schedule.warmup_steps, train.checkpoint_every, train.eval_every) == (10, 100, 100)
    assert finetune.DPOTrain(steps=1, batch_size=1).beta == 0.1
    assert finetune.GRPOTrain(steps=1, prompts_per_step=1).passes == 1  # one optimizer step per rollout
    loop = LoopConfig(steps=1)
    assert (loop.checkpoint_every, loop.keep_checkpoints, loop.eval_every, loop.seed) == (500, 3, 100, 0)
    # Pre-training's optimizer and schedule where a spec leaves them out (nanoGPT's AdamW settings).
    adamw = (0.001, (0.9, 0.95), 1e-08, 0.1, False, 1.0)
    assert (*loop.optimizer.model_dump(exclude={"kind"}).values(),) == adamw
    schedule = loop.schedule
    assert (schedule.kind, schedule.warmup_steps, schedule.decay_fraction, schedule.final_lr_fraction) == (
        "cosine",
        100,
        0.2,
        0.1,
    )
    for kind in (finetune.SFTSpec, finetune.DPOSpec):
        assert kind.model_fields["max_len"].default == 512
    pairs_from_task = finetune.PairsFromTask(task=finetune.RLTask(name="arithmetic"), n_prompts=2)
    assert (pairs_from_task.k, pairs_from_task.sampling.temperature) == (8, 1.0)


def test_evaluation_is_on_held_out_problems_by_default() -> None:
    """``eval.split`` left out must be the test split: on "train", every accuracy a fine-tuning run reports would
    be on problems it trained on, and no test noticed."""
    config = finetune.EvalConfig(task="arithmetic")
    assert (config.split, config.n, config.seed, config.few_shot) == ("test", 200, 0, None)
    assert (config.max_new_tokens, config.batch_size) == (128, 32)  # evaluate.py's --help defaults too
    task = get_task("arithmetic")
    held_out = {p.prompt for p in task.problems("test", config.n, config.seed)}
    assert held_out.isdisjoint(p.prompt for p in task.problems("train", 500, 0))


@pytest.mark.parametrize(
    ("raw", "field", "length"),
    [
        ({"max_len": 64, "pairs": {"kind": "files", "paths": ["p.jsonl"]}}, "max_len", 64),
        (
            {
                "max_len": 16,
                "pairs": {
                    "kind": "task",
                    "task": {"name": "arithmetic"},
                    "n_prompts": 2,
                    "max_new_tokens": 32,
                },
            },
            "pairs.max_new_tokens",
            33,
        ),
    ],
)
def test_dpo_lengths_past_the_context_are_refused_naming_the_field(
    raw: dict[str, Any], field: str, length: int
) -> None:
    """DPO's max_len past a learned-position model's context failed mid-run with an IndexError; an answer of
    max_new_tokens after a prompt of one token needs max_new_tokens + 1 positions."""
    spec = parse(finetune.DPOSpec, {**BASE, "train": {"steps": 1, "batch_size": 1}, **raw}, "spec")
    with pytest.raises(SpecError, match=rf"^{field}: {length} tokens do not fit the model's context of 32"):
        finetune.check_lengths(spec, context=32)


def test_grpo_answers_need_one_position_more_than_max_new_tokens() -> None:
    """grpo.max_new_tokens equal to the context was let through, to fail at the first rollout mid-run."""
    raw = {**BASE, "train": {"steps": 1, "prompts_per_step": 1}, "task": {"name": "arithmetic"}}
    spec = parse(finetune.GRPOSpec, {**raw, "grpo": {"max_new_tokens": 32}}, "spec")
    with pytest.raises(SpecError, match=r"^grpo\.max_new_tokens: 33 tokens do not fit"):
        finetune.check_lengths(spec, context=32)
    finetune.check_lengths(
        parse(finetune.GRPOSpec, {**raw, "grpo": {"max_new_tokens": 31}}, "spec"), context=32
    )


# --------------------------------------------------------------------------------------- data and prompts


def test_an_sft_example_keeps_max_len_inputs_and_their_targets() -> None:
    """``max_len`` inputs need ``max_len + 1`` tokens (inputs and shifted targets); cut at ``max_len`` a run
    trained one position short of what its spec said."""
    full, _ = TOKENIZER.encode_chat_with_mask(CONVERSATION)
    ids, mask = finetune.sft_example(TOKENIZER, CONVERSATION, 15, "c")
    assert len(full) > 16
    assert (len(ids), len(mask)) == (16, 16)
    assert ids == full[:16]


def test_an_sft_example_whose_only_assistant_token_is_the_first_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first token is no target (nothing predicts it): an example whose assistant mask marks only it would
    train on nothing, adding 0 to the loss."""
    monkeypatch.setattr(
        ModelTokenizer, "encode_chat_with_mask", lambda self, messages: ([5, 6, 7], [True, False, False])
    )
    with pytest.raises(ValueError, match=r"^c: no assistant token within the first 15 tokens"):
        finetune.sft_example(TOKENIZER, CONVERSATION, 15, "c")


def test_other_seeds_give_other_data_not_the_same_data_shifted() -> None:
    """A seed folded in as ``seed + epoch`` made seed 1's first epoch seed 0's second (and GRPO's step problems
    likewise): two "independent" runs read the same batches, one epoch or step apart."""
    orders = {tuple(finetune.epoch_order(50, seed, epoch)) for seed in range(4) for epoch in range(4)}
    assert len(orders) == 16
    raw: dict[str, Any] = {
        **BASE,
        "train": {"steps": 1, "prompts_per_step": 4},
        "task": {"name": "arithmetic"},
    }
    task = get_task("arithmetic")
    step_problems = {
        tuple(
            p.prompt
            for p in finetune.grpo_problems(
                parse(finetune.GRPOSpec, {**raw, "train": {**raw["train"], "seed": seed}}, "spec"),
                task,
                index,
            )
        )
        for seed in range(3)
        for index in range(3)
    }
    assert len(step_problems) == 9


def test_the_grpo_data_fingerprint_covers_each_problems_answer_and_solution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A task edited to check other answers (or give other worked solutions) to the same prompts trains on other
    rewards: a fingerprint of the prompts alone let such a resume through."""
    raw = {**BASE, "train": {"steps": 1, "prompts_per_step": 2}, "task": {"name": "say-e"}}
    spec = parse(finetune.GRPOSpec, raw, "spec")
    recorded = finetune.task_fingerprints(spec)
    drawn = finetune_fixtures.ToyTask.generate
    for name in ("answer", "solution"):

        def edited(self: finetune_fixtures.ToyTask, rng: random.Random, name: str = name) -> Problem:
            changes: dict[str, Any] = {name: "something else"}
            return dataclasses.replace(drawn(self, rng), **changes)

        monkeypatch.setattr(finetune_fixtures.ToyTask, "generate", edited)
        assert finetune.task_fingerprints(spec) != recorded, name
    monkeypatch.undo()
    assert finetune.task_fingerprints(spec) == recorded


def test_each_batch_of_samples_draws_its_own_noise() -> None:
    """The same prompt sampled in two batches gets two draws: with one seed for every batch, batch 2 repeated
    batch 1's answers, and DPO's k answers to a problem split over batches were copies."""
    prompt = TOKENIZER.encode_chat([{"role": "user", "content": "Say something"}])
    sampling = Sampling(temperature=1.0)
    alone = finetune.sample_answers(
        tiny_model(), [prompt, prompt], 6, batch_size=1, sampling=sampling, seed=3
    )
    assert alone[0] != alone[1]


def test_few_shot_zero_is_plain_text_and_a_system_message_comes_first() -> None:
    """``few_shot=0`` means zero-shot plain text (no chat template), not chat mode; a chat prompt carries the
    spec's system message (GRPO's task.system, DPO's pairs.task.system, eval.system)."""
    task = get_task("arithmetic")
    problem = task.problems("test", 1)[0]
    zero_shot = finetune.task_prompt(TOKENIZER, task, problem, 0)
    assert zero_shot == TOKENIZER.encode(task.few_shot_prompt(problem, 0))
    chat = finetune.task_prompt(TOKENIZER, task, problem, None, "Be brief.")
    expected = TOKENIZER.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": problem.prompt}]
    )
    assert chat == expected


# ------------------------------------------------------------------------------------------------ scoring


class _HalfRight(finetune_fixtures.ToyTask):
    name: ClassVar[str] = "half-right"

    def reward(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        return Reward(format=1.0, correctness=0.5)


def test_accuracy_counts_only_fully_correct_answers() -> None:
    """A task with partial credit (say-e, a user's own) must not count half-right answers as right."""
    task = _HalfRight()
    result = finetune.evaluate_task(
        tiny_model(), task, task.problems("test", 4), max_new_tokens=2, batch_size=4
    )
    assert (result.accuracy, result.format_rate) == (0.0, 1.0)


def test_pooling_one_process_changes_no_score() -> None:
    """``pooled`` sums n-weighted scores over ranks and divides back; dividing all but one left every fine-tuning
    run's eval_mean_length n times too large, on one process too."""
    score = finetune.TaskScore(n=4, accuracy=0.5, low=0.0, high=1.0, format_rate=0.75, mean_length=3.0)
    pooled = finetune.pooled(score, Parallel())
    assert (pooled.n, pooled.accuracy, pooled.format_rate, pooled.mean_length) == (4, 0.5, 0.75, 3.0)
    assert (pooled.low, pooled.high) == accuracy_interval(2, 4)[1:]


# --------------------------------------------------------------------------------------------- DPO pairs


def test_on_policy_pairs_sample_with_the_specs_seed_and_system_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pairs.seed must reach the sampler (else every seed samples the same answers) and pairs.task.system the
    prompts (else the pairs teach answers to prompts the run never asks)."""
    model = Pretrained(finetune_fixtures.CONFIG, TensorDict(), TOKENIZER)
    seen: dict[str, Any] = {}

    def sampler(_: Pretrained, rows: list[list[int]], *args: Any, **kwargs: Any) -> list[list[int]]:
        seen["seed"], seen["rows"] = args[3], rows
        return [TOKENIZER.encode("eee" if i % 2 else "123") for i in range(len(rows))]

    monkeypatch.setattr(finetune, "sample_answers", sampler)
    source = finetune.PairsFromTask(
        task=finetune.RLTask(name="say-e", system="Be brief."), n_prompts=2, k=2, seed=7
    )
    found = pairs.on_policy_pairs(source, finetune.Start(model, "stand-in"))
    assert seen["seed"] == 7
    problems = get_task("say-e").problems("train", 2, 7)
    expected = [finetune.task_prompt(TOKENIZER, get_task("say-e"), p, None, "Be brief.") for p in problems]
    assert seen["rows"] == [expected[0], expected[0], expected[1], expected[1]]
    assert [pair.prompt for pair in found] == expected


@pytest.mark.parametrize(
    ("rendered", "message"),
    [
        (
            {
                "a": ([1, 2, 3, 9], [False, False, False, True]),
                "b": ([1, 2, 4, 9], [False, False, True, True]),
            },
            "the two answers change how the prompt is tokenized",
        ),
        (
            {"a": ([1, 2], [False, False]), "b": ([1, 3], [False, True])},
            "an answer renders to no assistant token",
        ),
    ],
)
def test_a_text_pair_that_cannot_be_split_is_refused_naming_its_line(
    rendered: dict[str, tuple[list[int], list[bool]]], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the checks, a pair whose prompts differ trained the rejected answer after another prompt's tokens,
    and an answer with no assistant token was "ValueError: True is not in list", naming no line."""
    row = {"prompt": "q", "chosen": "a", "rejected": "b"}
    # The chat rendering of each answer, as a tokenizer whose merges cross the turn boundary could give it.
    monkeypatch.setattr(
        ModelTokenizer, "encode_chat_with_mask", lambda self, messages: rendered[messages[-1]["content"]]
    )
    with pytest.raises(ValueError, match=f"^bad pair at f.jsonl:3: {message}$"):
        pairs.text_pair(TOKENIZER, row, "f.jsonl:3")


def test_on_policy_pairs_take_the_first_best_and_the_first_worst_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The docstring's rule, "the first with the highest correctness to the first with the lowest": the shipped
    test's two wrong answers were the same text, so taking the last wrong (or last right) one passed it too."""
    model = Pretrained(finetune_fixtures.CONFIG, TensorDict(), TOKENIZER)
    texts = ["12", "eee", "34", "eeee"]  # say-e correctness 0, 1, 0, 1: two tie for best, two for worst

    def sampler(_: Pretrained, rows: list[list[int]], *args: Any, **kwargs: Any) -> list[list[int]]:
        return [TOKENIZER.encode(texts[i % 4]) for i in range(len(rows))]

    monkeypatch.setattr(finetune, "sample_answers", sampler)
    source = finetune.PairsFromTask(task=finetune.RLTask(name="say-e"), n_prompts=1, k=4)
    [pair] = pairs.on_policy_pairs(source, finetune.Start(model, "stand-in"))
    assert (TOKENIZER.decode(pair.chosen), TOKENIZER.decode(pair.rejected)) == ("eee", "12")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("chat_template='[{{ messages }}]'", "chat_template"),
        ("lora={rank: 2}", "lora"),
        ("model=pypi:another-model", "model"),
        ("train.seed=3", "train.seed"),
        ("chat_date=2026-12-07", "chat_date"),  # a template that tells the date renders other conversations
    ],
)
def test_a_resume_may_not_change_what_is_trained_or_how_it_is_talked_to(
    tmp_path: Path, override: str, field: str
) -> None:
    """``finetune.FROZEN``: a resumed run with another chat template tokenizes its conversations (SFT's rows,
    GRPO's prompts) differently from the steps it already took; only ``train.seed`` was tested."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(
        "name: x\nmodel: pypi:smollm2-135m-instruct\ntrain: {steps: 2, batch_size: 1}\n"
        "data: {kind: task, task: arithmetic, n: 1}\n"
    )
    args = argparse.Namespace(spec=None, overrides=[override], resume=run, run_dir=None)
    with pytest.raises(
        SpecError, match=rf": {re.escape(field)}\b.* differs from the run's; --set cannot change it$"
    ):
        finetune.read_spec(finetune.SFTSpec, args)


def test_a_grpo_reference_recorded_with_sdpa_is_the_same_model_and_another_is_named(tmp_path: Path) -> None:
    """How attention is computed (runs recorded ``sdpa`` before ``auto`` was the default) is no other model; a
    field that is names itself."""
    policy = finetune_fixtures.tiny_model(tmp_path / "policy")
    reference = finetune_fixtures.tiny_model(tmp_path / "reference", seed=1)
    model_json = reference / "model.json"
    recorded = json.loads(model_json.read_text())
    overrides = [f"model={policy}", f"reference={reference}", "grpo.kl_beta=0.1"]
    args = argparse.Namespace(
        spec=SPECS / "grpo-tiny.yaml", overrides=overrides, resume=None, run_dir=tmp_path / "run"
    )
    spec = finetune.read_spec(finetune.GRPOSpec, args)
    begin = finetune.Start(load_model(policy), str(policy))
    model_json.write_text(json.dumps(recorded | {"config": recorded["config"] | {"attention": "sdpa"}}))
    params = finetune.reference_params(spec, begin, torch.device("cpu"))
    assert params is not None
    assert torch.equal(params["embed", "weight"], load_model(reference).params["embed", "weight"])
    # Under bf16 the reference's block matrices are stored for the matmuls, as frozen stores the start's.
    stored = finetune.reference_params(spec, begin, torch.device("cpu"), torch.bfloat16)
    assert stored is not None
    q = ("blocks", "attn", "q", "weight")
    assert stored.get(q).dtype == torch.bfloat16
    assert torch.equal(stored.get(q), params.get(q).to(torch.bfloat16))
    model_json.write_text(json.dumps(recorded | {"config": recorded["config"] | {"norm_eps": 0.5}}))
    with pytest.raises(
        SpecError, match=r"^reference: .* is not the same architecture and size as .* \(norm_eps differ\)$"
    ):
        finetune.reference_params(spec, begin, torch.device("cpu"))
