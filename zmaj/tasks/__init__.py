"""Fine-tuning tasks with exact checkers: problems, worked answers and verifiable rewards for SFT and GRPO."""

from zmaj.tasks.arithmetic import ArithmeticTask
from zmaj.tasks.base import (
    FEW_SHOT_STOP,
    FORMAT_WEIGHT,
    Problem,
    Reward,
    Split,
    Task,
    final_answer,
    finished_lines,
)
from zmaj.tasks.countdown import CountdownTask, check_expression
from zmaj.tasks.evaluate import RewardFn, accuracy_interval, score
from zmaj.tasks.registry import checked_task, get_task, register_task, task_names
from zmaj.tasks.word_problems import WordProblemsTask

__all__ = [
    "FEW_SHOT_STOP",
    "FORMAT_WEIGHT",
    "ArithmeticTask",
    "CountdownTask",
    "Problem",
    "Reward",
    "RewardFn",
    "Split",
    "Task",
    "WordProblemsTask",
    "accuracy_interval",
    "check_expression",
    "checked_task",
    "final_answer",
    "finished_lines",
    "get_task",
    "register_task",
    "score",
    "task_names",
]
