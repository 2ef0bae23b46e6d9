"""DPO: the loss is eq. 7 in closed form, its gradient favours the chosen completion, and training widens the margin."""

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict

from zmaj.convert.load import Pretrained
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.models import gpt, llama
from zmaj.tasks import get_task
from zmaj.train import dpo, finetune, optim, step
from zmaj.train.logprobs import completion_batch, sequence_logprobs
from zmaj.train.pairs import Pair, file_rows, fitted, on_policy_pairs, read_pairs, text_pair, write_pairs

CONFIG = llama.LlamaConfig(
    vocab_size=16, context=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, init_std=0.1
)
FORWARD = step.bind(llama.forward, config=CONFIG)
PROMPTS = [[1, 2, 3], [4, 5], [6]]
CHOSEN = [[7, 8, 9], [10, 11], [12, 13, 14, 15]]
REJECTED = [[9, 8], [11, 10, 11], [15]]

logprob = st.floats(-30.0, 0.0)


@given(
    values=st.lists(st.tuples(logprob, logprob, logprob, logprob), min_size=1, max_size=5),
    beta=st.floats(0.01, 2.0),
)
def test_the_loss_is_eq_7_in_closed_form(
    device: torch.device, values: list[tuple[float, float, float, float]], beta: float
) -> None:
    pc, pr, rc, rr = (
        torch.tensor(column, dtype=torch.float64, device=device) for column in zip(*values, strict=True)
    )
    loss, metrics = dpo.dpo_loss(pc, pr, rc, rr, beta)
    # The difference of the implied rewards, in the code's order of operations so that signs agree at zero.
    margins = [beta * (a - c) - beta * (b - d) for a, b, c, d in values]
    # -log sigmoid(m) = log(1 + exp(-m)), written stably.
    expected = sum(max(-m, 0.0) + math.log1p(math.exp(-abs(m))) for m in margins) / len(margins)
    assert float(loss) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(metrics["reward_margin"]) == pytest.approx(sum(margins) / len(margins), abs=1e-9)
    assert float(metrics["accuracy"]) == sum(m > 0 for m in margins) / len(margins)


def test_a_hand_computed_pair(device: torch.device) -> None:
    pc, pr, rc, rr = (torch.tensor([x], device=device) for x in (-1.0, -3.0, -2.0, -2.0))
    loss, metrics = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    # margin = 0.5 * ((-1 + 2) - (-3 + 2)) = 1
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)))
    assert float(metrics["reward_chosen"]) == pytest.approx(0.5)
    assert float(metrics["reward_rejected"]) == pytest.approx(-0.5)
    assert float(metrics["accuracy"]) == 1.0


def test_the_gradient_pushes_chosen_up_and_rejected_down(device: torch.device) -> None:
    pc = torch.tensor([-5.0, -1.0], device=device, requires_grad=True)
    pr = torch.tensor([-4.0, -9.0], device=device, requires_grad=True)
    rc, rr = torch.tensor([-5.0, -2.0], device=device), torch.tensor([-5.0, -8.0], device=device)
    loss, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss.backward()
    assert pc.grad is not None
    assert pr.grad is not None
    assert bool((pc.grad < 0).all())  # descent raises log pi(chosen)
    assert bool((pr.grad > 0).all())  # and lowers log pi(rejected)
    # d/d(pc) of -log sigmoid(beta * m) = -beta * sigmoid(-beta * m), summed over the mean's 1/n.
    margin = 0.1 * ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(pc.grad, -0.1 * torch.sigmoid(-margin) / 2)


def run_dpo(steps: int, device: torch.device) -> tuple[list[dict[str, float]], torch.Tensor, torch.Tensor]:
    reference = llama.init(CONFIG, seed=0, device=device)
    before = reference.clone()
    batch = dpo.preference_batch(PROMPTS, CHOSEN, REJECTED, device)
    state = step.init_state(reference.clone())
    history = []
    for _ in range(steps):
        state, metrics = dpo.dpo_step(
            state,
            batch,
            forward=FORWARD,
            reference=reference,
            beta=0.5,
            optimizer=optim.AdamWConfig(lr=3e-3, weight_decay=0.0),
            lr=3e-3,
            decay=optim.decay_mask(reference),
        )
        history.append({key: float(value) for key, value in metrics.items()})
    assert (before == reference).all()
    logprobs = sequence_logprobs(FORWARD(state["params"], batch, dropout_seed=None), batch)
    reference_logprobs = sequence_logprobs(FORWARD(reference, batch, dropout_seed=None), batch)
    return history, logprobs - reference_logprobs, batch.tokens


def test_training_widens_the_margin_and_leaves_the_reference_alone(device: torch.device) -> None:
    history, log_ratios, _ = run_dpo(steps=15, device=device)
    first, last = history[0], history[-1]
    # Policy == reference at the start: every implied reward is zero and the loss is log 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert last["reward_margin"] > 1.0
    assert last["accuracy"] == 1.0
    assert last["loss"] < 0.5 * first["loss"]
    chosen, rejected = log_ratios[:3], log_ratios[3:]
    assert bool((chosen - rejected > 0).all())


def test_a_model_with_dropout_starts_at_log_2(device: torch.device) -> None:
    """Both forwards run without dropout (as TRL's ``disable_dropout``): with dropout in the policy's alone, a
    policy equal to its reference had a loss off log 2 and a margin of noise."""
    config = gpt.GPTConfig(vocab_size=16, context=32, d_model=32, n_layers=2, n_heads=4, dropout=0.5)
    reference = gpt.init(config, seed=0, device=device)
    _, metrics = dpo.dpo_step(
        step.init_state(reference.clone()),
        dpo.preference_batch(PROMPTS, CHOSEN, REJECTED, device),
        forward=step.bind(gpt.forward, config=config),
        reference=reference,
        beta=0.5,
        optimizer=optim.AdamWConfig(lr=3e-3),
        lr=3e-3,
        decay=optim.decay_mask(reference),
    )
    assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["reward_margin"]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("turn_end", ["<|end|>", "<|end|>\n"])
def test_a_pair_splits_where_the_answers_begin_though_a_token_straddles_it(turn_end: str) -> None:
    """The template writes "Assistant: " and the answers' first tokens take in its space ("ĠFive", "ĠSix"): the
    prompt ends before them, so the two prompts agree (the pair was refused when the answer tokens were those
    starting inside the answer). An answer ends with its end-of-turn marker, not with what the template writes
    after it (ChatML's newline after ``<|im_end|>``), which both answers would share."""
    template = (
        "{% for m in messages %}{{ ('Assistant: ' if m['role'] == 'assistant' else 'User: ') + m['content'] }}"
        "{{ '" + turn_end.replace("\n", "\\n") + "' if m['role'] == 'assistant' else '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    )
    trained = Tokenizer.train(["User: 2+3?\nAssistant: Five Six\n"] * 50, vocab_size=300)
    tokenizer = ModelTokenizer.from_zmaj(trained)
    tokenizer = ModelTokenizer(tokenizer.tokenizer, eos_token="<|end|>", chat_template=template)
    pair = text_pair(tokenizer, {"prompt": "2+3?", "chosen": "Five", "rejected": "Six"}, "row 1")
    assert tokenizer.tokenizer.id_to_token(pair.chosen[0]) == "ĠFive"
    assert tokenizer.decode(pair.prompt, False) == "User: 2+3?\nAssistant:"
    assert (tokenizer.decode(pair.chosen, False), tokenizer.decode(pair.rejected, False)) == (
        " Five<|end|>",
        " Six<|end|>",
    )


def test_pairs_whose_cut_answers_are_the_same_are_left_out_and_long_prompts_refused() -> None:
    """Cut to max_len, answers sharing their first tokens become one answer twice: margin 0 whatever the
    model, loss log 2 and no gradient, counted as ranked wrong. Such pairs go, with a warning."""
    named = [
        (Pair([1, 2], [7, 8, 9], [7, 8, 5]), "a"),  # the same two tokens within max_len 3
        (Pair([1, 2], [7, 9], [7, 8]), "b"),
        (Pair([1], [4], [4]), "c"),  # the same answer, cut or not
    ]
    assert fitted(named, 3) == [Pair([1, 2], [7, 9], [7, 8])]
    assert len(fitted(named, 10)) == 2
    with pytest.raises(ValueError, match="b: the prompt alone has 2 tokens, more than max_len 1"):
        fitted(named[1:], 1)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("[1, 2]", "row: Input should be a dictionary"),
        ('{"prompt": [1], "chosen": [2], "rejected": [3], "score": 1}', "score: Unexpected keyword argument"),
        ('{"prompt": [1], "chosen": "abc", "rejected": [3]}', "chosen: Input should be a valid list"),
        ('{"prompt": [1], "chosen": ["2"], "rejected": [3]}', "chosen.0: Input should be a valid integer"),
        ('{"prompt": [1], "chosen": [2]}', "rejected: Field required"),
        ('{"prompt": [], "chosen": [2], "rejected": [3]}', "the prompt has no token"),
        ('{"prompt": [1], "chosen": [-5], "rejected": [3]}', "token id -5 is outside the model's 16 tokens"),
        ('{"prompt": [1], "chosen": [2], "rejected": [16]}', "token id 16 is outside the model's 16 tokens"),
    ],
)
def test_a_damaged_pairs_file_is_refused_naming_its_line(tmp_path: Path, row: str, problem: str) -> None:
    """A resumed DPO run reads its pairs back: a damaged row used to surface as a TypeError traceback, some
    only mid-training, and an empty file as a ZeroDivisionError at the first batch."""
    path = tmp_path / "pairs.jsonl"
    pairs = [Pair(*row) for row in zip(PROMPTS, CHOSEN, REJECTED, strict=True)]
    write_pairs(path, pairs)
    assert read_pairs(path, CONFIG.vocab_size) == pairs
    path.write_text(path.read_text() + row + "\n")
    with pytest.raises(ValueError, match=f"{path}:4: (not a pair of token ids \\()?{re.escape(problem)}"):
        read_pairs(path, CONFIG.vocab_size)
    path.write_text("")
    with pytest.raises(ValueError, match=f"{path} holds no preference pair"):
        read_pairs(path, CONFIG.vocab_size)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ('{"prompt": "q", "chosen": 1, "rejected": "b"}', "need string fields prompt, chosen and rejected"),
        # half an emoji, spelled in JSON: tokenizers would raise a TypeError naming no file
        (
            '{"prompt": "q", "chosen": "a", "rejected": "b \\ud83d"}',
            r"rejected: not UTF-8 text \(U\+D83D at character 2\)",
        ),
    ],
)
def test_a_text_pair_that_is_not_text_is_refused_naming_its_line(
    tmp_path: Path, row: str, problem: str
) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + row + "\n")
    with pytest.raises(ValueError, match=rf"^bad pair at {re.escape(str(path))}:2: {problem}$"):
        file_rows(finetune.PairFiles(paths=[str(path)]))


def test_on_policy_pairs_prefer_the_right_answer_to_the_wrong_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """DPO widens the margin whichever answer a pair calls chosen, so a training test cannot tell pairs turned
    the wrong way round: here the sampler is a stand-in whose answers are known right or wrong."""
    tokenizer = ModelTokenizer.from_zmaj(Tokenizer.train(["Answer: 0123456789 +-*=?\n"] * 50, vocab_size=300))
    model = Pretrained(
        CONFIG.model_copy(update={"vocab_size": tokenizer.vocab_size}), TensorDict(), tokenizer
    )
    source = finetune.PairsFromTask(
        task=finetune.RLTask(name="arithmetic"), n_prompts=4, k=3, max_new_tokens=8, seed=5
    )
    problems = get_task("arithmetic").problems("train", 4, 5)
    # Problem 0: right, wrong, wrong; problem 1: wrong, wrong, right; problem 2: all right (no pair); problem 3:
    # all right, but the second answer ran into the token limit (no stop token), so its line is unfinished.
    right = [[True, False, False], [False, False, True], [True, True, True], [True, True, True]]
    answers = {
        (i, j): f"Answer: {p.answer if ok else int(p.answer) + 1}"
        for i, p in enumerate(problems)
        for j, ok in enumerate(right[i])
    }
    (stop, *_) = tokenizer.stop_ids

    def sampler(_: Pretrained, rows: list[list[int]], *args: object, **kwargs: object) -> list[list[int]]:
        assert len(rows) == 12  # k rows per prompt, prompt-major
        ids = [tokenizer.encode(answers[row // 3, row % 3]) for row in range(12)]
        return [answer if row == 10 else [*answer, stop] for row, answer in enumerate(ids)]

    monkeypatch.setattr(finetune, "sample_answers", sampler)
    found = on_policy_pairs(source, finetune.Start(model, "stand-in"))
    decoded = [(tokenizer.decode(pair.chosen), tokenizer.decode(pair.rejected)) for pair in found]
    expected = [
        (answers[0, 0], answers[0, 1]),
        (answers[1, 2], answers[1, 0]),
        (answers[3, 0], answers[3, 1]),
    ]
    assert decoded == expected


def test_a_preference_batch_is_the_chosen_rows_then_the_rejected_rows() -> None:
    """Swapped, the policy learns the opposite preference, and a margin read off the same batch still widens."""
    prompts, chosen, rejected = [[1, 2], [3]], [[4, 5], [6]], [[7], [8, 9]]
    batch = dpo.preference_batch(prompts, chosen, rejected)
    expected = completion_batch([[1, 2], [3], [1, 2], [3]], [[4, 5], [6], [7], [8, 9]])
    assert batch.tokens.tolist() == [[1, 2, 4], [3, 6, 0], [1, 2, 7], [3, 8, 9]]
    assert batch.loss_mask is not None
    assert expected.loss_mask is not None
    assert batch.loss_mask.tolist() == expected.loss_mask.tolist()
