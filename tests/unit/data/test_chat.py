import json
import re
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from zmaj.data.chat import (
    ChatFilesSource,
    ChatHubSource,
    ChatSource,
    ChatTaskSource,
    Conversation,
    Message,
    load_conversations,
)
from zmaj.tasks import get_task
from zmaj.text import NotJSONError, NotTextError

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "Answer: 4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "Answer: 6"},
    ],
    [{"role": "user", "content": "Ünïcødé ✓"}, {"role": "assistant", "content": ""}],
]


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _expected(rows: list[list[dict[str, str]]]) -> list[Conversation]:
    return [Conversation(messages=tuple(Message(**m) for m in row)) for row in rows]


def test_jsonl_files_are_read_in_order_with_any_column_and_blank_lines(tmp_path: Path) -> None:
    first = _write_jsonl(
        tmp_path / "a.jsonl", [{"messages": m, "id": i} for i, m in enumerate(CONVERSATIONS)]
    )
    second = tmp_path / "b.jsonl"
    second.write_text("\n" + json.dumps({"messages": CONVERSATIONS[0]}) + "\n\n")
    got = load_conversations(ChatFilesSource(paths=[str(first), str(second)]))
    assert got == _expected([*CONVERSATIONS, CONVERSATIONS[0]])
    assert got[1].messages[0] == Message(role="system", content="Be brief.")

    chats = _write_jsonl(tmp_path / "c.jsonl", [{"chat": m} for m in CONVERSATIONS])
    assert load_conversations(ChatFilesSource(paths=[str(chats)], messages_column="chat")) == _expected(
        CONVERSATIONS
    )


@pytest.mark.parametrize(
    ("row", "complaint"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "at least one assistant message"),
        ({"messages": []}, "at least one assistant message"),
        (
            {"messages": [{"role": "robot", "content": "Hi"}, CONVERSATIONS[0][1]]},
            "'system', 'user' or 'assistant'",
        ),
        ({"messages": [{"role": "user", "content": 7}, CONVERSATIONS[0][1]]}, "valid string"),
        ({"messages": [{"role": "user", "content": None}, CONVERSATIONS[0][1]]}, "valid string"),
        ({"messages": [{"role": "user"}, CONVERSATIONS[0][1]]}, "content"),
        ({"messages": [{"role": "user", "content": "Hi", "name": "x"}, CONVERSATIONS[0][1]]}, "name"),
        ({"messages": "Hi"}, "valid tuple"),
        (  # JSON spells half an emoji; tokenizers would raise a TypeError naming nothing
            {"messages": [{"role": "user", "content": "half \ud83d"}, CONVERSATIONS[0][1]]},
            r"not UTF-8 text \(U\+D83D at character 5\)",
        ),
        ({"text": "Hi"}, r"no 'messages' column \(has \['text'\]\)"),
        ([1, 2], r"no 'messages' column \(has list\)"),
    ],
)
def test_a_bad_conversation_is_an_error_naming_file_and_line(
    tmp_path: Path, row: Any, complaint: str
) -> None:
    path = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": CONVERSATIONS[0]}, row])
    with pytest.raises(ValueError, match=complaint) as caught:
        load_conversations(ChatFilesSource(paths=[str(path)]))
    assert f"bad conversation at {path}:2" in str(caught.value)


def test_a_line_that_is_not_json_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n\n{'messages': []}\n")
    with pytest.raises(NotJSONError, match=rf"^{re.escape(str(path))}:3: not JSON"):
        load_conversations(ChatFilesSource(paths=[str(path)]))


def test_a_source_without_a_conversation_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=rf"^data: no conversation found in \['{re.escape(str(path))}'\]$"):
        load_conversations(ChatFilesSource(paths=[str(path)]))


def test_a_file_that_is_not_utf8_is_an_error_naming_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_bytes(json.dumps({"messages": CONVERSATIONS[0]}).encode() + b"\n\x00\xc3\x28\n")
    offset = len(json.dumps({"messages": CONVERSATIONS[0]})) + 2
    with pytest.raises(
        NotTextError,
        match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 0xc3 at offset {offset}, line 2\)$",
    ):
        load_conversations(ChatFilesSource(paths=[str(path)]))


def test_missing_files_fail_when_the_source_is_configured(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"not found: .*nope\.jsonl"):
        ChatFilesSource(paths=[str(tmp_path / "nope.jsonl")])


def test_one_assistant_turn_anywhere_makes_a_conversation() -> None:
    """Not necessarily the last: a trailing question (the tail of a longer chat) or an assistant that speaks
    first still holds an answer to learn."""
    rows = [CONVERSATIONS[0] + [{"role": "user", "content": "And?"}], CONVERSATIONS[0][::-1]]
    for row in rows:
        assert [m.role for m in Conversation.model_validate({"messages": row}).messages] == [
            m["role"] for m in row
        ]


@pytest.mark.parametrize(
    ("source", "fields", "complaint"),
    [
        (ChatFilesSource, {"paths": []}, "at least 1 item"),
        (ChatHubSource, {"path": "json", "max_conversations": 0}, "greater than or equal to 1"),
        (ChatTaskSource, {"task": "arithmetic", "n": 0}, "greater than or equal to 1"),
    ],
    ids=["files", "hub", "task"],
)
def test_a_source_of_no_conversations_fails_when_configured(
    source: type[BaseModel], fields: dict[str, Any], complaint: str
) -> None:
    """Read as an empty list, a task source of none would have fine-tuning train on nothing."""
    with pytest.raises(ValidationError, match=complaint):
        source(**fields)


def test_a_task_source_reads_the_train_split_with_seed_0_by_default() -> None:
    """The test split is what evaluation scores: fine-tuning on it by default would leak the answers."""
    conversations = load_conversations(ChatTaskSource(task="arithmetic", n=3))
    problems = get_task("arithmetic").problems("train", 3, seed=0)
    assert [c.messages[0].content for c in conversations] == [p.prompt for p in problems]


def test_conversations_are_validated_on_their_own() -> None:
    with pytest.raises(ValidationError, match="assistant"):
        Conversation(messages=(Message(role="system", content="s"), Message(role="user", content="u")))
    with pytest.raises(ValidationError, match="role"):
        Message(role="tool", content="x")


@pytest.mark.parametrize("streaming", [False, True])
def test_datasets_sources_read_jsonl_and_parquet(tmp_path: Path, streaming: bool) -> None:
    jsonl = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CONVERSATIONS])
    source = ChatHubSource(path="json", data_files=str(jsonl), streaming=streaming)
    assert load_conversations(source) == _expected(CONVERSATIONS)
    first = ChatHubSource(path="json", data_files=str(jsonl), streaming=streaming, max_conversations=2)
    assert load_conversations(first) == _expected(CONVERSATIONS[:2])

    parquet = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"dialogue": CONVERSATIONS, "id": [0, 1, 2]}), parquet)
    source = ChatHubSource(
        path="parquet", data_files=str(parquet), messages_column="dialogue", streaming=streaming
    )
    assert load_conversations(source) == _expected(CONVERSATIONS)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_field_some_messages_lack_is_absent_from_them_not_null(tmp_path: Path, streaming: bool) -> None:
    """Arrow gives every message of a column every field (a null where one has none): messages without the
    field are valid, and one holding a field a message has no room for is refused, as in jsonl."""
    rows = [[dict(m) for m in conversation] for conversation in CONVERSATIONS]
    rows[1][0]["name"] = "alice"
    parquet = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": rows}), parquet)
    source = ChatHubSource(path="parquet", data_files=str(parquet), streaming=streaming)
    assert load_conversations(source.model_copy(update={"max_conversations": 1})) == _expected(
        CONVERSATIONS[:1]
    )
    with pytest.raises(ValueError, match=r"(?s)row 1: .*messages\.0\.name\s+Extra inputs are not permitted"):
        load_conversations(source)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("field", "complaint"),
    [
        ("content", "Input should be a valid string"),
        ("role", "Input should be 'system', 'user' or 'assistant'"),
    ],
)
def test_a_null_role_or_content_in_a_datasets_row_is_refused_as_null(
    tmp_path: Path, streaming: bool, field: str, complaint: str
) -> None:
    """Dropped as a field Arrow filled in, a null role or content was reported as missing ("Field required")."""
    rows: list[list[dict[str, str | None]]] = [
        [dict(m) for m in conversation] for conversation in CONVERSATIONS
    ]
    rows[0][0][field] = None
    parquet = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": rows}), parquet)
    source = ChatHubSource(path="parquet", data_files=str(parquet), streaming=streaming)
    with pytest.raises(ValueError, match=rf"(?s)row 0: .*messages\.0\.{field}\s+{re.escape(complaint)}"):
        load_conversations(source)


def test_a_bad_datasets_row_is_an_error_naming_the_row(tmp_path: Path) -> None:
    rows = [{"messages": CONVERSATIONS[0]}, {"messages": [{"role": "user", "content": "Hi"}]}]
    jsonl = _write_jsonl(tmp_path / "chats.jsonl", rows)
    expected = (
        rf"(?s)bad conversation at json, split train, files {re.escape(str(jsonl))}, row 1: .*assistant"
    )
    with pytest.raises(ValueError, match=expected):
        load_conversations(ChatHubSource(path="json", data_files=str(jsonl), streaming=True))


@pytest.mark.parametrize(
    ("path", "complaint"),
    [
        ("json", "no rows to read"),
        ("someuser/chats", "not reachable (Couldn't reach 'someuser/chats' on the Hub"),
    ],
)
def test_a_datasets_source_that_cannot_be_read_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, complaint: str
) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network in tests, and no retries
    empty = tmp_path / "chats.jsonl"
    empty.write_text("")
    source = ChatHubSource(path=path) if "/" in path else ChatHubSource(path=path, data_files=str(empty))
    where = path + ", split train" + ("" if "/" in path else f", files {empty}")
    with pytest.raises(ValueError, match=f"^{re.escape(f'{where}: {complaint}')}"):
        load_conversations(source)


def test_a_task_split_becomes_question_and_worked_answer() -> None:
    source = ChatTaskSource(
        task="countdown", options={"count": 4}, split="test", n=20, seed=3, system="Be exact."
    )
    conversations = load_conversations(source)
    task = get_task("countdown", count=4)
    problems = task.problems("test", 20, seed=3)
    assert len(conversations) == 20
    for conversation, problem in zip(conversations, problems, strict=True):
        assert [m.role for m in conversation.messages] == ["system", "user", "assistant"]
        assert conversation.messages[0].content == "Be exact."
        assert conversation.messages[1].content == problem.prompt
        assert task.reward(problem, conversation.messages[2].content).correctness == 1.0
    plain = load_conversations(ChatTaskSource(task="arithmetic", n=3))
    assert [[m.role for m in c.messages] for c in plain] == [["user", "assistant"]] * 3


def test_sources_are_picked_by_kind_from_a_spec(tmp_path: Path) -> None:
    jsonl = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": CONVERSATIONS[0]}])
    adapter: TypeAdapter[ChatSource] = TypeAdapter(ChatSource)
    assert isinstance(adapter.validate_python({"kind": "files", "paths": [str(jsonl)]}), ChatFilesSource)
    assert isinstance(adapter.validate_python({"kind": "hub", "path": "json"}), ChatHubSource)
    assert adapter.validate_python({"kind": "task", "task": "arithmetic", "n": 5}) == ChatTaskSource(
        task="arithmetic", n=5
    )
    with pytest.raises(ValidationError, match="max_document"):
        adapter.validate_python({"kind": "hub", "path": "json", "max_documents": 5})
    with pytest.raises(ValueError, match="unknown task 'sums'"):
        load_conversations(ChatTaskSource(task="sums", n=1))


def test_a_task_source_with_an_unknown_task_fails_when_configured() -> None:
    """A spec naming an unknown task must fail when it is read, not after the model is loaded: the suite constructed
    the source inside the ``pytest.raises`` around ``load_conversations``, so a source that did not check
    passed."""
    with pytest.raises(ValidationError, match="unknown task 'sums'"):
        ChatTaskSource(task="sums", n=1)
