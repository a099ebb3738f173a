"""Show what the loss sees: every token with its segment and weight.

Masking bugs are silent (a model trains fine on the wrong tokens), so the
prepared data must be easy to look at. `inspect_rows` turns encoded rows into
plain dicts; `to_json` keeps every token (for diffing and tools), `to_html`
writes a standalone page colored by segment with the weight on hover, and
`to_rich_text` prints the same in a terminal. The two displays collapse each
image block into one item such as ``<image>×576``. Rows scored for visual relevance
(`data.relevance`) carry each token's relevance too: a field of every token in JSON, a
heat bar over each token in HTML (red: the image helps predict it, blue: it hurts), and
`l2t_visual`'s weights are λ_I · g(relevance) on instruction tokens.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable

import numpy as np

from workloads.segment_codes import VISUAL_MODES, Segment, segment_weight_table
from workloads.segments import EncodedRow

# One color per segment, shared by the HTML page and the terminal.
SEGMENT_COLORS: dict[Segment, str] = {
    Segment.PAD: "#bbbbbb",
    Segment.SYSTEM: "#9e9e9e",
    Segment.ROLE: "#8d6e63",
    Segment.IMAGE: "#ab47bc",
    Segment.INSTRUCTION: "#1e88e5",
    Segment.TASK_TEMPLATE: "#fb8c00",
    Segment.RESPONSE: "#43a047",
    Segment.END_OF_TURN: "#00897b",
}


def token_texts(tokenizer, ids: Iterable[int]) -> list[str]:
    """Readable text of each token on its own, keeping a Metaspace word's leading space."""
    ids = [int(i) for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    texts = []
    for token_id, piece in zip(ids, pieces):
        text = tokenizer.decode([token_id])
        if piece.startswith("▁") and not text.startswith(" "):
            text = " " + text
        texts.append(text)
    return texts


def inspect_rows(
    encoded,
    tokenizer,
    mode: str,
    lambda_instruction: float = 1.0,
    lambda_response: float = 1.0,
    overrides: dict[str, float | None] | None = None,
    *,
    relevance: list | None = None,
    visual=None,
) -> list[dict]:
    """`encoded`: (row_id, EncodedRow) pairs -> [{"id", "tokens": [{"text", "id", "segment", "weight"}]}].

    `overrides`: per-segment weights as `MaskingConfig.weights.model_dump()` (see `segment_weight_table`).
    `relevance`: per row, its tokens' visual relevance (or None), added to each token as "relevance";
    `visual`: `MaskingConfig.visual`, how a visual mode turns it into weights (needed by those modes).
    """
    from workloads.visual_relevance import gains

    table = segment_weight_table(mode, lambda_instruction, lambda_response, overrides)
    rows = []
    for index, (row_id, row) in enumerate(encoded):
        if not isinstance(row, EncodedRow):
            raise TypeError(f"row {row_id!r} is {type(row).__name__}, not an EncodedRow")
        segments = np.asarray(row.segments)
        weights = table[segments.astype(np.int64)]
        scores = None if relevance is None or relevance[index] is None else np.asarray(relevance[index], np.float32)
        if mode in VISUAL_MODES:
            if scores is None or visual is None:
                raise ValueError(f"row {row_id!r}: masking.mode={mode} needs relevance (set data.relevance)")
            weights = weights * gains(segments, scores, visual.transform, visual.temperature, visual.floor)
        texts = token_texts(tokenizer, row.input_ids)
        tokens = [
            {"text": text, "id": int(token_id), "segment": Segment(int(segment)).name.lower(), "weight": float(weight)}
            for text, token_id, segment, weight in zip(texts, row.input_ids, segments, weights)
        ]
        for token, value in zip(tokens, [] if scores is None else scores):
            token["relevance"] = round(float(value), 4)
        rows.append({"id": row_id, "mode": mode, "truncated": bool(row.truncated), "tokens": tokens})
    return rows


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, ensure_ascii=False, indent=1)


def collapsed_tokens(tokens: list[dict]) -> list[dict]:
    """Runs of image tokens with one id become one item whose text is ``<image>×N``."""
    items: list[dict] = []
    for token in tokens:
        previous = items[-1] if items else None
        if (
            token["segment"] == "image"
            and previous is not None
            and previous["segment"] == "image"
            and previous["id"] == token["id"]
        ):
            previous["count"] += 1
            continue
        items.append({**token, "count": 1})
    for item in items:
        if item["count"] > 1:
            item["text"] = f"{item['text']}×{item['count']}"
    return items


def _visible(text: str) -> str:
    """Whitespace made visible for display, line breaks kept."""
    return text.replace("\t", "⇥").replace("\n", "↵\n")


RELEVANCE_HEAT_SCALE = 2.0
"""|relevance| (nats) at which the heat bar is fully saturated."""


def relevance_color(value: float) -> str:
    """The heat bar's color: red for positive relevance (the image helps predict the token), blue for negative,
    its opacity |value| / `RELEVANCE_HEAT_SCALE` (at most 1)."""
    alpha = min(abs(value) / RELEVANCE_HEAT_SCALE, 1.0)
    return f"rgba(229, 57, 53, {alpha:.2f})" if value >= 0 else f"rgba(30, 136, 229, {alpha:.2f})"


def _heat_legend(rows: list[dict]) -> str:
    if not any("relevance" in t for row in rows for t in row["tokens"]):
        return ""
    stops = "".join(
        f'<span class="tok" style="box-shadow: inset 0 3px 0 {relevance_color(v)}">{v:+g}</span> '
        for v in (-RELEVANCE_HEAT_SCALE, -1.0, 0.0, 1.0, RELEVANCE_HEAT_SCALE)
    )
    return (
        f"<br>Visual relevance, log p(x | V) - log p(x | V=∅), as the bar over each token: {stops}"
        "(hover for the value)."
    )


def to_html(rows: list[dict]) -> str:
    legend = "".join(
        f'<span class="tok seg-{segment.name.lower()}">{segment.name.lower()}</span> '
        for segment in Segment
        if segment != Segment.PAD
    )
    styles = "\n".join(
        f".seg-{segment.name.lower()} {{ background: {color}33; border-bottom: 2px solid {color}; }}"
        for segment, color in SEGMENT_COLORS.items()
    )
    bodies = []
    for row in rows:
        spans = []
        for item in collapsed_tokens(row["tokens"]):
            title = f"{item['segment']} · weight {item['weight']:g} · id {item['id']}"
            heat = ""
            if "relevance" in item:
                title += f" · relevance {item['relevance']:+.3f}"
                heat = f' style="box-shadow: inset 0 3px 0 {relevance_color(item["relevance"])}"'
            zero = " zero" if item["weight"] == 0 else ""
            spans.append(
                f'<span class="tok seg-{item["segment"]}{zero}"{heat} title="{html.escape(title)}">'
                f"{html.escape(_visible(item['text']))}</span>"
            )
        trained = sum(1 for t in row["tokens"] if t["weight"] > 0)
        header = (
            f"<h2>{html.escape(str(row['id']))}</h2><p class=meta>mode {html.escape(str(row.get('mode', '')))} · "
            f"{len(row['tokens'])} tokens · {trained} weighted{' · truncated' if row.get('truncated') else ''}</p>"
        )
        bodies.append(f'<section>{header}<pre class="row">{"".join(spans)}</pre></section>')
    heat = _heat_legend(rows)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>l2t token masks</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
pre.row {{ white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.9; }}
.tok {{ padding: 1px 0; margin-right: 1px; border-radius: 2px; }}
.zero {{ opacity: 0.55; }}
.legend .tok {{ padding: 2px 6px; }}
.meta {{ color: #666; }}
{styles}
</style>
</head>
<body>
<h1>Token masks</h1>
<p class="legend">Legend: {legend}<br>Faded tokens have weight 0. Hover a token for its segment and weight.{heat}</p>
{"".join(bodies)}
</body>
</html>
"""


# The terminal's colors: 16-color names, one per segment (hex colors fall to the same few on 16/256-color
# terminals, where system and pad, or response and end_of_turn, looked alike).
TERMINAL_COLORS: dict[Segment, str] = {
    Segment.PAD: "white",
    Segment.SYSTEM: "bright_black",
    Segment.ROLE: "yellow",
    Segment.IMAGE: "magenta",
    Segment.INSTRUCTION: "blue",
    Segment.TASK_TEMPLATE: "bright_red",
    Segment.RESPONSE: "green",
    Segment.END_OF_TURN: "cyan",
}

# Piped (no colors): each span of tokens is marked by its segment's letter; lower case = weight 0.
SEGMENT_LETTERS: dict[Segment, str] = {
    Segment.PAD: "P",
    Segment.SYSTEM: "S",
    Segment.ROLE: "R",
    Segment.IMAGE: "V",
    Segment.INSTRUCTION: "I",
    Segment.TASK_TEMPLATE: "T",
    Segment.RESPONSE: "A",
    Segment.END_OF_TURN: "E",
}


def to_plain_text(rows: list[dict]) -> str:
    """The rows without colors: `[X]` before each span of one segment (legend first), for pipes and files."""
    legend = " ".join(f"{letter}={segment.name.lower()}" for segment, letter in SEGMENT_LETTERS.items())
    lines = [f"legend: {legend} (lower case = weight 0)"]
    for row in rows:
        lines.append(f"\n== {row['id']} ==")
        parts, current = [], None
        for item in collapsed_tokens(row["tokens"]):
            letter = SEGMENT_LETTERS[Segment[item["segment"].upper()]]
            marker = letter if item["weight"] > 0 else letter.lower()
            parts.append(("" if marker == current else f"[{marker}]") + _visible(item["text"]))
            current = marker
        lines.append("".join(parts))
    return "\n".join(lines) + "\n"


def to_rich_text(rows: list[dict]):
    from rich.text import Text

    out = Text()
    out.append("legend: ")
    for segment, color in TERMINAL_COLORS.items():
        if segment != Segment.PAD:
            out.append(segment.name.lower(), style=f"bold {color}")
            out.append(" ")
    out.append("(dim = weight 0)\n")
    for row in rows:
        out.append(f"\n== {row['id']} ==\n", style="bold")
        for item in collapsed_tokens(row["tokens"]):
            color = TERMINAL_COLORS[Segment[item["segment"].upper()]]
            style = color if item["weight"] > 0 else f"dim {color}"
            out.append(_visible(item["text"]), style=f"underline {style}")
        out.append("\n")
    return out
