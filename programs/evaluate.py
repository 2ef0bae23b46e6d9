"""A model's accuracy on a task's held-out problems, as one JSON line; or its scores on the lm-evaluation-harness's
benchmarks (``--harness``).

    uv run programs/evaluate.py --model pypi:smollm2-135m-instruct --task arithmetic --n 200 --chat
    uv run programs/evaluate.py --model pypi:gemma3-270m --task arithmetic --few-shot 3 --set-task digits=3
    uv run programs/evaluate.py --model runs/sft-smollm2-arithmetic --task arithmetic

Answers are greedy, generated in batches with the KV cache. ``--chat`` (the default) asks each question as a
user message in the model's chat template; ``--few-shot K`` (for base models) shows K solved train problems first
and cuts the answer at the blank line that ends one. Output keys: task, n, accuracy, low and high (the 95% Wilson
interval), format_rate (answers ending in ``Answer: ...``), mean_length (tokens), seconds. ``--answers FILE`` keeps
every answer for an error analysis. Bad input (unknown task, missing model, bad option) exits with status 2 and a
one-line message.

``--harness TASKS`` runs EleutherAI's lm-evaluation-harness instead (``zmaj.eval.harness``; needs the ``eval``
extra), on its task names (comma-separated: ``hellaswag,arc_easy,mmlu,gsm8k``) and on the task YAML files in
``--harness-include`` folders:

    uv run programs/evaluate.py --model pypi:smollm2-135m-instruct --harness hellaswag --limit 100 --batch-size 16
    uv run programs/evaluate.py --model runs/sft-smollm2-arithmetic --harness zmaj_tiny \\
        --harness-include tests/data/harness --dtype float32

Logs show lm-eval's table of results; stdout is the JSON of ``lm_eval.simple_evaluate`` (results, configs,
versions, n-shot, the model's config), which ``--output FILE`` also writes with every request's sample.
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from loguru import logger

from zmaj.convert.load import check_vocabulary, load_model
from zmaj.extras import MissingExtraError, needs
from zmaj.fileio import atomic_write_text
from zmaj.specfile import key_values, seed_argument
from zmaj.tasks import checked_task
from zmaj.text import utf8
from zmaj.train import finetune, precision, runs

TASK_DEFAULTS: dict[str, Any] = {"n": 200, "split": "test", "seed": 0, "max_new_tokens": 128}
"""The defaults of the --task options that --harness does not take: None until filled in, so that one given
with --harness is refused instead of silently ignored."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="a model PATH (GGUF, HF folder, zmaj folder or run, pypi:NAME)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="one of zmaj's tasks (zmaj.tasks)")
    source.add_argument(
        "--harness", metavar="TASKS", help="lm-evaluation-harness tasks or groups, comma-separated"
    )
    parser.add_argument("--n", type=int, help=f"problems (default: {TASK_DEFAULTS['n']})")
    parser.add_argument("--split", choices=["test", "train"], help=f"default: {TASK_DEFAULTS['split']}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--few-shot", type=int, metavar="K", help="K solved examples, no chat template")
    mode.add_argument(
        "--chat",
        action="store_true",
        help="ask in the chat template (--task: the default; --harness: off unless given)",
    )
    parser.add_argument(
        "--seed", type=seed_argument, help=f"which problems (default: {TASK_DEFAULTS['seed']})"
    )
    parser.add_argument("--max-new-tokens", type=int, help=f"default: {TASK_DEFAULTS['max_new_tokens']}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--system", type=utf8, help="a system message before each question (chat mode)")
    parser.add_argument(
        "--set-task",
        dest="task_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option",
    )
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    harness = parser.add_argument_group("--harness options")
    harness.add_argument(
        "--harness-include",
        type=Path,
        action="append",
        default=[],
        metavar="FOLDER",
        help="a folder of task YAML files, besides lm-eval's own tasks (repeatable)",
    )
    harness.add_argument("--limit", type=float, help="documents per task (a fraction below 1)")
    harness.add_argument(
        "--num-fewshot", type=int, metavar="K", help="solved examples before each (task default)"
    )
    harness.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="the parameters' type"
    )
    harness.add_argument(
        "--output", type=Path, metavar="FILE", help="also write the results and samples as JSON"
    )
    parser.add_argument(
        "--answers",
        type=Path,
        metavar="FILE",
        help="also write every problem's answer as JSON lines (prompt, expected, completion, correct, format)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    harness_only = {
        "--harness-include": args.harness_include,
        "--limit": args.limit is not None,
        "--num-fewshot": args.num_fewshot is not None,
        "--dtype": args.dtype != "auto",
        "--output": args.output is not None,
    }
    task_only = {
        "--few-shot": args.few_shot is not None,
        "--answers": args.answers is not None,
        "--set-task": args.task_options,
        "--system": args.system is not None,
        "--import": args.imports,
        **{f"--{name.replace('_', '-')}": getattr(args, name) is not None for name in TASK_DEFAULTS},
    }
    misplaced = [name for name, given in (task_only if args.harness else harness_only).items() if given]
    if misplaced:
        fail(f"{', '.join(misplaced)} cannot be used with {'--harness' if args.harness else '--task'}")
    if args.harness is not None:
        run_harness(args)
        return
    if args.few_shot is not None and args.system is not None:
        fail("--system goes before a chat-mode question; --few-shot asks without the chat template")
    for name, default in TASK_DEFAULTS.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    started = time.perf_counter()
    try:
        finetune.import_modules(args.imports)
        for name, value in (
            ("--n", args.n),
            ("--max-new-tokens", args.max_new_tokens),
            ("--batch-size", args.batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if args.few_shot is not None and args.few_shot < 0:
            raise ValueError(f"--few-shot must be at least 0, got {args.few_shot}")
        task = checked_task(args.task, key_values(args.task_options, "--set-task"))
        problems = task.problems(args.split, args.n, args.seed)
        model = load_model(args.model)
        check_vocabulary(model, args.model)
        if args.few_shot is None and model.tokenizer.chat_template is None:  # a base model, asked to chat
            raise ValueError(
                f"{args.model} has no chat template, which a question in chat mode (the default) needs: "
                "--few-shot K asks in plain text after K solved problems (0: none)"
            )
        if args.answers is not None:
            check_output_file(args.answers, "--answers")
        finetune.check_prompts(
            model, task, problems, args.max_new_tokens, args.few_shot, args.system, "--max-new-tokens"
        )
    except (OSError, ValueError, ModuleNotFoundError) as error:  # OSError: a model missing or unreadable
        logger.error(runs.one_line(error))
        sys.exit(2)
    model = model.to(precision.default_device())
    result = finetune.evaluate_task(
        model,
        task,
        problems,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        few_shot=args.few_shot,
        system=args.system,
    )
    print(json.dumps({"task": args.task, **result.record(), "seconds": time.perf_counter() - started}))
    if args.answers is not None:  # after the result is out: were this write to fail, the result is not lost
        lines = (
            json.dumps(
                {
                    "prompt": problem.prompt,
                    "expected": problem.answer,
                    "completion": completion,
                    "correct": reward.correctness == 1.0,
                    "format": reward.format == 1.0,
                }
            )
            for problem, completion, reward in zip(problems, result.completions, result.rewards, strict=True)
        )
        write_output(args.answers, "".join(f"{line}\n" for line in lines), "--answers")


def write_output(path: Path, text: str, flag: str) -> None:
    """Write ``flag``'s file whole (``check_output_file`` tried its folder before the evaluation); a disk that
    filled up meanwhile is one line naming it, not a traceback after the results."""
    try:
        atomic_write_text(path, text)
    except OSError as error:
        fail(f"{flag}: cannot write {path} ({error.strerror}); nothing was written")


def check_output_file(path: Path, flag: str) -> None:
    """Refuse, before the evaluation, a file that cannot be written: written after it, results are lost."""
    if path.is_dir():
        fail(f"{flag}: {path} is a folder; name a file to write")
    if not path.parent.is_dir():
        fail(f"{flag}: no folder {path.parent} to write {path.name} in")
    try:  # a read-only or someone else's folder: what the atomic write will need, tried now
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        fail(f"{flag}: cannot write in {path.parent} ({error.strerror})")


def run_harness(args: argparse.Namespace) -> None:
    """``--harness``: the model as lm-eval's ``zmaj`` backend on lm-eval's tasks; results as lm-eval writes them."""
    try:
        with needs("eval", "--harness"):
            from lm_eval import simple_evaluate
            from lm_eval.tasks import TaskManager
            from lm_eval.utils import handle_non_serializable, make_table

            from zmaj.eval.harness import TaskRequestError, ZmajLM
    except MissingExtraError as error:
        fail(str(error))

    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and not 0 < args.limit < math.inf:
        fail(f"--limit must be a number above 0, got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        fail(f"--num-fewshot must be at least 0, got {args.num_fewshot}")
    for folder in args.harness_include:
        if not folder.is_dir():
            fail(f"--harness-include: no folder {folder}")
    if args.output is not None:
        check_output_file(args.output, "--output")
    tasks = [name.strip() for name in args.harness.split(",") if name.strip()]
    if not tasks:  # said before lm-eval indexes its thousands of task files (seconds)
        fail("--harness: no task given; `lm_eval ls tasks` lists them")
    manager = TaskManager(include_path=[str(f) for f in args.harness_include] or None)
    unknown = [name for name in tasks if not manager.match_tasks([name])]
    if unknown:
        fail(f"--harness: unknown tasks {', '.join(unknown)}; `lm_eval ls tasks` lists them")
    try:
        model = ZmajLM(path=args.model, dtype=args.dtype, batch_size=args.batch_size)
    except (OSError, ValueError) as error:
        fail(f"--model: {runs.one_line(error)}")
    if args.chat and model.model.tokenizer.chat_template is None:
        fail(f"--chat: the tokenizer of {args.model} has no chat template")
    try:
        results: dict[str, Any] = simple_evaluate(
            model=model,
            tasks=tasks,
            num_fewshot=args.num_fewshot,
            limit=None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit),
            task_manager=manager,
            apply_chat_template=args.chat,
            log_samples=args.output is not None,
        )
    except TaskRequestError as error:  # what a task asks and the backend cannot do, named
        fail(f"--harness: {runs.one_line(error)}")
    logger.info(f"lm-evaluation-harness results for {args.model}:\n{make_table(results)}")
    samples = results.pop("samples", None)
    print(json.dumps(results, indent=2, default=handle_non_serializable))
    if args.output is not None:  # after the result is out, as --answers
        whole = results if samples is None else {**results, "samples": samples}
        write_output(
            args.output, json.dumps(whole, indent=2, default=handle_non_serializable) + "\n", "--output"
        )


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr naming it, and exit code 2."""
    logger.error(message)
    sys.exit(2)


if __name__ == "__main__":
    runs.ctrl_c_exits_130(main, "interrupted (Ctrl-C); every file written is whole")
