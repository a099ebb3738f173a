"""Chat templates that remember what every character is.

A conversation is rendered to the exact prompt string a model family expects,
and at the same time cut into contiguous pieces, each with its `Segment`
(system prompt, role marker, image placeholder, instruction, task template,
response, end of turn). Tokenizing the string once with offsets then gives
every token its segment (segments.py); this replaces the LLaVA practice of
tokenizing rounds separately and adding up lengths, which breaks on merges
across round boundaries.

Templates
---------
- ``vicuna_v1``: LLaVA-1.5 (``conv_vicuna_v1``, sep " ", sep2 EOS)::

      <s>SYSTEM USER: instr ASSISTANT: resp</s>USER: instr ASSISTANT: resp</s>

- ``llama3``: LLaVA-Llama-3 headers, ``<|eot_id|>`` closing each message.
- ``qwen2``: ChatML with Qwen2's default system prompt.
- ``phi``: TinyLLaVA's phi template (``conv_phi_v0``): like vicuna_v1 without BOS (same
  system prompt); EOS closes each response.
- ``plain``: LLaVA connector pre-training: BOS, then per round the user
  turn's image placeholders only (its words are dropped, as LLaVA does),
  the response and ``"\\n"``.
- ``tokenizer``: the tokenizer's own jinja ``chat_template``. See
  `render_with_tokenizer_template` for how spans are recovered.

Image placement (`place_images`): ``front`` moves a user turn's ``<image>``
placeholders to its start, as LLaVA's ``preprocess_multimodal`` does before
training; ``as_written`` keeps them where the data puts them; ``auto`` (the
default) is ``front`` for the LLaVA-family templates (vicuna_v1, phi, plain).
`render_prompt_spans` renders the generation prompt (user turn, then the
assistant prefix) that evaluation answers, with the same placement.

An image token with a wrap (`families.IMAGE_WRAPS`: Qwen2-VL's ``<|vision_start|>``
and ``<|vision_end|>`` around ``<|image_pad|>``) is written between the two (ROLE).

BOS/EOS strings come from the tokenizer when one is given (vicuna_v1, phi,
plain), else the literals ``<s>`` / ``</s>``. ``llama3`` and ``qwen2`` use their
own literal markers. The system prompt is the data's (`Conversation.system`)
if present, else the `system_prompt` argument, else the template's default;
an empty string leaves the system prompt out.

Segments (docs/design.md): BOS and the system prompt, with its own header and
closing marker -> SYSTEM; role markers and separators -> ROLE; each image
placeholder -> IMAGE; the human's words -> INSTRUCTION, except sentences found
in `task_templates` (matched after the normalization of task_templates.py)
-> TASK_TEMPLATE; the assistant's words -> RESPONSE; the end-of-turn marker
right after a response (EOS, ``<|im_end|>``, ``<|eot_id|>``; plain's
``"\\n"``) -> END_OF_TURN. The ``"\\n"`` of LLaVA's ``"<image>\\n"`` is the
human's text (INSTRUCTION), as LLaVA stores it in the user turn.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, replace
from itertools import accumulate

from workloads.conversations import IMAGE_PLACEHOLDER, USER, Conversation, ConversationError, Turn
from workloads.families import IMAGE_WRAPS
from workloads.segment_codes import Segment
from workloads.task_templates import normalize_sentence, sentence_spans, split_sentences

TEMPLATES = ("vicuna_v1", "llama3", "qwen2", "phi", "plain", "tokenizer")
IMAGE_PLACEMENTS = ("auto", "front", "as_written")  # as config.IMAGE_PLACEMENTS
LLAVA_FAMILY_TEMPLATES = frozenset({"vicuna_v1", "phi", "plain"})  # image_placement "auto" -> "front"
_FRONT = IMAGE_PLACEHOLDER + "\n"

# LLaVA-1.5's `conv_vicuna_v1` (train `--version v1`, eval `--conv-mode vicuna_v1`); not the older
# `conv_llava_v1`, whose "curious human ... the human's questions" llava-1.5 checkpoints never saw.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PHI_SYSTEM = VICUNA_SYSTEM  # TinyLLaVA's conv_phi_v0 / PhiTemplate: the same sentence
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
QWEN2_SYSTEM = "You are a helpful assistant."

# End-of-turn markers recognized right after a response in the `tokenizer` template.
KNOWN_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "</s>")

_SYSTEM, _ROLE, _IMAGE = int(Segment.SYSTEM), int(Segment.ROLE), int(Segment.IMAGE)
_INSTRUCTION, _TASK = int(Segment.INSTRUCTION), int(Segment.TASK_TEMPLATE)
_RESPONSE, _END = int(Segment.RESPONSE), int(Segment.END_OF_TURN)


@dataclass(frozen=True)
class Piece:
    start: int  # character span in Rendered.text
    end: int
    segment: Segment


@dataclass
class Rendered:
    text: str
    pieces: list[Piece]  # cover the text contiguously, in order

    def piece_texts(self) -> list[tuple[Segment, str]]:
        return [(p.segment, self.text[p.start : p.end]) for p in self.pieces]


@dataclass(frozen=True)
class RenderContext:
    """Everything `render_spans` needs besides the conversation, resolved once per batch.

    `image_placement` holds the resolved placement (`front` or `as_written`); ``auto`` given
    here is resolved against `template` (see `resolve_image_placement`)."""

    template: str
    tokenizer: object = None
    task_set: frozenset[str] = frozenset()
    image_token: str = IMAGE_PLACEHOLDER
    system_prompt: str | None = None
    bos: str = "<s>"
    eos: str = "</s>"
    image_placement: str = "auto"
    image_wrap: tuple[str, str] = ("", "")  # text before and after each image token (ROLE)

    def __post_init__(self):
        object.__setattr__(self, "image_placement", resolve_image_placement(self.template, self.image_placement))

    @classmethod
    def create(
        cls,
        template: str,
        tokenizer=None,
        task_templates: Collection[str] = (),
        image_token: str = IMAGE_PLACEHOLDER,
        system_prompt: str | None = None,
        image_placement: str = "auto",
    ) -> RenderContext:
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")
        bos = getattr(tokenizer, "bos_token", None) or "<s>"
        eos = getattr(tokenizer, "eos_token", None) or "</s>"
        task_set = task_template_set(task_templates)
        wrap = IMAGE_WRAPS.get(image_token, ("", ""))
        return cls(template, tokenizer, task_set, image_token, system_prompt, bos, eos, image_placement, wrap)


def resolve_image_placement(template: str, placement: str) -> str:
    """`front` or `as_written`: ``auto`` is `front` for the LLaVA-family templates, else `as_written`."""
    if placement not in IMAGE_PLACEMENTS:
        raise ValueError(f"unknown image placement {placement!r}; expected one of {IMAGE_PLACEMENTS}")
    if placement == "auto":
        return "front" if template in LLAVA_FAMILY_TEMPLATES else "as_written"
    return placement


def place_images(text: str, placement: str) -> str:
    """A user turn's text with its image placeholders placed as `placement` (resolved) says.

    ``front`` is LLaVA's `preprocess_multimodal`: a turn that holds ``<image>``
    becomes ``("<image>\\n" + text.replace("<image>", "").strip()).strip()``.
    LLaVA keeps one placeholder; here a turn with k placeholders gets
    ``"<image>\\n" * k`` in front, so multi-image rows keep their image count
    (for k = 1 this is exactly LLaVA's text). ``as_written`` returns `text` as is.
    """
    if placement != "front" or IMAGE_PLACEHOLDER not in text:
        return text
    rest = text[len(_FRONT) :]
    if text.startswith(_FRONT) and rest[:1].strip() and rest[-1:].strip() and IMAGE_PLACEHOLDER not in rest:
        return text  # the common case, "<image>\n" and stripped words: already in place
    return (_FRONT * text.count(IMAGE_PLACEHOLDER) + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()


def _placed(conv: Conversation, placement: str) -> Conversation:
    """`conv` with `place_images` applied to its turns (the same object when nothing moves)."""
    if placement != "front":
        return conv
    if all(IMAGE_PLACEHOLDER not in t.text or place_images(t.text, placement) is t.text for t in conv.turns):
        return conv
    return replace(conv, turns=tuple(Turn(t.role, place_images(t.text, placement)) for t in conv.turns))


def render(
    conv: Conversation,
    template: str,
    *,
    tokenizer=None,
    task_templates: Collection[str] = (),
    image_token: str = IMAGE_PLACEHOLDER,
    system_prompt: str | None = None,
    image_placement: str = "auto",
    generation: bool = False,
) -> Rendered:
    """Render `conv` with `template` (with `generation`, its generation prompt: `render_prompt_spans`);
    raises ConversationError if the template cannot place it."""
    context = RenderContext.create(template, tokenizer, task_templates, image_token, system_prompt, image_placement)
    return _rendered(*(render_prompt_spans if generation else render_spans)(conv, context))


def render_prompt(conv: Conversation, template: str, **options) -> Rendered:
    """The generation prompt of `conv` with its pieces (`render_prompt_spans`); options as for `render`."""
    return render(conv, template, generation=True, **options)


def _rendered(text: str, starts: list[int], segments: list[int]) -> Rendered:
    # The fast form may hold empty parts and same-segment neighbours; the pieces shown merge them.
    pieces: list[Piece] = []
    for start, end, segment in zip(starts, starts[1:] + [len(text)], segments):
        if start == end:
            continue
        if pieces and pieces[-1].segment == segment:
            pieces[-1] = Piece(pieces[-1].start, end, pieces[-1].segment)
        else:
            pieces.append(Piece(start, end, Segment(segment)))
    return Rendered(text, pieces)


def render_spans(conv: Conversation, context: RenderContext) -> tuple[str, list[int], list[int]]:
    """The fast form of `render`: (text, part starts, part segment codes).

    Parts are in order and tile the text, but may be empty or repeat their
    neighbour's segment: fine for the segment lookup, which takes the last
    part starting at or before a character.
    """
    return _render(_placed(conv, context.image_placement), context, generation=False)


def render_prompt_spans(conv: Conversation, context: RenderContext) -> tuple[str, list[int], list[int]]:
    """The generation prompt, in the fast form of `render_spans`: `conv`'s turns up to its last
    user turn (any assistant turn after it is dropped: the prompt never depends on an answer),
    then the template's assistant prefix, which is ROLE (plain has none).

    It is what LLaVA's ``conv.get_prompt()`` gives with an empty assistant message:
    vicuna_v1 and phi end in ``" ASSISTANT:"`` (no trailing space), qwen2 in
    ``"<|im_start|>assistant\\n"``, llama3 in the assistant header and ``"\\n\\n"``;
    plain is BOS and the image placeholders; `tokenizer` is the jinja template
    with ``add_generation_prompt=True``. The text is a prefix of `render_spans`'s
    text for the answered conversation, up to and including the assistant marker
    (vicuna_v1/phi: up to the space after ``"ASSISTANT:"``).
    """
    last_user = max((i for i, t in enumerate(conv.turns) if t.role == USER), default=-1)
    if last_user < 0:
        raise ConversationError("empty_conversation", f"row {conv.id!r}: no user turn to answer")
    if last_user + 1 < len(conv.turns):
        conv = replace(conv, turns=conv.turns[: last_user + 1])
    return _render(_placed(conv, context.image_placement), context, generation=True)


def _render(conv: Conversation, context: RenderContext, generation: bool) -> tuple[str, list[int], list[int]]:
    template = context.template
    system = conv.system if conv.system is not None else context.system_prompt
    parts: list[tuple[str, int]] = []
    add = parts.append
    if template == "vicuna_v1" or template == "phi":
        if template == "vicuna_v1":
            add((context.bos + (VICUNA_SYSTEM if system is None else system), _SYSTEM))
        else:
            add((PHI_SYSTEM if system is None else system, _SYSTEM))
        end_of_turn = (context.eos, _END)
        for i, turn in enumerate(conv.turns):
            if turn.role == USER:
                add((" USER: " if i == 0 else "USER: ", _ROLE))
                _add_user_text(parts, turn.text, context)
            else:
                add((" ASSISTANT: ", _ROLE))
                add((turn.text, _RESPONSE))
                add(end_of_turn)
        if generation:
            add((" ASSISTANT:", _ROLE))
    elif template == "qwen2":
        system = QWEN2_SYSTEM if system is None else system
        if system:
            add(("<|im_start|>system\n" + system + "<|im_end|>\n", _SYSTEM))
        for turn in conv.turns:  # a user turn ends with the assistant header: the generation prompt
            if turn.role == USER:
                add(("<|im_start|>user\n", _ROLE))
                _add_user_text(parts, turn.text, context)
                add(("<|im_end|>\n<|im_start|>assistant\n", _ROLE))
            else:
                add((turn.text, _RESPONSE))
                add(("<|im_end|>", _END))
                add(("\n", _ROLE))
    elif template == "llama3":
        system = LLAMA3_SYSTEM if system is None else system
        add(("<|begin_of_text|>", _SYSTEM))
        if system:
            add(("<|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>", _SYSTEM))
        for turn in conv.turns:  # as in qwen2, a user turn ends with the assistant header
            if turn.role == USER:
                add(("<|start_header_id|>user<|end_header_id|>\n\n", _ROLE))
                _add_user_text(parts, turn.text, context)
                add(("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", _ROLE))
            else:
                add((turn.text, _RESPONSE))
                add(("<|eot_id|>", _END))
    elif template == "plain":
        add((context.bos, _SYSTEM))
        for turn in conv.turns:
            if turn.role == USER:
                for _ in range(turn.text.count(IMAGE_PLACEHOLDER)):
                    _add_image(parts, context)
            else:
                add((turn.text, _RESPONSE))
                add(("\n", _END))
    elif template == "tokenizer":
        return render_with_tokenizer_template(conv, context, system, generation=generation)
    else:
        raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")
    return _join(parts)


def _join(parts: list[tuple[str, int]]) -> tuple[str, list[int], list[int]]:
    texts, segments = zip(*parts)
    starts = list(accumulate(map(len, texts), initial=0))
    starts.pop()
    return "".join(texts), starts, list(segments)


def _add_user_text(parts: list, text: str, context: RenderContext) -> None:
    """A user turn: image placeholders, instruction words, and task-template sentences."""
    if IMAGE_PLACEHOLDER not in text:
        _add_words(parts, text, context.task_set)
        return
    chunks = text.split(IMAGE_PLACEHOLDER)
    _add_words(parts, chunks[0], context.task_set)
    for chunk in chunks[1:]:
        _add_image(parts, context)
        _add_words(parts, chunk, context.task_set)


def _add_image(parts: list, context: RenderContext) -> None:
    opening, closing = context.image_wrap
    if opening:
        parts.append((opening, _ROLE))
    parts.append((context.image_token, _IMAGE))
    if closing:
        parts.append((closing, _ROLE))


def task_template_set(task_templates: Collection[str]) -> frozenset[str]:
    """Normalized task templates that can match: a "template" that the splitter would cut in two never can."""
    normalized = (normalize_sentence(s) for s in task_templates)
    return frozenset(s for s in normalized if s and split_sentences(s) == [s])


# Whitespace other than " " and "\n" (and, tested apart, two spaces in a row): text with any
# of it takes the general path.
# (All Unicode whitespace lies below U+3001.)
_OTHER_WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace() and c not in " \n")
_UNUSUAL_SPACE = re.compile(f"[{re.escape(_OTHER_WHITESPACE)}]")


def _add_words(parts: list, text: str, task_set: frozenset[str]) -> None:
    if not task_set:
        parts.append((text, _INSTRUCTION))
        return
    if "  " in text or _UNUSUAL_SPACE.search(text):
        matches = [(start, end) for start, end, normalized in sentence_spans(text) if normalized in task_set]
    else:
        matches = _find_sentences(text, task_set)
    position = 0
    for start, end in matches:
        parts.append((text[position:start], _INSTRUCTION))
        parts.append((text[start:end], _TASK))
        position = end
    parts.append((text[position:], _INSTRUCTION))


def _find_sentences(text: str, task_set: frozenset[str]) -> list[tuple[int, int]]:
    """`sentence_spans` matches by substring search, for text whose only whitespace is single " " and "\n".

    In such text a sentence's raw characters equal its normalized form, so a
    template occurrence is a match exactly when sentence boundaries
    (task_templates.py) surround it: start of text, a newline, or sentence
    punctuation followed by space on the left; end of text, a newline, or (for
    a template ending in punctuation) a space on the right. The property
    tests check that both paths agree.
    """
    n = len(text)
    matches = []
    for template in task_set:
        start = text.find(template)
        while start >= 0:
            end = start + len(template)
            k = start
            while k > 0 and text[k - 1] == " ":
                k -= 1
            m = end
            while m < n and text[m] == " ":
                m += 1
            left = k == 0 or text[k - 1] == "\n" or (k < start and text[k - 1] in ".?!")
            right = m == n or text[m] == "\n" or (m > end and template[-1] in ".?!")
            if left and right:
                matches.append((start, end))
            start = text.find(template, start + 1)
    matches.sort()
    return matches


# --- the tokenizer's own jinja template ---------------------------------------------------------

_SENTINEL = "\x00L2T{}\x00"
_skeleton_cache: dict[tuple, list[str]] = {}


def render_with_tokenizer_template(
    conv: Conversation, context: RenderContext, system: str | None, *, generation: bool = False
) -> tuple[str, list[int], list[int]]:
    """Render with `tokenizer.chat_template` and recover the pieces.

    `conv` is taken as given (image placement is `render_spans`'s job). With
    `generation`, the template is rendered with ``add_generation_prompt=True``
    and the assistant prefix it appends after the last (user) turn is ROLE.

    The template is rendered once per conversation shape (roles, system or
    not) with unique sentinel strings as message contents; the text between
    sentinels is the template's own (markers, separators, any default system
    prompt). The real contents are put in place of the sentinels and the
    result must equal the template's real rendering: a template that trims
    contents is retried with trimmed contents, anything else that alters them
    is reported as ``template_mismatch`` rather than guessed at.

    Labels: everything before the first content, and a system message's
    content, is SYSTEM; text between contents is ROLE, except that an
    end-of-turn marker (the tokenizer's EOS or one of
    `KNOWN_END_OF_TURN_MARKERS`) that starts the text right after a response
    is END_OF_TURN.
    """
    tokenizer = context.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template")
    image_token = context.image_wrap[0] + context.image_token + context.image_wrap[1]
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": t.role, "content": t.text.replace(IMAGE_PLACEHOLDER, image_token)} for t in conv.turns]
    try:
        real = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as error:  # jinja templates raise arbitrary errors for shapes they refuse
        raise ConversationError("template_error", f"row {conv.id!r}: chat template failed: {error}") from error
    gaps = _skeleton(tokenizer, tuple(m["role"] for m in messages), generation)
    for strip in (False, True):
        contents = [m["content"].strip() if strip else m["content"] for m in messages]
        if _interleave(gaps, contents) == real:
            break
    else:
        raise ConversationError(
            "template_mismatch",
            f"row {conv.id!r}: the chat template alters message contents; cannot locate them in the rendered text",
        )
    markers = sorted({m for m in (context.eos, *KNOWN_END_OF_TURN_MARKERS) if m}, key=len, reverse=True)
    parts: list[tuple[str, int]] = [(gaps[0], _SYSTEM)]
    originals = ([system] if system else []) + [t.text for t in conv.turns]
    for message, original, gap in zip(messages, originals, gaps[1:]):
        role = message["role"]
        content = original.strip() if strip else original
        if role == "system":
            parts.append((content, _SYSTEM))
        elif role == USER:
            _add_user_text(parts, content, context)
        else:
            parts.append((content, _RESPONSE))
            marker = next((m for m in markers if gap.startswith(m)), "")
            parts.append((marker, _END))
            gap = gap[len(marker) :]
        parts.append((gap, _ROLE))
    text, starts, segments = _join(parts)
    assert text == real, "pieces do not tile the rendered chat template"
    return text, starts, segments


def _skeleton(tokenizer, roles: tuple[str, ...], generation: bool = False) -> list[str]:
    """The template's text around the message contents, for this sequence of roles."""
    key = (id(tokenizer), tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, roles, generation)
    gaps = _skeleton_cache.get(key)
    if gaps is None:
        sentinels = [_SENTINEL.format(i) for i in range(len(roles))]
        rendered = tokenizer.apply_chat_template(
            [{"role": r, "content": s} for r, s in zip(roles, sentinels)],
            tokenize=False,
            add_generation_prompt=generation,
        )
        gaps = []
        position = 0
        for sentinel in sentinels:
            index = rendered.find(sentinel, position)
            if index < 0:
                raise ValueError("the tokenizer's chat template drops or reorders message contents")
            gaps.append(rendered[position:index])
            position = index + len(sentinel)
        gaps.append(rendered[position:])
        if len(_skeleton_cache) > 4096:
            _skeleton_cache.clear()
        _skeleton_cache[key] = gaps
    return gaps


def _interleave(gaps: list[str], contents: list[str]) -> str:
    parts = [gaps[0]]
    for content, gap in zip(contents, gaps[1:]):
        parts.append(content)
        parts.append(gap)
    return "".join(parts)
