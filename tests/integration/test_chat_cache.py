"""SmolLM2-135M-Instruct (from its GGUF, in float32) chatting with its cache kept from turn to turn gives the logits
and greedy answers of encoding the whole conversation afresh (``tests.unit.infer.test_chat.check_turns``)."""

import pytest

from tests.unit.infer.test_chat import check_turns
from zmaj.convert.load import load_model

USER = ["What is the capital of France?", "And of Italy?", "Which of the two is bigger?"]


@pytest.mark.slow
def test_smollm2_chat_with_a_kept_cache_answers_as_encoding_the_whole_conversation() -> None:
    model = load_model("pypi:smollm2-135m-instruct")
    step = model.architecture.cached(model.config)
    # SmolLM2's logits reach 31, where float32 rounds to 4e-6: the same fresh prefill into a cache with 37 more
    # slots (a different reduction length in attention) moved them by 3.7e-5, so 1e-4 is the rounding's noise.
    reused = check_turns(step, model.params, model.config, model.tokenizer, USER, 8, atol=1e-4)
    assert reused[0] == 0
    assert all(count > 0 for count in reused[1:])
