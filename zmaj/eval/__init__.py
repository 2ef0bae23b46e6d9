"""Evaluation with the field's standard tools: zmaj's models on EleutherAI's lm-evaluation-harness
(``zmaj.eval.harness``). zmaj's own verifiable tasks live in ``zmaj.tasks``."""
