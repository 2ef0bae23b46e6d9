"""Conversations for supervised fine-tuning: lists of ``{role, content}`` messages, and where they come from.

This is the shape chat datasets on the Hub share (the "messages" format of TRL and of Hugging Face chat
templates): an optional system message, then user and assistant turns. SFT learns only the assistant turns, so a
conversation without one teaches nothing and is rejected, naming the sample; so is an unknown role or a content
that is not text. Rendering a conversation to tokens with a chat template, and its loss mask, happen downstream.

A source is one of (the ``kind`` key picks it, as for pre-training sources in ``zmaj.data.config``):

    {kind: files, paths: [chats.jsonl]}                        # one {"messages": [...]} object per line
    {kind: hub, path: parquet, data_files: chats.parquet}      # anything datasets.load_dataset reads
    {kind: task, task: countdown, n: 2000, options: {count: 4}}  # a built-in task's worked answers
"""

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from zmaj.data.corpus import hub_where, load_hub, reading
from zmaj.specfile import Seed
from zmaj.tasks import Split, checked_task, get_task
from zmaj.text import checked_utf8, read_jsonl

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    """One turn: who speaks and what they say."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: Annotated[StrictStr, AfterValidator(checked_utf8)]
    """Strict: a number or a null is a broken row, not text to stringify; JSON can spell half a surrogate pair
    (``"\\ud83d"``), which no tokenizer encodes, refused here where the error names the sample."""


class Conversation(BaseModel):
    """A sequence of messages holding at least one assistant turn, the part SFT learns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: tuple[Message, ...]

    @model_validator(mode="after")
    def _has_assistant_turn(self) -> "Conversation":
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("a conversation needs at least one assistant message (the text SFT learns)")
        return self


class ChatFilesSource(BaseModel):
    """Local jsonl files, one conversation per line, its messages under ``messages_column``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["files"] = "files"
    paths: list[str] = Field(min_length=1)
    messages_column: str = "messages"

    @field_validator("paths")
    @classmethod
    def _paths_exist(cls, paths: list[str]) -> list[str]:
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise ValueError(f"data file(s) not found: {', '.join(missing)}")
        return paths


class ChatHubSource(BaseModel):
    """Anything ``datasets.load_dataset`` reads with a messages column: a Hub dataset, or local json/parquet."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["hub"] = "hub"
    path: str
    name: str | None = None
    data_files: str | list[str] | None = None
    revision: str | None = None
    """A commit, tag or branch of a Hub dataset (``datasets``' own default: "main", which moves): the commit pins
    the conversations read. Offline, only the commit of a cached copy, unstreamed."""
    split: str = "train"
    messages_column: str = "messages"
    streaming: bool = False
    max_conversations: int | None = Field(default=None, ge=1)
    """Read only the first rows: a cheap way to bound a run on a huge dataset."""


class ChatTaskSource(BaseModel):
    """``n`` problems of a built-in task's split as conversations: the question asked, the worked answer given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["task"] = "task"
    task: str
    options: dict[str, Any] = Field(default_factory=dict)
    """The task's difficulty, passed to ``zmaj.tasks.get_task``."""
    split: Split = "train"
    n: int = Field(ge=1)
    seed: Seed = 0
    system: str | None = None
    """An optional system message put first in every conversation."""

    @model_validator(mode="after")
    def _buildable(self) -> "ChatTaskSource":
        checked_task(self.task, self.options)  # an unknown name or a bad option fails here, naming it
        return self


ChatSource = Annotated[ChatFilesSource | ChatHubSource | ChatTaskSource, Field(discriminator="kind")]


def load_conversations(source: ChatSource) -> list[Conversation]:
    """Every conversation of a source, validated; the first bad one fails, naming its file and line or row, and
    a source with none fails naming the source (training on nothing would fail later, obscurely)."""
    if isinstance(source, ChatTaskSource):
        return task_conversations(source)
    conversations = [_validate(sample, messages) for sample, messages in _raw_messages(source)]
    if not conversations:
        where = source.paths if isinstance(source, ChatFilesSource) else source.path
        raise ValueError(f"data: no conversation found in {where}")
    return conversations


def task_conversations(source: ChatTaskSource) -> list[Conversation]:
    """A task's problems as user question -> assistant worked answer (which ends in ``Answer: ...``)."""
    task = get_task(source.task, **source.options)
    system = [Message(role="system", content=source.system)] if source.system is not None else []
    return [
        Conversation(
            messages=(
                *system,
                Message(role="user", content=problem.prompt),
                Message(role="assistant", content=problem.solution),
            )
        )
        for problem in task.problems(source.split, source.n, source.seed)
    ]


def _validate(sample: str, messages: Any) -> Conversation:
    """One conversation from raw rows, or an error that says which sample is broken and how."""
    try:
        return Conversation.model_validate({"messages": messages})
    except ValidationError as error:
        raise ValueError(f"bad conversation at {sample}: {error}") from error


def _raw_messages(source: ChatFilesSource | ChatHubSource) -> Iterator[tuple[str, Any]]:
    """(sample name, its messages) for each row, the name saying where to look: ``file:line`` or the row index."""
    column = source.messages_column
    if isinstance(source, ChatFilesSource):
        for path in source.paths:
            for number, row in read_jsonl(path):  # not UTF-8, or a line not JSON: one line naming where
                sample = f"{path}:{number}"
                yield sample, _column(row, column, sample)
        return
    dataset = load_hub(source)
    where = hub_where(source)
    for index, row in enumerate(reading(islice(dataset, source.max_conversations), where)):  # None: all rows
        sample = f"{where}, row {index}"
        yield sample, _without_nulls(_column(row, column, sample))


def _without_nulls(messages: Any) -> Any:
    """A row's messages less their null fields: Arrow gives every message each field that any message of the
    column has, null where it has none, and a null is no field to validate (a jsonl line would not hold it).
    A message always has a role and content, so their nulls are the row's own, refused as nulls, not as
    missing."""
    if not isinstance(messages, list):
        return messages
    kept = set(Message.model_fields)
    return [
        {k: v for k, v in m.items() if v is not None or k in kept} if isinstance(m, dict) else m
        for m in messages
    ]


def _column(row: Any, column: str, sample: str) -> Any:
    if not isinstance(row, dict) or column not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"bad conversation at {sample}: no {column!r} column (has {keys})")
    return row[column]
