"""Conversation records: the JSON form, its validation, titles and ids."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatstream.sessions.errors import CorruptRecord, ForeignRecord
from chatstream.sessions.export import export_json, export_markdown
from chatstream.sessions.records import (
    Conversation,
    Feedback,
    clean_title,
    conversation_from_json,
    conversation_to_json,
    derive_title,
)
from tests.sessions.support import START, conversation, message


def _document() -> dict[str, Any]:
    record = conversation(texts=("hi", "hello"))
    record.messages[1].feedback = Feedback(True, {"note": "ok"}, START)
    record.messages[1].generation_params = {"temperature": 0.2}
    record.messages[0].children = ["attached"]
    return conversation_to_json(record)


def test_json_round_trip_through_text() -> None:
    document = _document()
    text = json.dumps(document)
    assert conversation_to_json(conversation_from_json(json.loads(text))) == document
    assert document["object"] == "chatstream.conversation" and document["schema_version"] == 1
    assert document["messages"][1]["feedback"] == {"is_like": True, "form_data": {"note": "ok"}, "created_at": START}


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("title",), None, "'title' must be a str"),
        (("version",), "3", "'version' must be a int"),
        (("version",), True, "'version' must be a int"),
        (("created_at",), "yesterday", "'created_at' must be a number"),
        (("prompt_settings",), [], "'prompt_settings' must be a dict"),
        (("messages",), {}, "'messages' must be a list"),
        (("messages", 0), "text", "the message is a str"),
        (("messages", 0, "role"), "wizard", "role must be one of"),
        (("messages", 0, "id"), "", "non-empty id"),
        (("messages", 0, "children"), [1], "children must be strings"),
        (("messages", 1, "feedback"), {"is_like": "yes"}, "'is_like' must be a bool"),
        (("id",), "../etc", "conversation id"),
    ],
)
def test_malformed_records_raise_corrupt_record_naming_the_id(path: tuple[Any, ...], value: Any, needle: str) -> None:
    document = _document()
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(CorruptRecord, match="cannot be read") as caught:
        conversation_from_json(document, key="conv_k")
    assert caught.value.key == "conv_k" and needle in caught.value.reason
    assert not isinstance(caught.value, ForeignRecord)


def test_foreign_documents() -> None:
    newer = _document() | {"schema_version": 2}
    with pytest.raises(ForeignRecord, match="newer"):
        conversation_from_json(newer)
    with pytest.raises(ForeignRecord, match="not a chatstream conversation"):
        conversation_from_json({"object": "thread", "id": "x"})
    with pytest.raises(CorruptRecord, match="not a JSON object"):
        conversation_from_json(["a list"], key="conv_k")


def test_titles() -> None:
    assert derive_title("  Explain\n the   WAL  ") == "Explain the WAL"
    long = derive_title("word " * 40)
    assert len(long) == 60 and long.endswith("…")
    assert derive_title(None) == ""
    assert clean_title("  a \t b ") == "a b"
    with pytest.raises(ValueError, match="200"):
        clean_title("x" * 201)
    with pytest.raises(ValueError, match="string"):
        clean_title(3)  # type: ignore[arg-type]


def test_ids_and_values_are_checked_on_construction() -> None:
    with pytest.raises(ValueError, match="conversation id"):
        conversation(id="has space")
    with pytest.raises(ValueError, match="owner"):
        conversation(owner="")
    with pytest.raises(ValueError, match="role"):
        message("system", "x")


def test_exports() -> None:
    record = conversation_from_json(_document())
    assert isinstance(record, Conversation)
    assert conversation_from_json(json.loads(export_json(record))) == record
    markdown = export_markdown(record)
    assert markdown.startswith("# hi\n")
    assert "## User · 2023-11-14 22:13 UTC\n\nhi\n\n> attached" in markdown
    assert "## Assistant · 2023-11-14 22:13 UTC · 👍\n\nhello" in markdown
