"""A model's accuracy on a task's held-out problems, as one JSON line.

    uv run programs/evaluate.py --model pypi:smollm2-135m-instruct --task arithmetic --n 200 --chat
    uv run programs/evaluate.py --model pypi:gemma3-270m --task arithmetic --few-shot 3 --set-task digits=3
    uv run programs/evaluate.py --model runs/sft-smollm2-arithmetic --task arithmetic

Answers are greedy, generated in batches with the KV cache. ``--chat`` (the default) asks each question as a
user message in the model's chat template; ``--few-shot K`` (for base models) shows K solved train problems first
and cuts the answer at the blank line that ends one. Output keys: task, n, accuracy, low and high (the 95% Wilson
interval), format_rate (answers ending in ``Answer: ...``), mean_length (tokens), seconds. ``--answers FILE`` keeps
every answer for an error analysis. Bad input (unknown task, missing model, bad option) exits with status 2 and a
one-line message.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import yaml
from loguru import logger

from zmaj.convert.load import load_model
from zmaj.tasks import get_task
from zmaj.train import finetune, precision, runs
from zmaj.train.checkpoint import atomic_write_text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="a model PATH (GGUF, HF folder, zmaj folder or run, pypi:NAME)"
    )
    parser.add_argument("--task", required=True)
    parser.add_argument("--n", type=int, default=200, help="problems (default: %(default)s)")
    parser.add_argument("--split", choices=["test", "train"], default="test")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--few-shot", type=int, metavar="K", help="K solved examples, no chat template")
    mode.add_argument("--chat", action="store_true", help="ask in the chat template (the default)")
    parser.add_argument("--seed", type=int, default=0, help="which problems (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--system", help="a system message before each question (chat mode)")
    parser.add_argument(
        "--set-task",
        dest="task_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option",
    )
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    parser.add_argument(
        "--answers",
        type=Path,
        metavar="FILE",
        help="also write every problem's answer as JSON lines (prompt, expected, completion, correct, format)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
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
        options = {}
        for item in args.task_options:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--set-task expects key=value, got {item!r}")
            options[key] = yaml.safe_load(value)
        task = get_task(args.task, **options)
        problems = task.problems(args.split, args.n, args.seed)
        model = load_model(args.model)
        if args.answers is not None and not args.answers.parent.is_dir():
            raise FileNotFoundError(
                f"--answers: no folder {args.answers.parent} to write {args.answers.name} in"
            )
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as error:
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
    if args.answers is not None:
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
        atomic_write_text(args.answers, "".join(f"{line}\n" for line in lines))
    print(json.dumps({"task": args.task, **result.record(), "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
