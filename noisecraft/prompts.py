"""Prompt weighting syntax and weighted tokenization into CLIP's 77-token chunks.

The syntax is AUTOMATIC1111's (also read by ComfyUI):

- ``(words)`` multiplies the attention weight of ``words`` by 1.1, ``((words))`` by 1.21, ...
- ``[words]`` divides it by 1.1;
- ``(words:1.3)`` sets the factor to 1.3 (any float, also ``(words:-0.5)`` or ``(w:.8)``);
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal brackets and backslash;
- brackets nest and multiply;
- ``BREAK`` (upper case, a whole word) ends the current 75-token chunk.

One deliberate difference from AUTOMATIC1111: there a ``BREAK`` inside brackets, e.g.
``(a BREAK b)``, has its marker weight scaled and is then tokenized as the word "break"; here it
still breaks the chunk.

Unbalanced brackets are read leniently, as AUTOMATIC1111 does: a bracket never closed applies its
factor to everything after it; a closing bracket never opened is literal text; ``(word:1.3``
never closed keeps the default 1.1 for ``word`` and leaves ``:1.3`` as text.

Long prompts: as in AUTOMATIC1111, token ids are laid out in chunks of 75, each wrapped in
``[BOS] ... [EOS]`` and padded to 77; the text encoder encodes each chunk separately and the
contexts are concatenated along the token axis. When a chunk fills up and a comma lies within the
last ``comma_backtrack`` (20) tokens, the words after that comma move to the next chunk, so a
phrase is not cut in half.

Textual-inversion embeddings: with ``embeddings`` (a function splitting span text into text and
embedding vectors: :meth:`noisecraft.embeddings.PromptEmbeddings.splitter`) an embedding named in
the prompt takes one position per vector; its ids there are placeholders (the BOS id) and the
chunk's ``vectors`` carry what the text encoder puts in place of those token embeddings (the
AUTOMATIC1111 / ComfyUI way), with the span's weight like any token.  An embedding that does not
fit in the rest of a chunk starts the next one (as in AUTOMATIC1111).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

Vector = tuple[float, ...]
EmbeddingSplitter = Callable[[str], list["str | tuple[Vector, ...]"]]
"""Text -> its pieces in order: plain text, or the vectors of an embedding named there."""

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
CHUNK_LENGTH = 75  # prompt tokens per chunk; BOS and EOS make 77
COMMA_BACKTRACK = 20

_ATTENTION = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\    # escapes (a lone backslash is dropped)
    | \( | \[                                  # openers
    | :\s*([+-]?[.\d]+)\s*\)                   # explicit weight closing a round bracket
    | \) | \]                                  # closers
    | [^\\()\[\]:]+                            # plain text
    | :                                        # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class Span(NamedTuple):
    """A run of prompt text and its attention weight."""

    text: str
    weight: float


BREAK = Span("BREAK", -1.0)
"""Marker span that ends the current chunk (the parser's output for the word ``BREAK``)."""


def parse_prompt_weights(prompt: str) -> list[Span]:
    """Split ``prompt`` into spans of text with their attention weights (AUTOMATIC1111 syntax).

    Adjacent spans with equal weight are merged; an empty prompt gives ``[Span("", 1.0)]``;
    ``BREAK`` gives the ``BREAK`` marker span.

    >>> [tuple(s) for s in parse_prompt_weights("an (important) word")]
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    spans: list[list] = []  # [text, weight, is_break]; weights multiplied in place
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for span in spans[start:]:
            if not span[2]:
                span[1] *= factor

    for match in _ATTENTION.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            spans.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(spans))
        elif token == "[":
            square_open.append(len(spans))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_FACTOR)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    spans.append([*BREAK, True])
                spans.append([part, 1.0, False])
    for start in round_open:
        scale_from(start, ROUND_FACTOR)
    for start in square_open:
        scale_from(start, SQUARE_FACTOR)
    return _merge_equal(spans) if spans else [Span("", 1.0)]


def _merge_equal(spans: list[list]) -> list[Span]:
    """Join neighbours of equal weight; break markers never merge."""
    merged = [spans[0]]
    for span in spans[1:]:
        prev = merged[-1]
        if not span[2] and not prev[2] and span[1] == prev[1]:
            merged[-1] = [prev[0] + span[0], prev[1], False]
        else:
            merged.append(span)
    return [BREAK if is_break else Span(t, w) for t, w, is_break in merged]


class Tokenizer(Protocol):
    """What chunking needs from a tokenizer (``noisecraft.models.tokenizer.CLIPTokenizer``)."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class TokenChunk:
    """One encoder input: ``ids`` (``[BOS] tokens [EOS] pad...``), a weight per position, and
    ``vectors``: ``(position, vector)`` pairs replacing the token embedding at those positions
    (textual-inversion embeddings)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    vectors: tuple[tuple[int, Vector], ...] = ()

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.weights):
            raise ValueError(
                f"TokenChunk has {len(self.ids)} ids but {len(self.weights)} weights; "
                "there must be one weight per id"
            )


def _wrap(tokens: list[int], weights: list[float], tokenizer: Tokenizer,
          vectors: Sequence[Vector | None] = ()) -> TokenChunk:
    pad = CHUNK_LENGTH - len(tokens)
    ids = [tokenizer.bos_id, *tokens, tokenizer.eos_id] + [tokenizer.pad_id] * pad
    placed = tuple((i + 1, v) for i, v in enumerate(vectors) if v is not None)
    return TokenChunk(tuple(ids), (1.0, *weights, *([1.0] * (pad + 1))), placed)


def _items(spans: Sequence[Span], tokenizer: Tokenizer, embeddings: EmbeddingSplitter | None):
    """Per span: ``(token id, vector or None, group length)`` items; an embedding's first item
    carries its vector count as group length (0 elsewhere), so it can be kept in one chunk."""
    pieces = [[s.text] if embeddings is None or s == BREAK else embeddings(s.text) for s in spans]
    texts = [p for ps in pieces for p in ps if isinstance(p, str)]
    ids = iter(tokenizer.encode_batch(texts))
    out = []
    for ps in pieces:
        items = []
        for piece in ps:
            if isinstance(piece, str):
                items += [(t, None, 0) for t in next(ids)]
            else:
                items += [(tokenizer.bos_id, v, len(piece) if i == 0 else 0)
                          for i, v in enumerate(piece)]
        out.append(items)
    return out


def empty_chunk(tokenizer: Tokenizer) -> TokenChunk:
    """The chunk of the empty prompt: ``[BOS, EOS, pad, ...]``, all weights 1."""
    return _wrap([], [], tokenizer)


def tokenize_spans(
    spans: Sequence[Span], tokenizer: Tokenizer, *, comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingSplitter | None = None,
) -> list[TokenChunk]:
    """Lay weighted spans out in 77-token chunks (see the module docstring).

    Each span is tokenized on its own (as AUTOMATIC1111 does), so a bracket inside a word splits
    it. ``comma_backtrack=0`` disables moving the words after a late comma to the next chunk.
    ``embeddings`` finds textual-inversion embeddings in span text (module docstring).
    """
    comma_id = tokenizer.encode(",")[0]
    chunks: list[TokenChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    vectors: list[Vector | None] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal tokens, weights, vectors, last_comma
        chunks.append(_wrap(tokens, weights, tokenizer, vectors))
        tokens, weights, vectors, last_comma = [], [], [], -1

    for span, items in zip(spans, _items(spans, tokenizer, embeddings), strict=True):
        if span == BREAK:
            close_chunk()
            continue
        for token, vector, group in items:
            if token == comma_id and vector is None:
                last_comma = len(tokens)
            elif (
                comma_backtrack > 0
                and len(tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(tokens) - last_comma <= comma_backtrack
            ):
                keep = last_comma + 1
                moved = tokens[keep:], weights[keep:], vectors[keep:]
                tokens, weights, vectors = tokens[:keep], weights[:keep], vectors[:keep]
                close_chunk()
                tokens, weights, vectors = (list(m) for m in moved)
            if len(tokens) == CHUNK_LENGTH or (
                tokens and len(tokens) + group > CHUNK_LENGTH >= group
            ):
                close_chunk()
            tokens.append(token)
            weights.append(span.weight)
            vectors.append(vector)
    if tokens or not chunks:
        close_chunk()
    return chunks


def tokenize_weighted(
    prompt: str, tokenizer: Tokenizer, *, comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingSplitter | None = None,
) -> list[TokenChunk]:
    """Parse the weighting syntax of ``prompt`` and lay it out in 77-token chunks."""
    return tokenize_spans(parse_prompt_weights(prompt), tokenizer,
                          comma_backtrack=comma_backtrack, embeddings=embeddings)


def pad_chunks(chunks: Sequence[TokenChunk], n: int, tokenizer: Tokenizer) -> list[TokenChunk]:
    """``chunks`` followed by empty-prompt chunks up to ``n`` chunks (AUTOMATIC1111's way of
    giving a positive and a negative prompt the same length for batched guidance)."""
    if n < len(chunks):
        raise ValueError(f"cannot pad {len(chunks)} chunks to {n}; n must be >= {len(chunks)}")
    return [*chunks, *[empty_chunk(tokenizer)] * (n - len(chunks))]
