"""The offline CLIP tokenizer: known ids, CLIP's reference BPE, transformers' CLIPTokenizer."""

import gzip

import pytest

from noisecraft.models.tokenizer import (
    BOS_ID,
    EOS_ID,
    N_MERGES,
    VOCAB_SIZE,
    CLIPTokenizer,
    build_vocab,
    byte_alphabet,
    read_merges,
)

TEXTS = [
    "a photo of a cat",
    "A  photo\tof a CAT,\n héllo 123 can't!! we'll",
    "masterpiece, best quality, 1girl, (detailed:1.2) [blurry]",
    "naïve café 東京 🙂 Ǆ ﬁ e\u0301",
    "astronaut riding a horse on mars, 8k, trending on artstation",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def test_known_ids(tok):
    assert tok("a photo of a cat")[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.encode("A Photo  OF a cat ") == [320, 1125, 539, 320, 2368]
    assert tok.encode(",") == [267]
    assert tok.encode("<|startoftext|><|endoftext|>") == [BOS_ID, EOS_ID]


def test_vocab_layout():
    merges = read_merges()
    vocab = build_vocab(merges)
    assert len(merges) == N_MERGES and len(vocab) == VOCAB_SIZE == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    assert len(set(byte_alphabet().values())) == 256


def test_padding_and_truncation(tok):
    ids = tok("a cat")
    assert len(ids) == 77 and ids[:4] == [BOS_ID, 320, 2368, EOS_ID]
    assert set(ids[4:]) == {EOS_ID}
    open_clip = tok.with_pad(0)
    assert open_clip._backend is tok._backend
    ids0 = open_clip("a cat")
    assert ids0[:4] == ids[:4] and set(ids0[4:]) == {0}
    long = tok(" ".join(["cat"] * 100))
    assert len(long) == 77 and long[-1] == EOS_ID and long[-2] == 2368
    assert tok("a cat", length=8) == [BOS_ID, 320, 2368, EOS_ID] + [EOS_ID] * 4


def test_bad_arguments_explain():
    with pytest.raises(ValueError, match="pad_id=49408"):
        CLIPTokenizer(pad_id=49408)
    with pytest.raises(ValueError, match="length=1"):
        CLIPTokenizer()("x", length=1)


def test_decode(tok):
    assert tok.decode(tok("A photo of a CAT, héllo")) == "a photo of a cat , héllo"
    assert tok.with_pad(0).decode(tok.with_pad(0)("dog")) == "dog"


def _reference_clip_bpe(text, merges):
    """OpenAI CLIP's simple_tokenizer algorithm, written out here in plain Python (without ftfy,
    which this environment lacks; HTML unescape is skipped as transformers does)."""
    regex = pytest.importorskip("regex")
    alphabet = byte_alphabet()
    vocab = build_vocab(merges)
    ranks = {m: i for i, m in enumerate(merges)}
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
        r"""[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    import unicodedata

    text = " ".join(unicodedata.normalize("NFC", text).split()).strip().lower()
    ids = []
    for piece in pattern.findall(text):
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[piece])
            continue
        word = [alphabet[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[w] for w in word)
    return ids


@pytest.mark.parametrize("text", TEXTS)
def test_matches_reference_clip_bpe(tok, text):
    assert tok.encode(text) == _reference_clip_bpe(text, read_merges())


def test_matches_transformers_clip_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    merges = read_merges()
    try:
        hf = transformers.CLIPTokenizer(vocab=build_vocab(merges), merges=list(merges))
    except TypeError:
        pytest.skip("this transformers version builds CLIPTokenizer from files only")
    for text in TEXTS:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    assert tok("a photo of a cat") == hf(
        "a photo of a cat", padding="max_length", max_length=77
    )["input_ids"]


def test_vocab_file_is_clip_original():
    from importlib import resources

    raw = resources.files("noisecraft.models").joinpath("data", "bpe_simple_vocab_16e6.txt.gz")
    first = gzip.decompress(raw.read_bytes()).decode("utf-8").split("\n", 2)
    assert first[0] == '"bpe_simple_vocab_16e6.txt#version: 0.2'
    assert first[1] == "i n"


def test_html_entities_are_not_unescaped(tok):
    # As transformers/diffusers/ComfyUI; OpenAI's reference would read "&amp;" as "&".
    assert tok.encode("&amp;") == tok.encode("& amp ;") != tok.encode("&")
