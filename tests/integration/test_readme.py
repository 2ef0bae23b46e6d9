"""Every command and Python block README.md shows is run, so README cannot drift from the programs again.

The commands are parsed from README's fenced shell blocks (``uv run ...`` and ``torchrun ...`` lines), never
copied here. Each runs as README gives it, with only the size flags of :data:`SIZES` appended (fewer steps,
tokens, problems; argparse keeps an option's last value and ``--set`` its last override, so an appended flag
wins), and must pass its program's check: exit 0 and one property of what it wrote. They run in README order in
one scratch folder where ``programs/``, ``specs/`` and ``README.md`` are linked, so relative paths mean what they
mean in the repository and a later command reads what an earlier one wrote (the DPO run starts from the SFT run's
folder), as for a reader going down the page. Programs run inside this process (``tests.integration.programs``);
``ZMAJ_CACHE`` points into the scratch folder, so nothing outside it is read or written but the installed weights
(and Gemma's joined file, ``zmaj.convert.weights.cache_dir``).

A command whose program :data:`SIZES` does not know fails, asking for its sizes; one that cannot run here has
its reason in :data:`SKIPPED`; a placeholder such as ``runs/stdlib-tiny-...`` must be in :data:`PLACEHOLDERS`.
3.5 minutes on 2 cores shared with other work (AMD EPYC, 2026-12-02): the SmolLM2 runs (model loads, SFT's
1.6 GB checkpoint), the stdlib tokenizer (trained once) and the final held-out pass of pre-training; hence ``slow``.
"""

import contextlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard

from tests.integration.programs import Result, run_program
from zmaj.convert import weights

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).relative_to(ROOT)
README = ROOT / "README.md"
SHELL_BLOCKS = {"bash", "sh", "shell"}
LINKED = ["programs", "specs", "README.md"]
"""What the scratch folder links from the repository: everything README's commands name by a relative path."""


@dataclass(frozen=True)
class Command:
    """One command of README: how it is launched, which program it runs, with which arguments."""

    line: str
    """As README shows it (continuation lines joined, comment dropped): the test's id and its messages'."""
    launcher: str
    """``uv run``, ``torchrun`` or ``bash``."""
    launcher_args: tuple[str, ...]
    """The launcher's own options (``--nproc-per-node 2``)."""
    program: str
    """The script (``programs/sft.py``) or tool (``pytest``) launched."""
    args: tuple[str, ...]

    def option(self, name: str) -> str:
        """The value of option ``name`` as README gives it."""
        return self.args[self.args.index(name) + 1]


def readme_commands(text: str) -> list[Command]:
    """Each command line of the fenced shell blocks of a markdown ``text``, in order."""
    commands = []
    for language, block in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        if language in SHELL_BLOCKS:
            for line in block.replace("\\\n", " ").splitlines():
                if words := shlex.split(line, comments=True):
                    commands.append(parse(" ".join(shlex.quote(word) for word in words), words))
    return commands


def parse(line: str, words: list[str]) -> Command:
    """``uv run PROGRAM ARGS`` or ``torchrun [OPTIONS] PROGRAM.py ARGS``; anything else is README's error."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before a command
        words = words[1:]
    if words[:1] == ["bash"] and len(words) > 1:
        return Command(line, "bash", (), words[1], tuple(words[2:]))
    if words[:3] == ["uv", "run", "torchrun"]:
        words = words[2:]
    elif words[:2] == ["uv", "run"] and len(words) > 2:
        return Command(line, "uv run", (), words[2], tuple(words[3:]))
    if words[0] == "torchrun" and (scripts := [i for i, word in enumerate(words) if word.endswith(".py")]):
        script = scripts[0]
        return Command(line, "torchrun", tuple(words[1:script]), words[script], tuple(words[script + 1 :]))
    raise ValueError(
        f"README shows `{line}`, neither `uv run ...`, `torchrun ...` nor `bash SCRIPT`: this test cannot run it"
    )


@dataclass(frozen=True)
class Outcome:
    """What running a command left: its result, and the checkpoints that appeared in the scratch folder."""

    command: Command
    result: Result
    folder: Path
    new_checkpoints: list[Path]


def checkpoints(folder: Path) -> set[Path]:
    return set(folder.glob("runs/*/checkpoints/step-*"))


# ------------------------------------------------------------------------------------- what each run must show


def saves_a_checkpoint(outcome: Outcome) -> None:
    """A training run: it wrote a checkpoint (a new run stops after 1 step, a resumed one finishes)."""
    assert outcome.new_checkpoints, "no checkpoint written"


def continues_the_prompt(outcome: Outcome) -> None:
    assert outcome.result.stdout.startswith(outcome.command.option("--prompt")), outcome.result.stdout


def prints_an_answer(outcome: Outcome) -> None:
    """generate.py and chat.py: a non-empty completion ending in a newline (chat: one per message)."""
    assert outcome.result.stdout.strip(), "nothing printed"
    assert outcome.result.stdout.endswith("\n"), repr(outcome.result.stdout)


def scores_the_first_tokens(outcome: Outcome) -> None:
    scored = json.loads(outcome.result.stdout)
    assert scored["tokens"] == PERPLEXITY_TOKENS - 1  # the first token is never predicted
    assert math.isfinite(scored["ppl"])
    assert scored["bits_per_byte"] > 0


def writes_a_model_folder(outcome: Outcome) -> None:
    """convert.py SRC DST: DST holds a model (a Hugging Face config, or a zmaj model.json)."""
    destination = outcome.folder / outcome.command.args[1]
    assert (destination / "config.json").is_file() or (destination / "model.json").is_file()


def scores_n_problems(outcome: Outcome) -> None:
    scored = json.loads(outcome.result.stdout)
    assert scored["n"] == EVALUATE_N
    assert 0 <= scored["accuracy"] <= 1


def writes_a_model_folder_with_its_card(outcome: Outcome) -> None:
    """export.py RUN OUT: OUT holds a Hugging Face folder and the card that publish.py requires."""
    destination = outcome.folder / outcome.command.args[1]
    assert (destination / "config.json").is_file()
    assert ModelCard.load(destination / "README.md").data.license == outcome.command.option("--license")


def lists_the_upload(outcome: Outcome) -> None:
    """publish.py --dry-run: each file with its size, then the total and where it would go."""
    assert f"-> {'dataset' if '--dataset' in outcome.command.args else 'model'} " in outcome.result.stdout
    assert "total," in outcome.result.stdout


def finds_no_pair_in_one_token_answers(outcome: Outcome) -> None:
    """DPO's on-policy pairs need a right answer next to a wrong one, and an answer of one token is never
    right (``Answer: <value>`` takes more), so the sized run stops where the pairs are made, with exit 2, once
    the spec, the SFT run it starts from and sampling have all worked. A run that finds pairs needs an SFT model
    that is right part of the time: minutes of training. tests/integration/test_finetune_programs.py trains DPO
    end to end on a tiny model."""
    assert outcome.result.returncode == 2
    assert "no preference pair was found" in outcome.result.stderr


def exits_0(check: Callable[[Outcome], None]) -> Callable[[Outcome], None]:
    def checked(outcome: Outcome) -> None:
        assert outcome.result.returncode == 0, outcome.result.stderr[-3000:]
        check(outcome)

    return checked


# ---------------------------------------------------------------------------------------------- the table

PERPLEXITY_TOKENS = 64
EVALUATE_N = 2
SMALL_EVAL = ("--set", "eval.n=1", "--set", "eval.max_new_tokens=2", "--set", "eval.batch_size=1")
"""A fine-tuning spec's held-out evaluation (at step 0 and at the end) on one problem, two tokens."""


@dataclass(frozen=True)
class Sized:
    """How this test runs a program README shows: the flags it appends, what it types, what it checks."""

    flags: tuple[str, ...]
    check: Callable[[Outcome], None]
    stdin: str = ""


SIZES: dict[str, Sized] = {
    "programs/pretrain.py": Sized(
        (
            # 1 of 2 steps, so that `--resume` has one left; a 1-layer, 32-wide model, so that the resumed run's
            # final pass over the whole held-out split takes seconds.
            *("--set", "train.steps=2", "--stop-after", "1"),
            *("--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=1"),
            *("--set", "sample.max_new_tokens=4"),
        ),
        exits_0(saves_a_checkpoint),
    ),
    "programs/sample.py": Sized(("--max-new-tokens", "4"), exits_0(continues_the_prompt)),
    "programs/generate.py": Sized(("--max-new-tokens", "4"), exits_0(prints_an_answer)),
    "programs/chat.py": Sized(("--max-new-tokens", "4"), exits_0(prints_an_answer), stdin="Hi!\n/exit\n"),
    "programs/perplexity.py": Sized(
        ("--max-tokens", str(PERPLEXITY_TOKENS)), exits_0(scores_the_first_tokens)
    ),
    "programs/convert.py": Sized((), exits_0(writes_a_model_folder)),
    "programs/evaluate.py": Sized(
        ("--n", str(EVALUATE_N), "--max-new-tokens", "4", "--batch-size", "2"), exits_0(scores_n_problems)
    ),
    "programs/sft.py": Sized(
        ("--set", "train.steps=1", "--set", "train.batch_size=1", "--set", "data.n=1", *SMALL_EVAL),
        exits_0(saves_a_checkpoint),
    ),
    "programs/grpo.py": Sized(
        (
            # Not a size: the spec starts from the SFT run's step 40, which the sized SFT run never reaches;
            # its newest checkpoint stands in.
            *("--set", "model=runs/sft-smollm2-arithmetic"),
            *("--set", "train.steps=1", "--set", "train.prompts_per_step=1", "--set", "grpo.group_size=2"),
            *("--set", "grpo.max_new_tokens=4", "--set", "grpo.micro_batch=2", *SMALL_EVAL),
        ),
        exits_0(saves_a_checkpoint),
    ),
    "programs/export.py": Sized((), exits_0(writes_a_model_folder_with_its_card)),
    # README's publish commands all dry-run (no network here), at README's sizes: a task dataset README asked
    # for was larger than the task's train split, and smaller sizes hid it (10,000 problems: ~5 s).
    "programs/publish.py": Sized(("--dry-run",), exits_0(lists_the_upload)),
    "programs/dpo.py": Sized(
        (
            *("--set", "pairs.n_prompts=1", "--set", "pairs.k=2", "--set", "pairs.max_new_tokens=1"),
            *("--set", "train.steps=1", "--set", "train.batch_size=1", *SMALL_EVAL),
        ),
        finds_no_pair_in_one_token_answers,
    ),
}
"""Each program README runs: the size flags appended to its commands, and what its run must show."""

SKIPPED: dict[str, str] = {
    "pytest": "the test suite itself, which this test is part of",
    "benchmarks/": "hand-run measurements (README: never by tests), minutes each even cut down (torch.compile), "
    "and they write benchmarks/results/ in the repository",
}
"""Commands this test does not run, by launcher, program or folder, each with its reason."""


def newest(pattern: str) -> Callable[[Path], str]:
    """The newest path in the scratch folder that matches ``pattern``: a run folder named by its start time."""

    def find(folder: Path) -> str:
        found = sorted(folder.glob(pattern))
        assert found, f"no {pattern} in the scratch folder: the README command that writes it failed"
        return str(found[-1].relative_to(folder))

    return find


PLACEHOLDERS: dict[str, Callable[[Path], str]] = {
    "runs/stdlib-tiny-...": newest("runs/stdlib-tiny-*"),  # what an earlier `programs/pretrain.py` wrote
    "PATH": lambda folder: "pypi:smollm2-135m-instruct",  # any model PATH: the section's model
    "USER": lambda folder: "someone",  # the reader's Hub user name
}
"""Words of README's commands that stand for what the reader supplies, and what this test supplies."""

PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>|(?<![\w.])[A-Z][A-Z_]{2,}(?![\w.])")
"""What looks like a placeholder: an ellipsis, ``<timestamp>``, or a word in capitals (``PATH``, not
``README.md``)."""


def skip_reason(command: Command) -> str | None:
    keys = [command.launcher, command.program, *(f"{p}/" for p in Path(command.program).parents if p.name)]
    return next((SKIPPED[key] for key in keys if key in SKIPPED), None)


def unknown_placeholders(command: Command) -> list[str]:
    """What looks like a placeholder in ``command``'s arguments but is not in :data:`PLACEHOLDERS`."""
    unknown = []
    for word in command.args:
        for placeholder in PLACEHOLDERS:
            word = word.replace(placeholder, "")
        unknown += [match[0] for match in PLACEHOLDER.finditer(word)]
    return unknown


def filled_in(command: Command, folder: Path) -> list[str]:
    """The command's arguments with README's placeholders replaced, and the program's size flags appended."""
    args = []
    for word in command.args:
        for placeholder, value in PLACEHOLDERS.items():
            if placeholder in word:
                word = word.replace(placeholder, value(folder))
        args.append(word)
    return [*args, *SIZES[command.program].flags]


class Walkthrough:
    """README's commands run in order, each once, in one scratch folder: a reader going down the page."""

    def __init__(self, commands: list[Command], folder: Path) -> None:
        self.commands, self.folder = commands, folder
        self.outcomes: dict[int, Outcome] = {}
        for name in LINKED:
            (folder / name).symlink_to(ROOT / name)
        # Joined weight files are the installed weights, not the runs' output: shared, not joined again.
        (folder / "cache").mkdir()
        weights.cache_dir().mkdir(parents=True, exist_ok=True)
        (folder / "cache" / "weights").symlink_to(weights.cache_dir())

    def outcome(self, index: int) -> Outcome:
        """Command ``index``'s outcome, once the commands before it that this test runs have run."""
        for earlier in range(index + 1):
            command = self.commands[earlier]
            if earlier not in self.outcomes and command.program in SIZES and skip_reason(command) is None:
                self.outcomes[earlier] = self.run(command)
        return self.outcomes[index]

    def run(self, command: Command) -> Outcome:
        sized = SIZES[command.program]
        before = checkpoints(self.folder)
        environment = {"ZMAJ_CACHE": str(self.folder / "cache")}
        with contextlib.chdir(self.folder), mock.patch.dict(os.environ, environment):
            args = filled_in(command, self.folder)
            if command.launcher == "torchrun":  # its ranks are processes of their own
                launcher = [sys.executable, "-m", "torch.distributed.run", *command.launcher_args]
                done = subprocess.run(
                    [*launcher, command.program, *args],
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
                result = Result(done.returncode, done.stdout, done.stderr)
            else:
                result = run_program(Path(command.program).name, *args, stdin=sized.stdin)
        new = sorted(checkpoints(self.folder) - before)
        return Outcome(command, result, self.folder, new)


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Walkthrough:
    return Walkthrough(COMMANDS, tmp_path_factory.mktemp("readme"))


def test_commands_are_read_from_shell_blocks() -> None:
    text = (
        '```python\nprint("uv run programs/not-a-command.py")\n```\n'
        "```bash\n"
        'uv run programs/sample.py runs/x --prompt "def f(" \\\n    --temperature 0   # greedy\n'
        "\n"
        "torchrun --nproc-per-node 2 programs/pretrain.py --set train.steps=3\n"
        "uv run torchrun --nproc-per-node 2 programs/sft.py\n"
        "```\n"
    )
    assert readme_commands(text) == [
        Command(
            "uv run programs/sample.py runs/x --prompt 'def f(' --temperature 0",
            "uv run",
            (),
            "programs/sample.py",
            ("runs/x", "--prompt", "def f(", "--temperature", "0"),
        ),
        Command(
            "torchrun --nproc-per-node 2 programs/pretrain.py --set train.steps=3",
            "torchrun",
            ("--nproc-per-node", "2"),
            "programs/pretrain.py",
            ("--set", "train.steps=3"),
        ),
        Command(
            "uv run torchrun --nproc-per-node 2 programs/sft.py",
            "torchrun",
            ("--nproc-per-node", "2"),
            "programs/sft.py",
            (),
        ),
    ]
    with pytest.raises(ValueError, match="`pip install uv`, neither"):
        readme_commands("```sh\npip install uv\n```\n")


def test_readme_python_blocks_run_and_say_true_things() -> None:
    """README's Python is copied into notebooks as it stands: each block runs alone, and the functional core's
    shapes and claims hold (the gradients a TensorDict shaped like the parameters, the shell's parameters the
    same memory as ``params``, computing the same logits)."""
    blocks = re.findall(
        r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL
    )
    assert blocks, "README shows no Python"
    spaces = []
    for block in blocks:
        space: dict[str, Any] = {}
        exec(compile(block, str(README), "exec"), space)
        spaces.append(space)
    core = next(space for space in spaces if "grads" in space)
    params, grads, model, batch = core["params"], core["grads"], core["model"], core["batch"]
    assert torch.equal(batch.targets[:, :-1], batch.tokens[:, 1:])  # each target is the next token
    assert params["blocks"].batch_size == (core["config"].n_layers,)
    assert core["logits"].shape == (2, 256, 8192)
    assert grads.batch_size == params.batch_size
    assert set(grads.keys(True, True)) == set(params.keys(True, True))
    assert all(grad.shape == params.get(key).shape for key, grad in grads.items(True, True))
    shell = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert shell == {".".join(key): p.data_ptr() for key, p in params.items(True, True)}
    with torch.no_grad():
        assert torch.equal(model(batch), core["logits"])
    core["loss_fn"](model.params(), batch).backward()  # the shell's own gradients: torch.func's are those
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads.get(tuple(name.split("."))), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("word", "placeholder"),
    [("runs/sft-...", "..."), ("runs/x-<timestamp>", "<timestamp>"), ("model=RUN_DIR", "RUN_DIR")],
)
def test_what_looks_like_a_placeholder(word: str, placeholder: str) -> None:
    args = (word, "README.md", "--dtype", "float32")
    command = Command(f"uv run programs/x.py {' '.join(args)}", "uv run", (), "programs/x.py", args)
    assert unknown_placeholders(command) == [placeholder]


def test_every_readme_command_is_sized_or_skipped() -> None:
    """Fails in the quick suite as soon as README shows a command this test cannot run, before any is run."""
    for command in COMMANDS:
        if skip_reason(command) is None:
            assert command.program in SIZES, unknown_program(command)
            assert not unknown_placeholders(command), (
                f"`{command.line}`: add {unknown_placeholders(command)[0]!r} to PLACEHOLDERS in {THIS}"
            )


def unknown_program(command: Command) -> str:
    return (
        f"README runs `{command.line}`, but SIZES in {THIS} does not know {command.program}: add its size "
        "flags and its check there (or a reason to SKIPPED)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[c.line for c in COMMANDS])
def test_readme_command_runs(walkthrough: Walkthrough, index: int) -> None:
    command = COMMANDS[index]
    if (reason := skip_reason(command)) is not None:
        pytest.skip(reason)
    assert command.program in SIZES, unknown_program(command)
    SIZES[command.program].check(walkthrough.outcome(index))
