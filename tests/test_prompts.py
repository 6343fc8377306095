"""Prompt weighting syntax (AUTOMATIC1111) and weighted chunking into 77-token chunks."""

import pytest

from noisecraft.models.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer
from noisecraft.prompts import (
    BREAK,
    TokenChunk,
    empty_chunk,
    pad_chunks,
    parse_prompt_weights,
    tokenize_spans,
    tokenize_weighted,
)
from noisecraft.prompts import Span as S

COMMA = 267


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


# The expected values are AUTOMATIC1111's own doctests of parse_prompt_attention.
@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
                ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1),
            ],
        ),
    ],
)
def test_a1111_doctests(prompt, expected):
    got = parse_prompt_weights(prompt)
    assert [s.text for s in got] == [t for t, _ in expected]
    assert [s.weight for s in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("((word))", [("word", 1.21)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.21)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("(word: 0.5 )", [("word", 0.5)]),
        ("(w:.8)", [("w", 0.8)]),
        ("(w:-1)", [("w", -1.0)]),
        ("((a:1.5) b)", [("a", 1.65), (" b", 1.1)]),
        ("[(a:2)]", [("a", 2 / 1.1)]),
        (r"\(x\) \[y\] a\\b", [("(x) [y] a\\b", 1.0)]),
        ("", [("", 1.0)]),
        ("a:b c", [("a:b c", 1.0)]),
    ],
)
def test_weights_and_nesting(prompt, expected):
    got = parse_prompt_weights(prompt)
    assert [s.text for s in got] == [t for t, _ in expected]
    assert [s.weight for s in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a) b", [("a) b", 1.0)]),  # closer never opened: literal
        ("a] b", [("a] b", 1.0)]),
        ("(a [b", [("a ", 1.1), ("b", 1.0)]),  # open brackets apply to the end
        ("(w:1.3", [("w:1.3", 1.1)]),  # explicit weight never closed: text, default factor
        ("a :1.3) b", [("a :1.3) b", 1.0)]),  # weight without an opener: text
        ("(a]", [("a]", 1.1)]),  # mismatched closer is literal
        ("a \\ b", [("a  b", 1.0)]),  # a lone backslash is dropped
    ],
)
def test_unbalanced_is_lenient_like_a1111(prompt, expected):
    got = parse_prompt_weights(prompt)
    assert [(s.text, pytest.approx(s.weight)) for s in got] == expected


def test_break_marker():
    assert parse_prompt_weights("a BREAK b") == [S("a", 1.0), BREAK, S("b", 1.0)]
    # deliberately unlike AUTOMATIC1111, a BREAK inside brackets still breaks
    got = parse_prompt_weights("(a BREAK b)")
    assert got[1] == BREAK and got[0].weight == pytest.approx(1.1)
    # only the upper-case whole word breaks
    assert parse_prompt_weights("break BREAKS") == [S("break BREAKS", 1.0)]
    # a weight of -1 next to a BREAK does not merge with the marker
    assert parse_prompt_weights("(x BREAK:-1)") == [S("x", -1.0), BREAK, S("", -1.0)]


def _content(chunk: TokenChunk, tok):
    """The prompt tokens of a chunk (between BOS and the first EOS)."""
    ids = list(chunk.ids)
    end = ids.index(EOS_ID, 1)
    return ids[1:end], list(chunk.weights[1:end])


def test_short_prompt_one_chunk(tok):
    (chunk,) = tokenize_weighted("a (photo:1.5) of a [cat]", tok)
    assert len(chunk.ids) == len(chunk.weights) == 77
    assert chunk.ids[:7] == (BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID)
    assert chunk.weights[:7] == pytest.approx((1.0, 1.0, 1.5, 1.0, 1.0, 1 / 1.1, 1.0))
    assert set(chunk.ids[7:]) == {EOS_ID} and set(chunk.weights[7:]) == {1.0}


def test_pad_id_from_tokenizer(tok):
    (chunk,) = tokenize_weighted("a cat", tok.with_pad(0))
    assert chunk.ids[:4] == (BOS_ID, 320, 2368, EOS_ID) and set(chunk.ids[4:]) == {0}


def test_long_prompt_chunks_of_75(tok):
    chunks = tokenize_weighted(" ".join(["cat"] * 160), tok)
    assert len(chunks) == 3
    assert [len(_content(c, tok)[0]) for c in chunks] == [75, 75, 10]
    for c in chunks:
        assert c.ids[0] == BOS_ID and len(c.ids) == 77
    assert chunks[0].ids[-1] == EOS_ID
    exactly = tokenize_weighted(" ".join(["cat"] * 75), tok)
    assert len(exactly) == 1 and exactly[0].ids[-2:] == (2368, EOS_ID)
    assert len(tokenize_weighted(" ".join(["cat"] * 76), tok)) == 2


def test_comma_backtrack_moves_last_phrase(tok):
    # 70 words, a comma (71st token), then 10 words: the chunk is full at 75 tokens with the
    # comma 5 tokens back, so the 4 words after the comma move to the next chunk.
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    first, second = tokenize_weighted(prompt, tok)
    ids1, _ = _content(first, tok)
    ids2, _ = _content(second, tok)
    assert len(ids1) == 71 and ids1[-1] == COMMA
    assert ids2 == [1929] * 10  # "dog"
    plain = tokenize_weighted(prompt, tok, comma_backtrack=0)
    assert len(_content(plain[0], tok)[0]) == 75 and len(_content(plain[1], tok)[0]) == 6
    far = " ".join(["cat"] * 40) + ", " + " ".join(["dog"] * 40)  # comma 35 tokens back
    assert len(_content(tokenize_weighted(far, tok)[0], tok)[0]) == 75


def test_break_forces_new_chunk(tok):
    chunks = tokenize_weighted("a cat BREAK (a dog:1.2)", tok)
    assert len(chunks) == 2
    assert _content(chunks[0], tok) == ([320, 2368], [1.0, 1.0])
    ids, weights = _content(chunks[1], tok)
    assert ids == [320, 1929] and weights == pytest.approx([1.2, 1.2])
    assert len(tokenize_weighted("a cat BREAK", tok)) == 1  # nothing after the break
    lead = tokenize_weighted("BREAK a cat", tok)  # A1111: a leading BREAK gives an empty chunk
    assert len(lead) == 2 and lead[0] == empty_chunk(tok)


def test_weights_follow_tokens_across_chunks(tok):
    prompt = " ".join(["cat"] * 74) + " (big dog:1.4)"
    first, second = tokenize_weighted(prompt, tok)
    assert _content(first, tok)[1][-1] == pytest.approx(1.4)  # "big" ends chunk 1
    assert _content(second, tok) == ([1929], [pytest.approx(1.4)])


def test_empty_prompt_and_padding(tok):
    (chunk,) = tokenize_weighted("", tok)
    assert chunk == empty_chunk(tok)
    assert chunk.ids[:2] == (BOS_ID, EOS_ID) and set(chunk.weights) == {1.0}
    padded = pad_chunks([chunk], 3, tok)
    assert len(padded) == 3 and padded[0] is chunk and padded[2] == empty_chunk(tok)
    with pytest.raises(ValueError, match="cannot pad 3 chunks to 2"):
        pad_chunks(padded, 2, tok)
    with pytest.raises(ValueError, match="one weight per id"):
        TokenChunk((1, 2), (1.0,))


def test_spans_tokenized_separately(tok):
    # AUTOMATIC1111 tokenizes each weighted span on its own: a bracket splits a word.
    split = tokenize_spans([S("un", 1.0), S("important", 1.1)], tok)[0]
    whole = tokenize_spans([S("unimportant", 1.0)], tok)[0]
    assert split.ids != whole.ids
