"""Conversation records: parse the two common data formats into one validated shape.

Everything downstream (templates, segments, task-template statistics) works on
`Conversation`, so the quirks of LLaVA JSON and OpenAI/ShareGPT messages are
handled here once. Validation happens before rendering because a bad row must
be reported with its id and a reason code (and dropped by the caller), not
turned into a silently mis-masked sample.

Formats
-------
LLaVA (JSON or JSONL rows)::

    {"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] | absent,
     "conversations": [{"from": "human" | "gpt", "value": "..."}, ...]}

OpenAI / ShareGPT messages::

    {"id": ... (optional), "messages": [{"role": "system" | "user" | "assistant",
                                          "content": str | [parts]}],
     "images": [...] (optional)}

where a part is ``{"type": "text", "text": ...}`` or ``{"type": "image"}``
(``image_url`` parts are accepted as images too). Parts are joined with
``"\\n"`` and an image part becomes the ``<image>`` placeholder, so
``[image, text "What is it?"]`` becomes ``"<image>\\nWhat is it?"``, the
LLaVA convention. An image part carrying its own path (``"image": "x.jpg"`` or
``image_url.url``) contributes that path when the record has no ``images``.

Rules (``ConversationError.reason`` in brackets):

- required keys present [missing_field] with the right types [bad_type];
- at least one turn [empty_conversation]; roles are known [unknown_role];
- one optional leading system message, then user/assistant alternating,
  starting with user and ending with assistant [wrong_role_order];
- no turn is empty or whitespace only [empty_turn];
- ``<image>`` never appears in an assistant turn [image_in_response];
- the number of ``<image>`` placeholders in user turns equals the number of
  images [image_placeholder_mismatch]. LLaVA convention: when a record has
  exactly one image and no placeholder at all, ``"<image>\\n"`` is prepended
  to the first user turn (LLaVA's own data relies on this for some rows).

Unknown extra keys in a record are ignored. A record without an id gets a
stable content-hash id (``"sha1:..."``) unless the caller passes ``default_id``
(for example the row number in its file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
USER = "user"
ASSISTANT = "assistant"

_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": "system"}
FORMATS = ("llava", "messages", "auto")


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]
    images: tuple[str, ...] = ()  # image paths as given (relative to an image root), in order
    system: str | None = None  # explicit system prompt from the data, if any


class ConversationError(ValueError):
    """A row that cannot be used. `.reason` is a short snake_case code for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep both fields through pickling (Ray ships these between processes)
        return (type(self), (self.reason, str(self)))


def parse_record(record: dict, fmt: str = "auto", *, default_id: str | None = None) -> Conversation:
    """Parse one data row. `fmt="auto"` picks LLaVA for "conversations", messages for "messages"."""
    if not isinstance(record, dict):
        raise ConversationError("bad_type", f"row {default_id!r}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        if "conversations" in record:
            fmt = "llava"
        elif "messages" in record:
            fmt = "messages"
        else:
            row_id = _row_id(record, default_id)
            raise ConversationError(
                "missing_field", f"row {row_id!r}: neither 'conversations' (LLaVA) nor 'messages' is present"
            )
    if fmt == "llava":
        return parse_llava(record, default_id=default_id)
    if fmt == "messages":
        return parse_messages(record, default_id=default_id)
    raise ValueError(f"unknown conversation format {fmt!r}; expected one of {FORMATS}")


def parse_llava(record: dict, *, default_id: str | None = None) -> Conversation:
    row_id = _row_id(record, default_id)
    entries = _required_list(record, "conversations", row_id)
    roles_and_texts = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConversationError("bad_type", f"row {row_id!r}: conversations[{i}] is not an object")
        role_key = "from" if "from" in entry else "role"
        text_key = "value" if "value" in entry else "content"
        for key in (role_key, text_key):
            if key not in entry:
                raise ConversationError("missing_field", f"row {row_id!r}: conversations[{i}] has no {key!r}")
        role, text = entry[role_key], entry[text_key]
        if not isinstance(role, str) or not isinstance(text, str):
            raise ConversationError("bad_type", f"row {row_id!r}: conversations[{i}] role and text must be strings")
        roles_and_texts.append((role, text))
    images = _images(record, ("image", "images"), row_id)
    return _build(row_id, roles_and_texts, images)


def parse_messages(record: dict, *, default_id: str | None = None) -> Conversation:
    row_id = _row_id(record, default_id)
    messages = _required_list(record, "messages", row_id)
    roles_and_texts = []
    inline_images: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConversationError("bad_type", f"row {row_id!r}: messages[{i}] is not an object")
        for key in ("role", "content"):
            if key not in message:
                raise ConversationError("missing_field", f"row {row_id!r}: messages[{i}] has no {key!r}")
        role = message["role"]
        if not isinstance(role, str):
            raise ConversationError("bad_type", f"row {row_id!r}: messages[{i}].role must be a string")
        text = _content_text(message["content"], f"messages[{i}]", row_id, inline_images)
        roles_and_texts.append((role, text))
    if "images" in record or "image" in record:
        images = _images(record, ("images", "image"), row_id)
    else:
        images = tuple(inline_images)
    return _build(row_id, roles_and_texts, images)


def _row_id(record: dict, default_id: str | None) -> str:
    if record.get("id") is not None:
        return str(record["id"])
    if default_id is not None:
        return str(default_id)
    digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return f"sha1:{digest[:16]}"


def _required_list(record: dict, key: str, row_id: str) -> list:
    if key not in record:
        raise ConversationError("missing_field", f"row {row_id!r}: missing {key!r}")
    value = record[key]
    if not isinstance(value, list):
        raise ConversationError("bad_type", f"row {row_id!r}: {key!r} must be a list, got {type(value).__name__}")
    if not value:
        raise ConversationError("empty_conversation", f"row {row_id!r}: {key!r} is empty")
    return value


def _images(record: dict, keys: tuple[str, ...], row_id: str) -> tuple[str, ...]:
    for key in keys:
        if key in record and record[key] is not None:
            value = record[key]
            if isinstance(value, str):
                return (value,)
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise ConversationError("bad_type", f"row {row_id!r}: {key!r} must be a string or a list of strings")
    return ()


def _content_text(content, where: str, row_id: str, inline_images: list[str]) -> str:
    """A message's content as text: a string as is, a list of parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConversationError("bad_type", f"row {row_id!r}: {where}.content must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part:
            raise ConversationError("bad_type", f"row {row_id!r}: {where}.content[{j}] is not a typed part")
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ConversationError("bad_type", f"row {row_id!r}: {where}.content[{j}].text must be a string")
            texts.append(part["text"])
        elif kind in ("image", "image_url"):
            texts.append(IMAGE_PLACEHOLDER)
            path = part.get("image")
            if path is None and isinstance(part.get("image_url"), dict):
                path = part["image_url"].get("url")
            if isinstance(path, str):
                inline_images.append(path)
        else:
            raise ConversationError("bad_type", f"row {row_id!r}: {where}.content[{j}] has unknown type {kind!r}")
    return "\n".join(texts)


def _build(row_id: str, roles_and_texts: list[tuple[str, str]], images: tuple[str, ...]) -> Conversation:
    system = None
    turns: list[Turn] = []
    for i, (raw_role, text) in enumerate(roles_and_texts):
        role = _ROLES.get(raw_role.lower())
        if role is None:
            raise ConversationError("unknown_role", f"row {row_id!r}: turn {i} has unknown role {raw_role!r}")
        if role == "system":
            if i != 0:
                raise ConversationError(
                    "wrong_role_order", f"row {row_id!r}: system message at position {i}, not first"
                )
            system = text
            continue
        expected = USER if len(turns) % 2 == 0 else ASSISTANT
        if role != expected:
            raise ConversationError(
                "wrong_role_order",
                f"row {row_id!r}: turn {i} is {role!r}, expected {expected!r} (user first, alternating)",
            )
        turns.append(Turn(role, text))
    if not turns:
        raise ConversationError("empty_conversation", f"row {row_id!r}: no user/assistant turns")
    if turns[-1].role != ASSISTANT:
        raise ConversationError("wrong_role_order", f"row {row_id!r}: conversation ends with a user turn")
    for i, turn in enumerate(turns):
        if not turn.text.strip():
            raise ConversationError("empty_turn", f"row {row_id!r}: {turn.role} turn {i} is empty")
        if turn.role == ASSISTANT and IMAGE_PLACEHOLDER in turn.text:
            raise ConversationError(
                "image_in_response", f"row {row_id!r}: assistant turn {i} contains {IMAGE_PLACEHOLDER}"
            )
    placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns if t.role == USER)
    if placeholders == 0 and len(images) == 1:
        turns[0] = Turn(USER, IMAGE_PLACEHOLDER + "\n" + turns[0].text)
        placeholders = 1
    if placeholders != len(images):
        raise ConversationError(
            "image_placeholder_mismatch",
            f"row {row_id!r}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in user turns "
            f"but {len(images)} image(s)",
        )
    return Conversation(id=row_id, turns=tuple(turns), images=images, system=system)
