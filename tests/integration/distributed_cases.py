"""What ``distributed_steps.py`` runs on 2 ranks and ``test_distributed.py`` runs again in one process: tiny
models, fixed global batches, and the step loops, written once so that both sides take exactly the same steps.

The batches carry random loss masks, so the two ranks' shares hold different numbers of target tokens: a step
that averaged each rank's mean loss (instead of normalising by the global count) would differ from one process.
"""

from dataclasses import fields, replace
from types import ModuleType

import torch
from tensordict import TensorDict

from tests.strategies import MODERN_BLOCK
from tests.unit.models.test_gemma3 import TINY as TINY_GEMMA3
from zmaj.models import gemma3, gpt, llama
from zmaj.models.common import Batch
from zmaj.train import grpo, muon, optim, precision
from zmaj.train.dpo import dpo_step, preference_batch
from zmaj.train.logprobs import completion_batch, masked_token_logprobs
from zmaj.train.parallel import Parallel
from zmaj.train.step import bind, init_state, step_functions, train_step

MODELS: dict[str, tuple[ModuleType, gpt.GPTConfig | llama.LlamaConfig | gemma3.Gemma3Config]] = {
    # 4 layers, so that a fully sharded step frees and gathers again blocks in the middle of the stack.
    "gpt": (gpt, gpt.GPTConfig(vocab_size=64, context=16, d_model=32, n_layers=4, n_heads=2)),
    "llama": (
        llama,
        llama.LlamaConfig(
            vocab_size=64, context=16, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48
        ),
    ),
    "gemma3": (gemma3, TINY_GEMMA3),  # sliding and full layers, GQA
    # The speedrun's block, with what fully sharded training keeps whole (2 skip weights) or cuts along another
    # dimension than the first (1 value embedding table, cut along its vocabulary).
    "gpt-modern": (
        gpt,
        gpt.GPTConfig(
            vocab_size=64,
            context=16,
            d_model=32,
            n_layers=4,
            n_heads=2,
            bias=False,
            logit_softcap=30.0,
            value_embeds=1,
            **MODERN_BLOCK,
        ),
    ),
}
STEPS = 3
ROWS, GRAD_ACCUM, SEQ = 4, 2, 12
OPTIMIZER = optim.AdamWConfig(lr=3e-3, weight_decay=0.1, grad_clip=1.0)
LR = 3e-3
MUON = muon.MuonConfig(
    kind="muon", lr=LR, ns_dtype="float32", weight_decay=0.1, adamw=optim.AdamWGroup(lr=LR, weight_decay=0.1)
)
"""Muon on the blocks' matrices; Newton-Schulz in float32, so that one process and two ranks, whose gradients
differ in float32 rounding, stay as close as AdamW's runs do."""


def global_batches(vocab: int) -> list[list[Batch]]:
    """``STEPS`` steps of ``GRAD_ACCUM`` micro-batches of ``ROWS`` rows with random loss masks."""
    generator = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(STEPS):
        micro = []
        for _ in range(GRAD_ACCUM):
            tokens = torch.randint(0, vocab, (ROWS, SEQ + 1), generator=generator)
            mask = torch.rand(ROWS, SEQ, generator=generator) < 0.7
            micro.append(Batch(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask))
        steps.append(micro)
    return steps


def share(batch: Batch, parallel: Parallel) -> Batch:
    """This rank's rows of a global batch."""
    rows = parallel.rows(range(batch.tokens.shape[0]))
    cut = slice(rows[0], rows[-1] + 1)
    return replace(
        batch, **{f.name: t[cut] for f in fields(batch) if (t := getattr(batch, f.name)) is not None}
    )


def run_lm(
    module: ModuleType,
    config: object,
    parallel: Parallel,
    batches: list[list[Batch]],
    dtype: torch.dtype = torch.float32,
    optimizer: optim.AdamWConfig | muon.MuonConfig = OPTIMIZER,
    compile_update: bool = False,
    metrics: list[dict[str, float]] | None = None,
) -> TensorDict:
    """``STEPS`` language-model steps from ``init(config, 0)`` in ``parallel``'s layout, the matmuls in
    ``dtype`` (autocast), the update compiled if asked (as ``train.compile`` compiles it); the state it ends
    with, and each step's metrics appended to ``metrics``."""
    update_fn = step_functions(compile=True)[1] if compile_update else None
    state = parallel.shard(init_state(module.init(config, 0), optimizer))
    forward = parallel.forward(bind(module.forward, config=config), dtype)
    decay = optim.decay_mask(state["params"])
    for micro in batches:
        mine = [share(batch, parallel) for batch in micro]
        state, step_metrics = train_step(
            state,
            mine,
            forward=forward,
            optimizer=optimizer,
            lr=LR,
            decay=decay,
            seed=0,
            autocast=precision.autocast(dtype, torch.device("cpu")),
            update_fn=update_fn,
            parallel=parallel,
        )
        if metrics is not None:
            metrics.append(floats(step_metrics))
    return state


def floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()}


POLICY = MODELS["llama"]


def dpo_batches() -> list[tuple[list[list[int]], list[list[int]], list[list[int]]]]:
    """``STEPS`` steps of 4 preference pairs of random prompts and answers of different lengths."""
    generator = torch.Generator().manual_seed(1)

    def ids(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high, (), generator=generator))
        return torch.randint(0, 64, (n,), generator=generator).tolist()

    return [tuple([ids(2, 6) for _ in range(4)] for _ in range(3)) for _ in range(STEPS)]  # type: ignore[misc]


def run_dpo(
    parallel: Parallel,
    steps: list[tuple[list[list[int]], list[list[int]], list[list[int]]]],
    metrics: list[dict[str, float]] | None = None,
) -> TensorDict:
    """DPO steps over this rank's pairs of each step; the state, and each step's metrics appended to ``metrics``
    (the state alone hid a gradient summed over the ranks rather than averaged: clipped, AdamW's update is
    nearly the same for either)."""
    module, config = POLICY
    params = module.init(config, 0)
    state = init_state(params.clone())
    forward = bind(module.forward, config=config)
    decay = optim.decay_mask(params)
    for prompts, chosen, rejected in steps:
        batch = preference_batch(parallel.rows(prompts), parallel.rows(chosen), parallel.rows(rejected))
        state, step_metrics = dpo_step(
            state,
            batch,
            forward=forward,
            reference=params,
            beta=0.5,
            optimizer=OPTIMIZER,
            lr=LR,
            decay=decay,
            parallel=parallel,
        )
        if metrics is not None:
            metrics.append(floats(step_metrics))
    return state


def grpo_rollout(every_rank_trains: bool = False) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """4 prompts with 2 answers each (prompt-major) and their rewards. The first two prompts' answers tie, so
    on 2 ranks rank 0 keeps no group (it steps on zero gradients, its metrics come from the zero path); with
    ``every_rank_trains`` no group ties, and the ranks' answers hold different numbers of tokens (14 and 13), so a
    loss normalised by a rank's own count would differ from one process's."""
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 64, (n,), generator=generator).tolist() for n in (2, 3, 4, 2)]
    answers = [torch.randint(0, 64, (n,), generator=generator).tolist() for n in (3, 5, 2, 4, 6, 1, 3, 3)]
    rewards = torch.tensor([[0.5, 0.5], [0.3, 0.3], [0.0, 1.0], [0.2, 0.9]])
    if every_rank_trains:
        rewards = torch.tensor([[0.5, 0.1], [0.3, 0.8], [0.0, 1.0], [0.2, 0.9]])
    return prompts, answers, rewards


def run_grpo(
    parallel: Parallel,
    data: tuple[list[list[int]], list[list[int]], torch.Tensor],
    optimizer: optim.AdamWConfig | muon.MuonConfig = OPTIMIZER,
) -> tuple[TensorDict, dict[str, float]]:
    """``STEPS`` GRPO steps, with a KL penalty to another model, over this rank's prompts of one rollout; the
    state and the last step's metrics."""
    module, config = POLICY
    prompts, answers, rewards = data
    mine = list(parallel.rows(range(len(prompts))))
    rows = [(p, g) for p in mine for g in range(2)]
    kept = rewards[mine].amax(-1) > rewards[mine].amin(-1)
    train_rows = [(p, g) for i, (p, g) in enumerate(rows) if kept[i // 2]]
    batch = completion_batch([prompts[p] for p, _ in train_rows], [answers[2 * p + g] for p, g in train_rows])
    forward = bind(module.forward, config=config)
    with torch.no_grad():
        reference = masked_token_logprobs(forward(module.init(config, 1), batch, dropout_seed=None), batch)
    rollout = grpo.Rollout(
        batch=batch,
        completions=[answers[2 * p + g] for p, g in rows],
        rewards=rewards[mine],
        kept=kept,
        advantages=grpo.group_advantages(rewards[mine])[kept].flatten(),
        old_logprobs=None,
        reference_logprobs=reference,
    )
    state = init_state(module.init(config, 0), optimizer)
    settings = grpo.GRPOConfig(group_size=2, micro_batch=2, kl_beta=0.1)
    decay = optim.decay_mask(state["params"])
    for _ in range(STEPS):
        state, metrics = grpo.grpo_step(
            state,
            rollout,
            forward=forward,
            config=settings,
            optimizer=optimizer,
            lr=LR,
            decay=decay,
            parallel=parallel,
        )
    return state, {key: float(value) for key, value in metrics.items()}
