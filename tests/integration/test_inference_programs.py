"""programs/generate.py, chat.py and perplexity.py end to end, against ``transformers`` on a tiny random Llama saved
as a Hugging Face folder (with a tiny zmaj tokenizer and its chat template beside it); sample.py on a tiny zmaj run;
generate.py, perplexity.py and sample.py on one whose checkpoint is damaged."""

import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import tokenizers
import torch
import transformers
import yaml
from tensordict import TensorDict

from tests.integration.programs import Result, run_program
from zmaj import checkpoint, fileio, text
from zmaj.convert.load import Pretrained, save_zmaj
from zmaj.convert.weights import smollm2_gguf
from zmaj.data.chat_template import Message
from zmaj.data.model_tokenizer import ModelTokenizer, bos_eos_processor
from zmaj.data.tokenizer import Tokenizer
from zmaj.infer import chat as infer_chat
from zmaj.infer import sample as infer_sample
from zmaj.infer import text as infer_text
from zmaj.models import gpt
from zmaj.train import optim
from zmaj.train.spec import PretrainSpec, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "the cat sat on the mat. the dog ate the bone. ",
    "def parse(tokens): return [t for t in tokens]\n",
] * 20
TEXT = "the cat sat on the mat, and the dog ate the bone; def parse(tokens): return tokens. naïve 🐍"
NEW_TOKENS = 12
SYSTEM = "be brief"
GREEDY = ["--max-new-tokens", NEW_TOKENS, "--temperature", 0, "--dtype", "float32"]


@pytest.fixture(scope="module")
def zmaj_tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def tokenizer(zmaj_tokenizer: Tokenizer) -> ModelTokenizer:
    return ModelTokenizer.from_zmaj(zmaj_tokenizer)


def save_llama(folder: Path, tokenizer: ModelTokenizer, context: int) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        initializer_range=0.1,  # sharp next-token distributions: argmax ties unlikely
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return model


@pytest.fixture(scope="module")
def llama(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: ModelTokenizer
) -> tuple[transformers.PreTrainedModel, Path]:
    folder = tmp_path_factory.mktemp("llama")
    return save_llama(folder, tokenizer, context=256), folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, tokenizer: ModelTokenizer) -> Path:
    """The same kind of model with a tokenizer that has no chat template."""
    folder = tmp_path_factory.mktemp("plain")
    save_llama(folder, ModelTokenizer(tokenizer.tokenizer, eos_token=tokenizer.eos_token), context=256)
    return folder


@pytest.fixture(scope="module")
def no_system(tmp_path_factory: pytest.TempPathFactory, tokenizer: ModelTokenizer) -> Path:
    """The same kind of model with a chat template that refuses a system message, as some real ones do."""
    assert tokenizer.chat_template is not None
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    folder = tmp_path_factory.mktemp("no-system")
    save_llama(folder, replace(tokenizer, chat_template=refuse + tokenizer.chat_template), context=256)
    return folder


def test_a_chat_template_that_refuses_the_conversation_is_one_line(no_system: Path) -> None:
    """generate.py and chat.py exit 2 naming the template's reason; chat.py used to refuse every message the
    user typed for it, each with the same line."""
    generated = run(
        "generate.py", "--model", no_system, "--chat", "--system", SYSTEM, "--prompt", "hi", *GREEDY
    )
    assert generated.returncode == 2
    assert (
        generated.stderr.strip().splitlines()[-1].endswith("--chat: chat template: System role not supported")
    )
    assert "Traceback" not in generated.stderr
    chatted = run("chat.py", "--model", no_system, "--system", SYSTEM, *GREEDY, stdin="hi\nhow\n")
    assert chatted.returncode == 2, chatted.stderr
    assert (
        chatted.stderr.strip().splitlines()[-1].endswith("--system: chat template: System role not supported")
    )
    assert "Traceback" not in chatted.stderr
    assert chatted.stdout == ""


def run(program: str, *args: object, stdin: str = "") -> Result:
    """The program's exit code and its output, run in this process (``tests.integration.programs``)."""
    return run_program(program, *args, stdin=stdin)


def greedy_reference(model: Any, prompt: list[int], tokenizer: ModelTokenizer) -> str:
    """transformers' greedy continuation, stopped at the tokenizer's stop tokens, decoded without them."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=list(tokenizer.stop_ids),
            pad_token_id=0,
        )
    new = [token for token in output[0, len(prompt) :].tolist() if token not in tokenizer.stop_ids]
    return tokenizer.decode(new)


def test_generate_prints_transformers_greedy_continuation(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer
) -> None:
    model, folder = llama
    prompt = "the cat sat"
    result = run(
        "generate.py",
        "--model",
        folder,
        "--prompt",
        prompt,
        "--max-new-tokens",
        NEW_TOKENS,
        "--temperature",
        0,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_reference(model, tokenizer.encode(prompt), tokenizer) + "\n"


@pytest.mark.slow
def test_compiled_generate_prints_the_same_continuation(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer
) -> None:
    """``--compile`` (batch 1: the compiled step's matrix-vector path, ``zmaj.nn.layers.matvec``, and
    attention over the written slots alone, ``zmaj.infer.generate.compile_step``) changes the speed, not the
    tokens. In a fresh interpreter: in this one the runtime shape checker wraps zmaj, and dynamo cannot trace
    its bookkeeping."""
    model, folder = llama
    prompt = "the cat sat"
    args = ["--model", folder, "--prompt", prompt, *GREEDY, "--compile"]
    done = subprocess.run(
        [sys.executable, ROOT / "programs" / "generate.py", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == greedy_reference(model, tokenizer.encode(prompt), tokenizer) + "\n"


def test_generate_with_prompt_lookup_prints_the_greedy_continuation(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer
) -> None:
    """``--prompt-lookup`` (``zmaj.infer.lookup``) drafts from a prompt that repeats itself; the text is
    transformers' greedy continuation all the same."""
    model, folder = llama
    prompt = "the cat sat on the mat, the cat sat on the"
    result = run("generate.py", "--model", folder, "--prompt", prompt, *GREEDY, "--prompt-lookup", 5)
    assert result.returncode == 0, result.stderr
    assert "prompt lookup of up to 5 tokens a pass" in result.stderr
    assert result.stdout == greedy_reference(model, tokenizer.encode(prompt), tokenizer) + "\n"


SAMPLED = ["--max-new-tokens", NEW_TOKENS, "--temperature", 1, "--dtype", "float32"]


def test_generate_is_greedy_by_default(llama: tuple[Any, Path], tokenizer: ModelTokenizer) -> None:
    """--help says temperature 0 is the default: without --temperature the completion is transformers' greedy
    one (every other test passes --temperature 0, so a sampling default went unnoticed)."""
    model, folder = llama
    result = run("generate.py", "--model", folder, "--prompt", "the cat sat", "--max-new-tokens", NEW_TOKENS)
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_reference(model, tokenizer.encode("the cat sat"), tokenizer) + "\n"


@pytest.mark.parametrize("flag", [["--top-p", "1e-6"], ["--top-k", "1"]])
def test_generate_applies_top_k_and_top_p(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer, flag: list[str]
) -> None:
    """A nucleus of almost no probability, or the single most likely token, leaves only the argmax: sampling at
    temperature 1 is then greedy decoding. A flag parsed but not passed on sampled from the whole vocabulary."""
    model, folder = llama
    result = run("generate.py", "--model", folder, "--prompt", "the cat sat", *SAMPLED, *flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_reference(model, tokenizer.encode("the cat sat"), tokenizer) + "\n"


def test_generate_samples_with_its_seed(llama: tuple[Any, Path]) -> None:
    """The same --seed samples the same completion, another seed another one."""
    _, folder = llama
    args = ["--model", folder, "--prompt", "the cat sat", *SAMPLED]
    first, again, other = (run("generate.py", *args, "--seed", seed) for seed in (1, 1, 2))
    assert first.returncode == again.returncode == other.returncode == 0, first.stderr + other.stderr
    assert first.stdout == again.stdout != other.stdout


def test_generate_fills_the_context_exactly(tmp_path: Path, tokenizer: ModelTokenizer) -> None:
    """A prompt plus --max-new-tokens of exactly the model's context is generated; one token more is refused,
    naming both numbers."""
    folder = tmp_path / "short"
    folder.mkdir()
    save_llama(folder, tokenizer, context=32)
    room = 32 - len(tokenizer.encode("the cat sat"))
    args = ["--model", folder, "--prompt", "the cat sat", "--temperature", 0, "--dtype", "float32"]
    fits = run("generate.py", *args, "--max-new-tokens", room)
    assert fits.returncode == 0, fits.stderr
    over = run("generate.py", *args, "--max-new-tokens", room + 1)
    assert over.returncode == 2
    assert f"--max-new-tokens {room + 1} exceed the model's context of 32" in over.stderr


def test_generate_refuses_a_system_message_without_chat(llama: tuple[Any, Path]) -> None:
    """A plain prompt has no place for --system: it is refused, not dropped."""
    _, folder = llama
    result = run("generate.py", "--model", folder, "--prompt", "hi", "--system", SYSTEM, *GREEDY)
    assert result.returncode == 2
    assert "--system needs --chat" in result.stderr.strip().splitlines()[-1]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def generated_chat(llama: tuple[Any, Path]) -> Result:
    _, folder = llama
    return run("generate.py", "--model", folder, "--chat", "--system", SYSTEM, "--prompt", "hi", *GREEDY)


def chat_ids(tokenizer: ModelTokenizer, *turns: str) -> list[int]:
    """A conversation of alternating user and assistant turns, with the system message, ready for an answer."""
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": role, "content": turn} for role, turn in zip(roles, turns, strict=False)]
    return tokenizer.encode_chat([{"role": "system", "content": SYSTEM}, *messages])


def test_generate_chat_renders_the_template(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer, generated_chat: Result
) -> None:
    model, _ = llama
    ids = chat_ids(tokenizer, "hi")
    rendered = tokenizer.decode(ids, skip_special_tokens=False)
    assert rendered == f"<|system|>{SYSTEM}<|end|><|user|>hi<|end|><|assistant|>"
    assert generated_chat.returncode == 0, generated_chat.stderr
    assert generated_chat.stdout == greedy_reference(model, ids, tokenizer) + "\n"


def test_chat_answers_as_generate_keeping_the_history_until_reset(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer, generated_chat: Result
) -> None:
    model, folder = llama
    result = run(
        "chat.py",
        "--model",
        folder,
        "--system",
        SYSTEM,
        *GREEDY,
        # A message that cannot fit is refused without forgetting the conversation (it used to forget it all).
        stdin=f"hi\n{'the cat sat on the mat. ' * 100}\nhow\n/reset\nhow\n/exit\nnever read\n",
    )
    assert result.returncode == 0, result.stderr
    assert "do not fit the model's context" in result.stderr
    first = greedy_reference(model, chat_ids(tokenizer, "hi"), tokenizer)
    second = greedy_reference(model, chat_ids(tokenizer, "hi", first, "how"), tokenizer)
    after_reset = greedy_reference(model, chat_ids(tokenizer, "how"), tokenizer)
    assert result.stdout.startswith(generated_chat.stdout)
    assert result.stdout == f"{first}\n{second}\n{after_reset}\n"
    # The cache is kept from turn to turn (the second answer prefills only its new tokens) and /reset empties it.
    reused = re.findall(r"new tokens after (\d+) cached ones", result.stderr)
    assert [int(count) > 0 for count in reused] == [False, True, False]


@pytest.mark.parametrize("program", ["generate.py", "chat.py"])
def test_each_answer_prefills_into_the_cache_made_for_it(
    llama: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch, program: str
) -> None:
    """generate.py's cache and each chat turn's (the context's copy, resized) are made for one answer, so the
    prefill writes into them (``stream(donate=True)``): a copying prefill held up to three caches at once."""
    donated: list[bool] = []
    for module in (infer_text, infer_chat):
        real = module.stream

        def spy(*args: Any, real: Any = real, **kwargs: Any) -> Any:
            donated.append(kwargs.get("donate", False))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "stream", spy)
    _, folder = llama
    args = ["--model", folder, *GREEDY] + (["--prompt", "the cat"] if program == "generate.py" else [])
    result = run(program, *args, stdin="hi\nhow\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert donated == [True] * (1 if program == "generate.py" else 2)


def test_generate_into_a_closed_pipe_stops_without_a_traceback(llama: tuple[Any, Path]) -> None:
    """``generate.py ... | head -c 3``: the reader gone, the next write was a BrokenPipeError traceback."""
    _, folder = llama
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first piece is written
    program = [sys.executable, ROOT / "programs" / "generate.py"]
    command = [str(word) for word in (*program, "--model", folder, "--prompt", "hi", *GREEDY)]
    try:
        done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, check=False)
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_chat_with_stdin_closed_is_one_line(llama: tuple[Any, Path]) -> None:
    """``chat.py <&-`` was an AttributeError traceback on ``sys.stdin.isatty()``, after the model loaded."""
    _, folder = llama
    command = f"{sys.executable} {ROOT / 'programs' / 'chat.py'} --model {folder} <&-"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("stdin is closed: chat.py reads the user's messages from it")
    )


def test_chat_refuses_max_new_tokens_that_leave_no_room_for_a_message(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer
) -> None:
    """It refused every message instead, each with the same line, for as long as the user typed. A message
    takes a token at least, beside the template (and the system message, part of every conversation)."""
    model, folder = llama
    context = model.config.max_position_embeddings
    least = len(tokenizer.encode_chat([{"role": "user", "content": ""}]))
    assert len(tokenizer.encode_chat([{"role": "user", "content": "a"}])) == least + 1
    result = run("chat.py", "--model", folder, "--max-new-tokens", context - least, stdin="a\n")
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"--max-new-tokens {context - least} leaves no room for a message in the model's context of {context} "
            f"tokens (the chat template alone takes {least})"
        )
    )
    sets = ("--max-new-tokens", context - least - 1, "--temperature", 0)
    result = run("chat.py", "--model", folder, *sets, stdin="a\n")  # a message of one token fits
    assert result.returncode == 0, result.stderr
    assert "do not fit" not in result.stderr
    assert result.stdout.strip()
    with_system = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ""}]
    result = run("chat.py", "--model", folder, *sets, "--system", SYSTEM, stdin="a\n")
    assert result.returncode == 2, result.stderr
    assert (
        f"(the chat template and --system alone take {len(tokenizer.encode_chat(with_system))})"
        in result.stderr
    )


def test_logits_past_the_range_of_float32_are_one_line(llama: tuple[Any, Path], tmp_path: Path) -> None:
    """Finite weights can still give logits that are not (here a final norm scale of 3e38): generate.py and
    chat.py ended with a traceback; greedy decoding, before it checked, printed token 0 over and over."""
    _, folder = llama
    shutil.copytree(folder, tmp_path / "model")
    weights = safetensors.torch.load_file(tmp_path / "model" / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 3e38)
    safetensors.torch.save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    for program, args, stdin in (("generate.py", ["--prompt", "hi"], ""), ("chat.py", [], "hi\n")):
        result = run(program, "--model", tmp_path / "model", *args, *GREEDY, stdin=stdin)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert (
            result.stderr.strip()
            .splitlines()[-1]
            .endswith("the model's logits are not finite (NaN or infinite): no token follows from them")
        )
        # The answer so far ends its line: the shell's prompt starts its own.
        assert result.stdout.endswith("\n")


def test_chat_refuses_a_line_that_is_not_utf8_and_goes_on(llama: tuple[Any, Path], tmp_path: Path) -> None:
    """Bytes that are not UTF-8 on stdin (a Latin-1 terminal) are refused, one line, and the conversation goes
    on; they used to end it with a traceback. Run as its own process with a strict stdin, where Python itself
    would raise on the bytes."""
    _, folder = llama
    args = ["--model", folder, *GREEDY]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run(
        [sys.executable, ROOT / "programs" / "chat.py", *map(str, args)],
        input=b"hi\ncaf\xe9\nhow\n",
        capture_output=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    errors = [line for line in done.stderr.decode().splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert errors[0].endswith(
        "this message is not UTF-8 text (byte 0xe9 at character 3): the model reads text"
    )
    plain = run("chat.py", *args, stdin="hi\nhow\n")
    assert done.stdout.decode() == plain.stdout


def test_chat_reads_a_windows_line_end_as_a_line_end(llama: tuple[Any, Path]) -> None:
    """Messages piped from a file written on Windows end in "\\r\\n" (Python's stdin keeps the "\\r"): the "\\r"
    is no part of the message (kept, the model answered another prompt than the one typed)."""
    _, folder = llama
    args = ["--model", folder, *GREEDY]
    crlf = run("chat.py", *args, stdin="hi\r\nhow\r\n")
    plain = run("chat.py", *args, stdin="hi\nhow\n")
    assert crlf.returncode == plain.returncode == 0, crlf.stderr
    assert crlf.stdout == plain.stdout


def test_chat_seeds_answer_i_with_seed_plus_i_whatever_lines_came_before(llama: tuple[Any, Path]) -> None:
    """--help: "answer i is sampled with seed + i": after /reset the second answer to the same message is
    generate.py's with --seed 6, not a repeat of the first. Blank lines and commands are no answers: they used
    to shift the seed of every answer after them."""
    _, folder = llama
    sampled = ["--model", folder, "--system", SYSTEM, *SAMPLED]
    plain = run("chat.py", *sampled, "--seed", 5, stdin="hi\n/reset\nhi\n")
    padded = run("chat.py", *sampled, "--seed", 5, stdin="\n/reset\nhi\n\n/reset\nhi\n")
    assert plain.returncode == padded.returncode == 0, plain.stderr + padded.stderr
    alone = [
        run("generate.py", *sampled, "--chat", "--prompt", "hi", "--seed", seed).stdout for seed in (5, 6)
    ]
    assert alone[0] != alone[1]
    assert plain.stdout == padded.stdout == "".join(alone)


def test_chat_forgets_whole_exchanges_oldest_first(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer
) -> None:
    """When the conversation no longer fits, its oldest user message goes with its answer: the next prompt starts
    at a user turn, as templates expect (forgetting one message at a time left an assistant turn first, and
    forgot more than needed)."""
    model, folder = llama
    messages = ["the cat sat on the mat. " * 10, "the dog ate the bone. " * 10, "the cat ate the bone. " * 10]
    stdin = "".join(f"{message}\n" for message in messages)
    result = run("chat.py", "--model", folder, "--system", SYSTEM, *GREEDY, stdin=stdin)
    assert result.returncode == 0, result.stderr
    first = greedy_reference(model, chat_ids(tokenizer, messages[0]), tokenizer)
    second = greedy_reference(model, chat_ids(tokenizer, messages[0], first, messages[1]), tokenizer)
    whole = chat_ids(tokenizer, messages[0], first, messages[1], second, messages[2])
    kept = chat_ids(tokenizer, messages[1], second, messages[2])
    assert (
        len(kept) + NEW_TOKENS <= 256 < len(whole) + NEW_TOKENS
    )  # the first exchange must go, and is enough
    third = greedy_reference(model, kept, tokenizer)
    assert result.stdout == f"{first}\n{second}\n{third}\n"
    assert result.stderr.count("forgetting its oldest exchange") == 1


def test_chat_keeps_an_exchange_while_the_next_answer_fits_exactly(
    tokenizer: ModelTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt and ``--max-new-tokens`` filling the context exactly still fit: the exchange is kept, and one
    token less of context forgets it (a ``<`` forgot what fits)."""
    monkeypatch.syspath_prepend(str(ROOT / "programs"))
    from chat import fitting

    system: list[Message] = [{"role": "system", "content": SYSTEM}]
    history: list[Message] = [
        {"role": "user", "content": "the cat sat"},
        {"role": "assistant", "content": "on the mat"},
    ]
    user = {"role": "user", "content": "the dog ate"}
    needed = len(tokenizer.encode_chat([*system, *history, user])) + NEW_TOKENS
    config = gpt.GPTConfig(vocab_size=tokenizer.vocab_size, context=needed, d_model=16, n_layers=1, n_heads=2)
    model = Pretrained(config, gpt.init(config, 0, "meta"), tokenizer)
    assert fitting(model, system, history, user, NEW_TOKENS) == history
    smaller = config.model_copy(update={"context": needed - 1})
    assert fitting(replace(model, config=smaller), system, history, user, NEW_TOKENS) == []


def reference_nll(model: Any, ids: list[int], context: int, stride: int) -> tuple[int, float]:
    """The transformers perplexity guide's loop, counting the tokens each window actually predicts."""
    total, count, prev_end = 0.0, 0, 0
    tokens = torch.tensor([ids])
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        target_len = end - prev_end
        inputs = tokens[:, begin:end]
        targets = inputs.clone()
        targets[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(inputs, labels=targets).loss
        predicted = int((targets[:, 1:] != -100).sum())
        total += float(loss) * predicted
        count += predicted
        prev_end = end
        if end == len(ids):
            break
    return count, total / count


def test_perplexity_of_a_text_within_the_context(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    model, folder = llama
    (tmp_path / "text.txt").write_text(TEXT)
    result = run(
        "perplexity.py", "--model", folder, "--text-file", tmp_path / "text.txt", "--dtype", "float32"
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    scored = json.loads(line)
    ids = tokenizer.encode(TEXT)
    with torch.no_grad():
        expected = float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    assert scored["tokens"] == len(ids) - 1
    assert scored["nll"] == pytest.approx(expected, abs=1e-4)
    assert scored["ppl"] == pytest.approx(math.exp(expected), rel=1e-4)


@pytest.mark.parametrize(("context", "stride"), [(16, 5)])
def test_perplexity_with_a_sliding_window(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer, tmp_path: Path, context: int, stride: int
) -> None:
    model, folder = llama
    (tmp_path / "text.txt").write_text(TEXT)
    args = ["--context", context, "--stride", stride, "--dtype", "float32"]
    result = run("perplexity.py", "--model", folder, "--text-file", tmp_path / "text.txt", *args)
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    ids = tokenizer.encode(TEXT)
    assert len(ids) > 2 * context
    count, nll = reference_nll(model, ids, context, stride)
    assert scored["tokens"] == count
    assert scored["nll"] == pytest.approx(nll, abs=1e-4)


def test_perplexity_of_the_first_tokens_only(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """Bits per byte are over the bytes the scored tokens were read from: a special token's text included (a
    decoding of the tokens, which skips special tokens, undercounted them)."""
    model, folder = llama
    text = "the cat<|end|> sat on the mat. " + TEXT
    (tmp_path / "text.txt").write_text(text)
    args = ["--max-tokens", 10, "--dtype", "float32"]
    result = run("perplexity.py", "--model", folder, "--text-file", tmp_path / "text.txt", *args)
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    ids = tokenizer.encode(text)[:10]
    with torch.no_grad():
        expected = float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    assert scored["tokens"] == 9
    assert scored["nll"] == pytest.approx(expected, abs=1e-4)
    spelled = tokenizer.decode(ids, skip_special_tokens=False)
    first = tokenizer.decode(ids[:1], skip_special_tokens=False)
    assert "<|end|>" in spelled
    assert text.startswith(spelled)
    assert spelled.startswith(first)
    assert scored["bytes"] == len(spelled.encode("utf-8")) - len(first.encode("utf-8"))
    # A text one token longer than --max-tokens is cut too (the off-by-one scored it whole).
    eleven = tokenizer.decode(tokenizer.encode(text)[:11], skip_special_tokens=False)
    assert len(tokenizer.encode(eleven)) == 11
    (tmp_path / "text.txt").write_text(eleven)
    result = run("perplexity.py", "--model", folder, "--text-file", tmp_path / "text.txt", *args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == 9


def test_perplexity_bits_per_byte_are_the_summed_nll_in_bits_over_the_utf8_bytes(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """On a text with two- and four-byte characters (naïve, 🐍): characters are not bytes, and the NLL summed over
    the predicted tokens (not its mean, not one token more) goes over the bytes they spell: the text's less its
    first token's, which nothing predicts (lm-eval prefixes a token to predict it; the NLL here is the
    transformers guide's, which does not)."""
    _, folder = llama
    first = tokenizer.decode(tokenizer.encode(TEXT)[:1])
    assert TEXT.startswith(first)
    assert first
    (tmp_path / "text.txt").write_text(TEXT)
    result = run(
        "perplexity.py", "--model", folder, "--text-file", tmp_path / "text.txt", "--dtype", "float32"
    )
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    assert scored["bytes"] == len(TEXT.encode("utf-8")) - len(first.encode("utf-8"))
    assert scored["bytes"] > len(TEXT) - len(first)
    bits = scored["nll"] * scored["tokens"] / math.log(2)
    assert scored["bits_per_byte"] == pytest.approx(bits / scored["bytes"], rel=1e-9)


@pytest.mark.parametrize("start", ["ж", "🐍"])
def test_perplexity_counts_the_bytes_of_a_character_the_first_token_only_begins(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer, tmp_path: Path, start: str
) -> None:
    """The first token is the first byte of a character the vocabulary has no token for ("ж" is Ð ¶): the
    predicted tokens spell that character's other bytes, which bits per byte must count."""
    _, folder = llama
    text = start + " " + TEXT
    ids = tokenizer.encode(text)
    assert tokenizer.tokenizer.id_to_token(ids[0]) in ("Ð", "ð")  # one byte, of a 2- or 4-byte character
    (tmp_path / "text.txt").write_text(text)
    result = run(
        "perplexity.py", "--model", folder, "--text-file", tmp_path / "text.txt", "--dtype", "float32"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bytes"] == len(text.encode("utf-8")) - 1


@pytest.mark.parametrize("split", ["ж", "🐍"])
def test_perplexity_of_the_first_tokens_counts_only_the_bytes_of_a_character_they_begin(
    llama: tuple[Any, Path], tokenizer: ModelTokenizer, tmp_path: Path, split: str
) -> None:
    """--max-tokens cuts inside a character (one token per byte here: "ж" is Ð ¶, "🐍" ð Ł Ĳ į): the offsets
    cover the whole character, but the scored tokens spell only its first bytes. Each byte-level token spells
    one byte per character of its own text, which counts them independently of the offsets."""
    _, folder = llama
    text = "the cat " + split + " sat on the mat"
    tokens = tokenizer.tokenizer.encode(text).tokens
    first = tokens.index("Ð" if len(split.encode()) == 2 else "ð")
    (tmp_path / "text.txt").write_text(text)
    for n in range(first + 1, first + len(split.encode())):  # after the first byte, up to before the last
        args = ["--max-tokens", n, "--dtype", "float32"]
        result = run("perplexity.py", "--model", folder, "--text-file", tmp_path / "text.txt", *args)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["bytes"] == sum(map(len, tokens[1:n]))


def llama_with_bos(
    tokenizer: ModelTokenizer, folder: Path
) -> tuple[ModelTokenizer, transformers.PreTrainedModel]:
    """The fixture's tokenizer adding a BOS token before every text, and a tiny Llama saved with it."""
    inner = tokenizers.Tokenizer.from_str(tokenizer.tokenizer.to_str())
    inner.post_processor = bos_eos_processor(inner, tokenizer.bos_token, None)
    with_bos = replace(tokenizer, tokenizer=inner, add_bos=True)
    return with_bos, save_llama(folder, with_bos, context=256)


def test_generate_continues_an_empty_prompt_from_the_bos_token(
    tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """An empty --prompt is refused only where the tokenizer adds no BOS token; where it adds one, the BOS token
    alone is a prompt the model continues (a check of the text instead of the ids refused it too)."""
    llama_with_bos(tokenizer, tmp_path / "bos")
    result = run("generate.py", "--model", tmp_path / "bos", "--prompt", "", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert "prompt of 1 tokens" in result.stderr
    assert result.stdout.endswith("\n")


def test_perplexity_with_a_bos_token_counts_every_byte_of_the_file(
    tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """Where the tokenizer adds a BOS token, the first predicted token is the text's first: bits per byte are
    over all the file's bytes (perplexity.py's docstring: "none where the first token is a BOS token")."""
    folder = tmp_path / "bos"
    with_bos, model = llama_with_bos(tokenizer, folder)
    (tmp_path / "text.txt").write_text(TEXT)
    result = run(
        "perplexity.py", "--model", folder, "--text-file", tmp_path / "text.txt", "--dtype", "float32"
    )
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    ids = with_bos.encode(TEXT)
    assert ids[0] == with_bos.token_id(with_bos.bos_token) != tokenizer.encode(TEXT)[0]
    with torch.no_grad():
        expected = float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    assert scored["tokens"] == len(ids) - 1
    assert scored["nll"] == pytest.approx(expected, abs=1e-4)
    assert scored["bytes"] == len(TEXT.encode("utf-8"))


def test_perplexity_of_a_text_of_one_token_is_refused(llama: tuple[Any, Path], tmp_path: Path) -> None:
    """One token is nothing to predict (no BOS before it): refused naming the count, where the mean NLL of no
    predicted token was 0 / 0."""
    _, folder = llama
    (tmp_path / "text.txt").write_text("the")
    result = run("perplexity.py", "--model", folder, "--text-file", tmp_path / "text.txt")
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(f"--text-file {tmp_path / 'text.txt'}: 1 tokens, but perplexity needs at least 2")
    )


def test_perplexity_of_tokens_that_spell_no_text_is_refused(
    tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """ "the" and the EOS the tokenizer appends: one predicted token, which spells nothing, so bits per byte
    (over the predicted tokens' bytes) divided by zero, a traceback."""
    inner = tokenizers.Tokenizer.from_str(tokenizer.tokenizer.to_str())  # the fixture's own stays as it is
    inner.post_processor = bos_eos_processor(inner, None, tokenizer.eos_token)
    appends_eos = replace(tokenizer, tokenizer=inner, add_eos=True)
    assert appends_eos.encode("the") == [*tokenizer.encode("the"), tokenizer.eos_id]
    assert len(tokenizer.encode("the")) == 1
    save_llama(tmp_path / "model", appends_eos, context=64)
    (tmp_path / "text.txt").write_text("the")
    result = run("perplexity.py", "--model", tmp_path / "model", "--text-file", tmp_path / "text.txt")
    assert result.returncode == 2
    assert "the predicted tokens spell no text, so bits per byte are undefined" in result.stderr
    assert "Traceback" not in result.stderr


def test_perplexity_strides_half_the_context_by_default(llama: tuple[Any, Path], tmp_path: Path) -> None:
    """Without --stride the windows move by half the context, as --help says: for a context of 16, the score of
    --stride 8, which differs from another stride's on this text."""
    _, folder = llama
    (tmp_path / "text.txt").write_text(TEXT)
    args = ["--model", folder, "--text-file", tmp_path / "text.txt", "--context", 16, "--dtype", "float32"]
    default, half, other = (
        run("perplexity.py", *args, *stride) for stride in ([], ["--stride", 8], ["--stride", 15])
    )
    assert default.returncode == half.returncode == other.returncode == 0, default.stderr + other.stderr
    assert json.loads(default.stdout) == json.loads(half.stdout)
    assert json.loads(other.stdout)["nll"] != json.loads(half.stdout)["nll"]


@pytest.fixture(scope="module")
def binary_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text, then bytes that are not UTF-8: 0xff at offset 6."""
    path = tmp_path_factory.mktemp("binary") / "weights.bin"
    path.write_bytes(b"hello \xff\xfe\x00\x01")
    return path


@pytest.mark.parametrize(
    ("program", "args", "message"),
    [
        ("generate.py", ["--prompt", "hi", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ("generate.py", ["--prompt", "hi", "--chat"], "no chat template"),
        ("generate.py", ["--prompt", "hi", "--seed", str(2**64)], "--seed: expected a whole number from 0"),
        ("evaluate.py", ["--task", "arithmetic", "--seed", "-3"], "--seed: expected a whole number from 0"),
        # A base model in evaluate's default (chat) mode was told "use a plain prompt, not --chat", a flag it
        # has not got.
        (
            "evaluate.py",
            ["--task", "arithmetic", "--n", "2"],
            "has no chat template, which a question in chat mode (the default) needs: --few-shot K",
        ),
        (
            "generate.py",
            ["--prompt", "hi", "--temperature", "inf"],
            "--temperature: Input should be a finite",
        ),
        # A byte that is not UTF-8 on the command line comes as a lone surrogate (PEP 383), which the tokenizer
        # refused with a TypeError traceback.
        ("generate.py", ["--prompt", "caf\udce9"], "--prompt: not UTF-8 text (byte 0xe9 at character 3)"),
        (
            "generate.py",
            ["--prompt", "hi", "--chat", "--system", "\udcff"],
            "--system: not UTF-8 text (byte 0xff at character 0)",
        ),
        ("chat.py", ["--system", "x\udce9"], "--system: not UTF-8 text (byte 0xe9 at character 1)"),
        # Greedy decoding (generate's default temperature) would ignore them in silence.
        (
            "generate.py",
            ["--prompt", "hi", "--top-p", "0.9", "--top-k", "5"],
            "--top-k and --top-p shape sampling, but --temperature 0 decodes greedily",
        ),
        ("chat.py", ["--temperature", "0", "--top-p", "0.9"], "--top-p shape sampling, but --temperature 0"),
        (
            "generate.py",
            ["--prompt", "hi", "--prompt-lookup", "-1"],
            "--prompt-lookup must be 0 (off) or more",
        ),
        (
            "generate.py",
            ["--prompt", "hi", "--prompt-lookup", "4", "--temperature", "0.5"],
            "--prompt-lookup decodes greedily: not with --temperature above 0",
        ),
        (
            "generate.py",
            ["--prompt", "hi", "--prompt-lookup", "4", "--compile"],
            "--prompt-lookup runs its passes eagerly",
        ),
        (
            "perplexity.py",
            ["--text-file", "/no/such/text.txt"],
            "--text-file /no/such/text.txt: no such file",
        ),
        (
            "perplexity.py",
            ["--text-file", ROOT / "tests"],
            f"--text-file {ROOT / 'tests'}: not a regular file",
        ),
        (
            "perplexity.py",
            ["--text-file", "BINARY"],
            "--text-file BINARY: not UTF-8 text (byte 0xff at offset 6)",
        ),
        (
            "perplexity.py",
            ["--text-file", ROOT / "README.md", "--max-tokens", 1],
            "--max-tokens must be at least 2",
        ),
        (  # positions past the model's context: RoPE's never trained, or GPT's learned table run out
            "perplexity.py",
            ["--text-file", ROOT / "README.md", "--context", 100_000],
            "--context must be between 2 and the model's context of",
        ),
        (  # every chunk's first token unscored, while bits per byte count all the bytes
            "perplexity.py",
            ["--text-file", ROOT / "README.md", "--context", 8, "--stride", 8],
            "--stride must be between 1 and the context - 1 (7)",
        ),
    ],
)
def test_bad_input_exits_2_naming_it(
    plain: Path, binary_file: Path, program: str, args: list[str], message: str
) -> None:
    args = [str(binary_file) if arg == "BINARY" else arg for arg in args]
    message = message.replace("BINARY", str(binary_file))
    result = run(program, "--model", plain, *args)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/no/such/model", "--model: no model at /no/such/model"),
        ("pypi:no-such-model", "--model: unknown model 'pypi:no-such-model'; shipped models: pypi:smollm2"),
    ],
)
def test_a_missing_model_exits_2_naming_it(model: str, message: str) -> None:
    result = run("generate.py", "--model", model, "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert message in result.stderr


def test_files_this_user_may_not_read_exit_2_naming_them(
    plain: Path, zmaj_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model's weights, or a text, that are another user's (saved 0600 on a shared machine) were a traceback,
    or for the weights "No such file or directory": safetensors calls a file it may not open missing. (The
    suite may run as root, who reads every file, so the denial is played by the open itself.)"""

    def denied(path: Path, mode: str = "r") -> Any:
        if str(path).endswith((".safetensors", ".txt")):
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, mode)

    config = gpt.GPTConfig(
        vocab_size=zmaj_tokenizer.vocab_size, context=32, d_model=16, n_layers=1, n_heads=2
    )
    tokenizer = ModelTokenizer.from_zmaj(zmaj_tokenizer)
    zmaj_folder = save_zmaj(Pretrained(config, gpt.init(config, 0), tokenizer), tmp_path / "zmaj")
    monkeypatch.setattr(fileio, "open", denied, raising=False)
    for model, weights in [(plain, "model.safetensors"), (zmaj_folder, "params.safetensors")]:
        result = run("generate.py", "--model", model, "--prompt", "hi")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"ERROR | --model: [Errno 13] Permission denied: '{model / weights}'"
        ]
    (tmp_path / "corpus.txt").write_text("someone else's text")
    monkeypatch.setattr(text, "read_text", denied)
    result = run("perplexity.py", "--model", plain, "--text-file", tmp_path / "corpus.txt")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [f"ERROR | --text-file {tmp_path / 'corpus.txt'}: Permission denied"]


def tiny_run(
    folder: Path, tokenizer: Tokenizer, poison: Callable[[TensorDict], object] | None = None
) -> Path:
    """A pre-training run of a tiny random GPT, one checkpoint, as ``sample.py`` reads one; ``poison`` changes
    its parameters first (a run that diverged, saved by a zmaj that did not check)."""
    config = gpt.GPTConfig(vocab_size=tokenizer.vocab_size, context=32, d_model=16, n_layers=2, n_heads=2)
    spec = PretrainSpec(
        name="tiny",
        model=config,
        data={"vocab_size": config.vocab_size, "seq_len": 16},
        train=TrainConfig(steps=1, batch_size=1),
    )
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    tokenizer.save(folder / "tokenizer.json")
    params = gpt.init(config, 0)
    if poison is not None:
        poison(params)
    state = TensorDict({"params": params, "opt": optim.adamw_init(params)})
    checkpoint.save(folder, state, {"spec": spec.model_dump(mode="json")})  # as the loop records it
    return folder


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory, zmaj_tokenizer: Tokenizer) -> Path:
    return tiny_run(tmp_path_factory.mktemp("run"), zmaj_tokenizer)


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory: pytest.TempPathFactory, zmaj_tokenizer: Tokenizer) -> Path:
    """A tiny pre-training run whose newest checkpoint's parameters were cut short, as by a full disk."""
    run = tiny_run(tmp_path_factory.mktemp("damaged-run"), zmaj_tokenizer)
    os.truncate(run / "checkpoints" / "step-0000000" / "params.safetensors", 100)
    return run


@pytest.mark.parametrize(
    ("program", "args"),
    [
        ("generate.py", ["--model", "RUN", "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "4"]),
        ("perplexity.py", ["--model", "RUN", "--text-file", "TEXT"]),
        ("sample.py", ["RUN", "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "4"]),
    ],
)
def test_a_run_is_read_as_the_model_its_checkpoint_recorded_and_without_latest(
    zmaj_tokenizer: Tokenizer, tmp_path: Path, program: str, args: list[str]
) -> None:
    """A spec.yaml edited since (here the activation) loaded the weights into another network, exit 0; a run
    killed between its first checkpoint and ``latest`` resumed, but these said it had no checkpoint."""
    folder = tiny_run(tmp_path, zmaj_tokenizer)
    (folder / "checkpoints" / "latest").unlink()
    (tmp_path / "text.txt").write_text(TEXT)  # perplexity's text: short
    args = [str(tmp_path / "text.txt") if arg == "TEXT" else arg for arg in args]
    result = run(program, *(folder if arg == "RUN" else arg for arg in args))
    assert result.returncode == 0, result.stderr
    assert "checkpoints/latest is missing: reading" in result.stderr
    raw = yaml.safe_load((folder / "spec.yaml").read_text())
    raw["model"]["activation"] = "relu2" if raw["model"]["activation"] != "relu2" else "gelu"
    (folder / "spec.yaml").write_text(yaml.safe_dump(raw))
    result = run(program, *(folder if arg == "RUN" else arg for arg in args))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "step-0000000 was written with another model.activation than the run's spec.yaml says" in line


@pytest.mark.parametrize(
    ("program", "args"),
    [
        ("generate.py", ["--model", "RUN", "--prompt", "hi", "--temperature", "0"]),
        ("perplexity.py", ["--model", "RUN", "--text-file", __file__]),
        ("sample.py", ["RUN", "--prompt", "hi", "--temperature", "0"]),
    ],
)
def test_weights_that_are_not_finite_exit_2_naming_them(
    zmaj_tokenizer: Tokenizer, tmp_path: Path, program: str, args: list[str]
) -> None:
    """Greedy decoding read a NaN logit as the largest (token 0, exit 0); perplexity printed NaN as JSON."""
    diverged = tiny_run(tmp_path, zmaj_tokenizer, lambda params: params["embed", "weight"][3].fill_(math.nan))
    result = run(program, *(diverged if arg == "RUN" else arg for arg in args))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.endswith(
        ": the weights of embed.weight are not finite (NaN or infinite): a run that diverged? Its "
        "logits would be NaN"
    )
    assert str(diverged) in line
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("program", "args", "message"),
    [
        (
            "sample.py",
            ["RUN", "--prompt", "hi", "--temperature", "0"],
            "the model's logits are not finite (NaN or infinite): no token follows from them",
        ),
        (
            "perplexity.py",
            ["--model", "RUN", "--text-file", __file__, "--max-tokens", "64"],
            "the model's logits are not finite (NaN or infinite): its perplexity is undefined",
        ),
    ],
)
def test_logits_past_the_range_of_float32_from_a_run_are_one_line(
    zmaj_tokenizer: Tokenizer, tmp_path: Path, program: str, args: list[str], message: str
) -> None:
    """Finite weights whose logits are not (a final norm scale of 3e38): sample.py ended with a traceback and
    perplexity.py printed NaN, exit 0."""
    overflowing = tiny_run(
        tmp_path, zmaj_tokenizer, lambda params: params["final_norm", "weight"].fill_(3e38)
    )
    result = run(program, *(overflowing if arg == "RUN" else arg for arg in args))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(message)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("program", "args"),
    [
        ("generate.py", ["--model", "RUN", "--prompt", "hi"]),
        ("perplexity.py", ["--model", "RUN", "--text-file", __file__]),
        ("sample.py", ["RUN", "--prompt", "hi"]),
    ],
)
def test_a_damaged_checkpoint_exits_2_naming_the_file(
    damaged_run: Path, program: str, args: list[str]
) -> None:
    result = run(program, *(damaged_run if arg == "RUN" else arg for arg in args))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    params = damaged_run / "checkpoints" / "step-0000000" / "params.safetensors"
    assert f"damaged checkpoint file {params}: 100 bytes, expected " in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-k", "-1"], "--top-k: Input should be greater than 0"),
        (["--temperature", "-1"], "--temperature: Input should be greater than or equal to 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    ],
)
def test_sample_refuses_bad_sampling_flags_in_one_line(
    damaged_run: Path, flags: list[str], message: str
) -> None:
    """The flags are checked before the run is read (this one's checkpoint is damaged, and is not reached)."""
    result = run("sample.py", damaged_run, "--prompt", "hi", *flags)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert message in result.stderr


@pytest.mark.parametrize(
    ("program", "args"),
    [
        ("generate.py", ["--prompt", "hi"]),
        ("perplexity.py", ["--text-file", __file__]),
        ("evaluate.py", ["--task", "arithmetic", "--n", "2"]),
        ("evaluate.py", ["--harness", "zmaj_tiny", "--harness-include", ROOT / "tests" / "data" / "harness"]),
    ],
)
def test_a_tokenizer_larger_than_the_embedding_is_refused_in_one_line(
    zmaj_tokenizer: Tokenizer, tmp_path: Path, program: str, args: list[str | Path]
) -> None:
    """Tokens added without resizing the embeddings: the first id past its rows was an IndexError traceback
    inside the forward pass (a device-side assert on a GPU)."""
    rows = zmaj_tokenizer.vocab_size - 10
    config = gpt.GPTConfig(vocab_size=rows, context=32, d_model=16, n_layers=1, n_heads=2)
    model = Pretrained(config, gpt.init(config, 0), ModelTokenizer.from_zmaj(zmaj_tokenizer))
    folder = save_zmaj(model, tmp_path / "model")
    result = run(program, "--model", folder, *args)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("ERROR | ")
    assert line.endswith(
        f"{folder}: the tokenizer has {zmaj_tokenizer.vocab_size} tokens but the embedding only {rows} rows, so "
        f"ids from {rows} on index nothing (a tokenizer trained or extended without resizing the embeddings?)"
    )


def test_an_embedding_with_more_rows_than_tokens_is_fine(zmaj_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """Tables padded for speed (Qwen's 151,936 rows for 151,665 tokens) must not be refused."""
    rows = zmaj_tokenizer.vocab_size + 10
    config = gpt.GPTConfig(vocab_size=rows, context=32, d_model=16, n_layers=1, n_heads=2)
    model = Pretrained(config, gpt.init(config, 0), ModelTokenizer.from_zmaj(zmaj_tokenizer))
    folder = save_zmaj(model, tmp_path / "model")
    result = run("generate.py", "--model", folder, "--prompt", "hi", "--max-new-tokens", 2)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr


def test_an_added_token_past_the_embedding_is_warned_of_not_refused(
    zmaj_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """Real checkpoints ship such tokens (Gemma 3's ``<image_soft_token>`` at id 262,144, one past its 262,144
    rows), which text never encodes to: refusing the model would refuse Gemma 3 from Hugging Face."""
    inner = tokenizers.Tokenizer.from_str(zmaj_tokenizer.to_json())
    inner.add_special_tokens(["<image_soft_token>"])
    rows = zmaj_tokenizer.vocab_size
    config = gpt.GPTConfig(vocab_size=rows, context=32, d_model=16, n_layers=1, n_heads=2)
    model = Pretrained(config, gpt.init(config, 0), ModelTokenizer.from_zmaj(Tokenizer(inner)))
    folder = save_zmaj(model, tmp_path / "model")
    result = run("generate.py", "--model", folder, "--prompt", "hi", "--max-new-tokens", 2)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        f"WARNING | {folder}: the tokenizer's added tokens ['<image_soft_token>'] have no embedding row: text with "
        "them fails"
    ]


def test_sample_sends_a_lora_run_to_generate(pretrained_run: Path, tmp_path: Path) -> None:
    """A LoRA run's checkpoints hold adapters, which sample.py does not merge: it failed on missing tensors
    ['blocks.attn.k.bias', ...], as if the checkpoint were damaged. Its ``lora.json`` is what says so (here
    beside a plain run's checkpoint, which sample.py would otherwise read)."""
    run_dir = Path(shutil.copytree(pretrained_run, tmp_path / "lora-run"))
    (run_dir / "lora.json").write_text("{}")
    result = run("sample.py", run_dir, "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"ERROR | {run_dir} is not a zmaj GPT pre-training run: sample it with generate.py"
    ]


SAMPLE = ["--prompt", "the cat", "--max-new-tokens", 8, "--temperature", 1]


def test_sample_top_k_0_samples_from_every_token(pretrained_run: Path) -> None:
    """--help: "0: all". --top-k 0 is no top-k: the sample of a k as large as the vocabulary, not a refusal."""
    zero = run("sample.py", pretrained_run, *SAMPLE, "--top-k", 0)
    assert zero.returncode == 0, zero.stderr
    assert zero.stdout == run("sample.py", pretrained_run, *SAMPLE, "--top-k", 10_000).stdout


def test_sample_samples_among_the_top_k_tokens_50_by_default(
    pretrained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--top-k 1 keeps the most likely token alone: at temperature 1 the greedy continuation (a k not passed on
    sampled from every token); with no --top-k, k is 50, and with no --temperature 0.8, as --help says."""
    greedy = run(
        "sample.py", pretrained_run, "--prompt", "the cat", "--max-new-tokens", 8, "--temperature", 0
    )
    top_1 = run("sample.py", pretrained_run, *SAMPLE, "--top-k", 1)
    assert greedy.returncode == top_1.returncode == 0, greedy.stderr + top_1.stderr
    assert top_1.stdout == greedy.stdout
    assert top_1.stdout != run("sample.py", pretrained_run, *SAMPLE, "--top-k", 0).stdout
    asked: list[tuple[object, ...]] = []
    real = infer_sample.continuation

    def spy(*args: Any, **kwargs: Any) -> Any:
        arguments = inspect.signature(real).bind(*args, **kwargs).arguments
        asked.append(tuple(arguments[name] for name in ("max_new_tokens", "temperature", "top_k")))
        return real(*args, **kwargs)

    monkeypatch.setattr(infer_sample, "continuation", spy)
    assert run("sample.py", pretrained_run, "--prompt", "the cat", "--max-new-tokens", 8).returncode == 0
    assert asked == [(8, 0.8, 50)]  # --max-new-tokens as given; --help's defaults


@pytest.mark.parametrize(
    ("program", "message"),
    [
        (
            "generate.py",
            "--prompt is empty and the tokenizer adds no BOS token: the model needs a token to continue",
        ),
        ("sample.py", "--prompt must not be empty: the model needs at least one token to continue"),
    ],
)
def test_an_empty_prompt_without_a_bos_token_exits_2_in_one_line(
    pretrained_run: Path, program: str, message: str
) -> None:
    """Nothing to continue from (a zmaj tokenizer adds no BOS): it was a ValueError traceback from the sampler."""
    model = ["--model", pretrained_run] if program == "generate.py" else [pretrained_run]
    result = run(program, *model, "--prompt", "", "--temperature", 0)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(message)
    assert result.stdout == ""


def test_ctrl_c_while_generating_ends_the_line_and_exits_130(
    pretrained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C mid-answer ends the completion where it is, on a line of its own, with the shell's status for
    SIGINT (128 + 2), as every program exits on Ctrl-C, and no traceback."""

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        yield "the cat"
        raise KeyboardInterrupt

    monkeypatch.setattr(infer_text, "complete", interrupted)
    result = run("generate.py", "--model", pretrained_run, "--prompt", "hi", "--max-new-tokens", 4)
    assert result.returncode == 130, result.stderr
    assert result.stdout == "the cat\n"
    assert "Traceback" not in result.stderr


def test_sample_samples_with_its_seed(pretrained_run: Path) -> None:
    """The same --seed, the same sample; another seed, another sample."""
    first, again, other = (run("sample.py", pretrained_run, *SAMPLE, "--seed", seed) for seed in (1, 1, 2))
    assert first.returncode == again.returncode == other.returncode == 0, first.stderr + other.stderr
    assert first.stdout == again.stdout != other.stdout


def test_sample_stops_at_the_end_of_the_document(
    pretrained_run: Path, zmaj_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that ends the document at once and would then start another: sample.py prints the prompt alone,
    not the next document's text (its end-of-document tokens are not printed, so the join went unseen)."""
    eos, other = zmaj_tokenizer.eos_id, zmaj_tokenizer.encode("the")[0]

    def after(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, vocab_size)
        logits[..., other] = (tokens == eos).float() * 10  # after the end of a document, another begins
        logits[..., eos] = (tokens != eos).float() * 10
        return logits

    real_cached = gpt.forward_cached

    def cached(params: Any, batch: Any, cache: Any, config: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        logits, cache = real_cached(params, batch, cache, config, **kwargs)
        return after(batch.tokens[:, -logits.shape[1] :], config.vocab_size), cache

    monkeypatch.setattr(gpt, "forward", lambda params, batch, config: after(batch.tokens, config.vocab_size))
    monkeypatch.setattr(gpt, "forward_cached", cached)
    result = run(
        "sample.py", pretrained_run, "--prompt", "the cat", "--max-new-tokens", 8, "--temperature", 0
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the cat\n"


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france() -> None:
    args = [
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        16,
        "--temperature",
        0,
    ]
    result = run("generate.py", "--model", smollm2_gguf(), *args)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_a_cut_before_a_token_that_spells_nothing_splits_no_character(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An EOS the tokenizer appends has empty offsets, (0, 0): --max-tokens cutting just before it read as a
    character split across tokens, and bits per byte went over a byte too few or too many (a SentencePiece-style
    vocabulary: its pieces' lengths are not their bytes)."""
    monkeypatch.syspath_prepend(str(ROOT / "programs"))
    from perplexity import cut_character_bytes

    text = "héllo wörld the cat sat on the mat café naïve " * 20
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    specials = ["<eos>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokenizer.train_from_iterator(
        [text], tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
    )
    eos = tokenizer.token_to_id("<eos>")
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", eos)]
    )
    for sample in ("the cat sat", "naïve wörld", "the café sat"):
        encoding = tokenizer.encode(sample)
        assert encoding.offsets[-1] == (0, 0)
        n = len(encoding.ids) - 1  # all but the appended EOS
        cut = sample[: max(end for _, end in encoding.offsets[:n])]
        assert cut_character_bytes(encoding, cut, n) == 0


def sentencepiece_bpe(prefix: str = "pre-tokenizer", bos: str | None = None) -> tokenizers.Tokenizer:
    """A byte-fallback BPE of "the cat sat on the mat", as SentencePiece models convert: the ``▁`` before the text
    put there by a Metaspace pre-tokenizer, or by Llama 2's ``Prepend`` normalizer; ``bos`` before every text."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(byte_fallback=True, unk_token="<unk>"))
    if prefix == "pre-tokenizer":
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    else:  # Llama 2's tokenizer.json
        tokenizer.normalizer = tokenizers.normalizers.Sequence(
            [tokenizers.normalizers.Prepend("▁"), tokenizers.normalizers.Replace(" ", "▁")]
        )
    specials = ["<unk>", *([bos] if bos else []), *(f"<0x{i:02X}>" for i in range(256))]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
    tokenizer.train_from_iterator(["the cat sat on the mat " * 20], trainer)
    if bos:
        tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return tokenizer


def test_a_cut_after_a_byte_fallback_token_counts_one_byte_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """SentencePiece-style byte fallback: a cut after ``<0xE4>``, the first of "世"'s three byte tokens, leaves
    the character's other two bytes unspelled (the token's text is six characters, its bytes one)."""
    monkeypatch.syspath_prepend(str(ROOT / "programs"))
    from perplexity import cut_character_bytes

    tokenizer = sentencepiece_bpe()
    sample = "the cat 世 sat"
    encoding = tokenizer.encode(sample)
    assert encoding.tokens[:4] == ["▁the", "▁cat", "▁", "<0xE4>"]
    assert cut_character_bytes(encoding, sample[: max(end for _, end in encoding.offsets[:4])], 4) == 2


def test_the_first_token_is_counted_in_utf8_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte-level first token that is a whole non-ASCII word ("été": 5 bytes, 3 characters) is left out of
    the bytes scored as its bytes, not its characters."""
    monkeypatch.syspath_prepend(str(ROOT / "programs"))
    from perplexity import first_token_bytes

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["été the cat " * 30], trainer)
    encoding = tokenizer.encode("été the cat")
    assert encoding.tokens[0] == "Ã©tÃ©"
    assert first_token_bytes(encoding, "été the cat") == len("été".encode()) == 5


@pytest.mark.parametrize("prefix", ["pre-tokenizer", "normalizer"])
def test_a_dummy_prefix_first_token_spells_none_of_the_text(
    monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    """SentencePiece's dummy prefix without a BOS token: the ``▁`` a Metaspace pre-tokenizer or a ``Prepend``
    normalizer puts before "世 the cat" shares the offsets of "世", whose bytes the next tokens spell, so every
    byte of the text is predicted (it was read as one byte of the text, and bits per byte went over one byte too
    few). A space of the text's own, first, is a byte of it."""
    monkeypatch.syspath_prepend(str(ROOT / "programs"))
    from perplexity import first_token_bytes

    tokenizer = sentencepiece_bpe(prefix)
    for sample, first_two in [("世 the cat", ["▁", "<0xE4>"]), ("hat the cat", ["▁", "h"])]:
        encoding = tokenizer.encode(sample)
        assert encoding.tokens[:2] == first_two
        assert encoding.offsets[0] == encoding.offsets[1] == (0, 1)
        assert first_token_bytes(encoding, sample) == 0
    own_space = tokenizer.encode(" 世 the")
    if prefix == "pre-tokenizer":  # no prefix before a text that begins with a space: the space is the text's
        assert own_space.tokens[:2] == ["▁", "<0xE4>"]
        assert own_space.offsets[:2] == [(0, 1), (1, 2)]
        assert first_token_bytes(own_space, " 世 the") == 1
    else:  # the prefix, then the text's own space: both at (0, 1)
        assert own_space.tokens[:3] == ["▁", "▁", "<0xE4>"]
        assert own_space.offsets[:2] == [(0, 1), (0, 1)]
        assert first_token_bytes(own_space, " 世 the") == 0


def test_a_dummy_prefix_after_a_bos_token_spells_none_of_a_cut_character(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Llama 2's layout: BOS, the ``▁`` prefix, then "世"'s three byte tokens, all but BOS at (0, 1). Cut after the
    first byte token (--max-tokens 3), the predicted tokens spell that one byte: the prefix shares the cut
    character's offsets but none of its bytes (counted as one, they read as 2)."""
    monkeypatch.syspath_prepend(str(ROOT / "programs"))
    from perplexity import cut_character_bytes, first_token_bytes

    tokenizer = sentencepiece_bpe("normalizer", bos="<s>")
    encoding = tokenizer.encode("世 the")
    assert encoding.tokens[:3] == ["<s>", "▁", "<0xE4>"]
    cut = "世"  # the text up to the end of the first 3 tokens' offsets
    assert len(cut.encode()) - first_token_bytes(encoding, cut) - cut_character_bytes(encoding, cut, 3) == 1


def test_a_cut_inside_a_character_counts_the_bytes_each_byte_level_token_spells(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A byte-level token that begins a character can also hold what comes before it ("ĠÐ": a space and the
    first byte of "з"): the cut's extra bytes are the text's from where that token starts less its own bytes (one
    per character of its text), not one per token. Reference: the bytes tokens 1..n spell, token by token."""
    monkeypatch.syspath_prepend(str(ROOT / "programs"))
    from perplexity import cut_character_bytes

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["the жук sat on the жаба " * 30 + "мир 🐍 snake 🐍🐍 " * 30], trainer)
    sample = "the cat з sat, мир 🦀 end ж 🐍"
    encoding = tokenizer.encode(sample)
    assert "ĠÐ" in encoding.tokens  # a space and the first byte of "з" in one token
    inside = 0
    for n in range(1, len(encoding.ids)):
        cut = sample[: max(end for _, end in encoding.offsets[:n])]
        spelled = sum(len(token) for token in encoding.tokens[:n])  # byte-level: one character per byte
        assert cut_character_bytes(encoding, cut, n) == len(cut.encode()) - spelled, encoding.tokens[: n + 1]
        inside += cut_character_bytes(encoding, cut, n) > 0
    assert inside >= 3  # after "ĠÐ", "ðŁ" and "ðŁ¦"
