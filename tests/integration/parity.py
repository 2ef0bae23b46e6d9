"""What every parity test does with its ``transformers`` reference, whatever the family: build it at random with
its norms and biases moved off their identity, and check that a batch's padding and its packed documents change
no logit of the tokens beside them."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers

from zmaj.models.common import Batch

Ours = Callable[[Batch], torch.Tensor]
"""zmaj's logits of a batch, ``[batch, seq, vocab]``."""
Theirs = Callable[[torch.Tensor], torch.Tensor]
"""The reference's logits of a ``[1, seq]`` row of tokens, ``[1, seq, vocab]``."""


def random_reference(config: transformers.PretrainedConfig, **kwargs: Any) -> transformers.PreTrainedModel:
    """A random float32 model in eval mode (seed 0), its norms and biases moved off their initial one or zero,
    so that a dropped or misplaced one shows in the logits; ``kwargs`` go to ``from_config``."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def assert_padded_rows_give_the_unpadded_logits(
    ours: Ours, theirs: Theirs, vocab: int, lengths: Sequence[int]
) -> None:
    """Rows of ``lengths`` tokens, right-padded to the longest, each give the logits of the row alone."""
    generator = torch.Generator().manual_seed(2)
    width = max(lengths)
    rows = [torch.randint(0, vocab, (1, n), generator=generator) for n in lengths]
    padded = Batch(
        tokens=torch.cat([torch.nn.functional.pad(row, (0, width - row.shape[1])) for row in rows]),
        is_token=torch.arange(width)[None] < torch.tensor(lengths)[:, None],
    )
    with torch.no_grad():
        logits = ours(padded)
    for i, row in enumerate(rows):
        assert (logits[i, : lengths[i]] - theirs(row)[0]).abs().max().item() <= 1e-5


def assert_packed_documents_give_the_logits_of_separate_runs(
    ours: Ours, theirs: Theirs, vocab: int, lengths: tuple[int, int]
) -> None:
    """Two documents packed into one row, positions restarting at the second, give each document's logits."""
    generator = torch.Generator().manual_seed(3)
    first, second = (torch.randint(0, vocab, (1, n), generator=generator) for n in lengths)
    packed = Batch(
        tokens=torch.cat([first, second], 1),
        positions=torch.cat([torch.arange(n) for n in lengths])[None],
        document_ids=torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)])[None],
    )
    with torch.no_grad():
        logits = ours(packed)
    separate = torch.cat([theirs(first), theirs(second)], dim=1)
    assert (logits - separate).abs().max().item() <= 1e-5
