"""Preference pairs for DPO: from jsonl files of text, or on-policy from a task's checker.

From files (``pairs: {kind: files, paths: [...]}``), each line is one ``{"prompt", "chosen", "rejected"}`` object:
the prompt is asked as a user message in the chat template, the answers are the assistant's turn, end-of-turn
marker included. On-policy (``pairs: {kind: task, ...}``), ``k`` sampled answers per train problem from the
starting model, the first right one preferred to the first wrong one (generally: the first with the highest
correctness to the first with the lowest, where they differ). A run keeps its pairs as token ids
(``pairs.jsonl`` in the run folder), so a resumed run reads the same ones.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from pydantic import ConfigDict, StrictInt, TypeAdapter, ValidationError, with_config

from zmaj import fileio
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.tasks import get_task, score
from zmaj.text import not_utf8, read_jsonl
from zmaj.train import finetune
from zmaj.train.finetune import DPOSpec, PairFiles, PairsFromTask, Start

PAIRS_FILE = "pairs.jsonl"


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class Pair:
    """Token ids of a prompt and of its preferred and rejected answers."""

    prompt: list[StrictInt]
    chosen: list[StrictInt]
    rejected: list[StrictInt]


PAIR = TypeAdapter(Pair)
"""A ``pairs.jsonl`` row: an object of exactly these three lists of ids (``"12"`` or ``true`` is damage)."""


def make_pairs(spec: DPOSpec, begin: Start) -> list[Pair]:
    """The pairs ``spec.pairs`` describes, cut to ``spec.max_len``; an error when there are none."""
    source = spec.pairs
    if isinstance(source, PairFiles):
        named = [(text_pair(begin.model.tokenizer, row, sample), sample) for sample, row in file_rows(source)]
    else:
        named = [(pair, f"on-policy pair {i}") for i, pair in enumerate(on_policy_pairs(source, begin))]
    pairs = fitted(named, spec.max_len)
    if not pairs:
        raise ValueError(
            "pairs: no preference pair was found (on-policy: every problem's answers were all equally right)"
        )
    return pairs


def file_rows(source: PairFiles) -> list[tuple[str, dict[str, str]]]:
    """Each line's ``{"prompt", "chosen", "rejected"}`` strings, named ``file:line``; a bad one fails naming it."""
    rows = []
    for path in source.paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"pairs.paths: {path} not found")
        for number, row in read_jsonl(path):
            sample = f"{path}:{number}"
            if not isinstance(row, dict) or any(
                not isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")
            ):
                raise ValueError(f"bad pair at {sample}: need string fields prompt, chosen and rejected")
            for key in ("prompt", "chosen", "rejected"):
                if (problem := not_utf8(row[key])) is not None:  # half a surrogate pair, spelled in JSON
                    raise ValueError(f"bad pair at {sample}: {key}: {problem}")
            rows.append((sample, row))
    return rows


def text_pair(tokenizer: ModelTokenizer, row: dict[str, str], sample: str) -> Pair:
    """The prompt as a user turn and each answer as the assistant's turn, split where the template starts it."""

    def split(answer: str) -> tuple[list[int], list[int]]:
        ids, mask = tokenizer.encode_chat_with_mask(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer}]
        )
        if not any(mask):
            raise ValueError(f"bad pair at {sample}: an answer renders to no assistant token")
        first, last = mask.index(True), len(mask) - 1 - mask[::-1].index(True)
        return ids[:first], ids[first : last + 1]

    (prompt, chosen), (prompt_again, rejected) = split(row["chosen"]), split(row["rejected"])
    if prompt != prompt_again:
        raise ValueError(f"bad pair at {sample}: the two answers change how the prompt is tokenized")
    return Pair(prompt, chosen, rejected)


def on_policy_pairs(source: PairsFromTask, begin: Start) -> list[Pair]:
    """``k`` samples per problem from the starting model; a right answer preferred to a wrong one (the most
    correct to the least, for a task whose correctness is not 0 or 1)."""
    task = get_task(source.task.name, **source.task.options)
    problems = task.problems("train", source.n_prompts, source.seed)
    tokenizer = begin.model.tokenizer
    prompts = [finetune.task_prompt(tokenizer, task, p, None, source.task.system) for p in problems]
    rows = [prompt for prompt in prompts for _ in range(source.k)]
    what = f"sampling {source.k} answers to each of {len(prompts):,} prompts for DPO pairs"
    answers = finetune.sample_answers(
        begin.model, rows, source.max_new_tokens, source.batch_size, source.sampling, source.seed, what=what
    )
    rewards = score(
        task.reward,
        [p for p in problems for _ in range(source.k)],
        [tokenizer.decode(a) for a in answers],
        [finetune.stopped_by_itself(tokenizer, a, few_shot=False) for a in answers],
    )
    pairs = []
    for index, prompt in enumerate(prompts):
        group = range(index * source.k, (index + 1) * source.k)
        best = max(group, key=lambda i: rewards[i].correctness)
        worst = min(group, key=lambda i: rewards[i].correctness)
        if rewards[best].correctness > rewards[worst].correctness:
            pairs.append(Pair(prompt, answers[best], answers[worst]))
    logger.info(f"{len(pairs)} of {len(prompts)} problems gave a right and a wrong answer")
    return pairs


def fit(pair: Pair, max_len: int, sample: str) -> Pair:
    """Answers cut so that prompt + answer is at most ``max_len + 1`` tokens (inputs and shifted targets)."""
    room = max_len + 1 - len(pair.prompt)
    if room < 1:
        raise ValueError(
            f"{sample}: the prompt alone has {len(pair.prompt)} tokens, more than max_len {max_len}"
        )
    return Pair(pair.prompt, pair.chosen[:room], pair.rejected[:room])


def fitted(named: Sequence[tuple[Pair, str]], max_len: int) -> list[Pair]:
    """The pairs cut to ``max_len`` (:func:`fit`), less those whose two answers are then the same: such a pair
    has a margin of 0 whatever the model, so its loss is log 2 with no gradient, and it counts as ranked wrong."""
    cut = [fit(pair, max_len, sample) for pair, sample in named]
    kept = [pair for pair in cut if pair.chosen != pair.rejected]
    if len(kept) < len(cut):
        first = next(
            sample for (_, sample), pair in zip(named, cut, strict=True) if pair.chosen == pair.rejected
        )
        logger.warning(
            f"{len(cut) - len(kept)} of {len(cut)} pairs left out (the first: {first}): their answers are the "
            f"same within max_len {max_len}, so they teach nothing"
        )
    return kept


def write_pairs(path: Path, pairs: list[Pair]) -> None:
    """The pairs as token ids, written whole or not at all: ``--resume`` trains on exactly these."""
    fileio.atomic_write_text(path, "".join(json.dumps(pair.__dict__) + "\n" for pair in pairs))


def read_pairs(path: Path, vocab_size: int) -> list[Pair]:
    """The pairs :func:`write_pairs` wrote, for a model of ``vocab_size`` tokens; a damaged file fails naming
    ``file:line`` before training starts (a bad row, or an id outside the vocabulary, used to fail
    mid-training, and an empty file at the first batch drawn)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run's preference pairs cannot be read back")
    pairs = []
    for number, row in read_jsonl(path):
        try:
            pairs.append(PAIR.validate_python(row))
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in error.errors()
            )
            raise ValueError(f"{path}:{number}: not a pair of token ids ({problems})") from None
        pair = pairs[-1]
        if not pair.prompt:
            raise ValueError(f"{path}:{number}: the prompt has no token")
        if outside := [i for i in pair.prompt + pair.chosen + pair.rejected if not 0 <= i < vocab_size]:
            raise ValueError(
                f"{path}:{number}: token id {outside[0]} is outside the model's {vocab_size} tokens"
            )
    if not pairs:
        raise ValueError(f"{path} holds no preference pair: the run wrote at least one, so it is damaged")
    return pairs
