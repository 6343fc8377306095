"""The CLIP byte-pair-encoding tokenizer, built offline from the vocabulary file shipped here.

Every Stable Diffusion text encoder (CLIP ViT-L/14 for SD1 and SDXL, OpenCLIP ViT-H/14 for SD2,
OpenCLIP ViT-bigG/14 for SDXL) uses the same 49,408-token vocabulary of OpenAI's CLIP
(Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

How it is built: ``data/bpe_simple_vocab_16e6.txt.gz`` holds CLIP's BPE merges. The vocabulary is
derived from them exactly as CLIP does: the 256 byte symbols, the same 256 with the end-of-word
marker ``</w>``, one token per merge (the first 48,894 merges), then ``<|startoftext|>`` (49406)
and ``<|endoftext|>`` (49407). That vocabulary and merge list feed a ``tokenizers.Tokenizer``
(the Rust BPE of the ``tokenizers`` library) configured the way CLIP tokenizes:

- normalise: Unicode NFC, every whitespace run becomes one space, lowercase;
- pre-tokenise with CLIP's regex (``'s 't 're 've 'm 'll 'd``, letter runs, single digits,
  runs of other non-space symbols); whitespace is dropped;
- map bytes to GPT-2's printable byte alphabet and apply BPE with ``</w>`` ending each word.

We use ``tokenizers`` directly rather than a ``transformers`` tokenizer class because that class
changed between transformers 4 and 5 (``CLIPTokenizerFast`` was folded into ``CLIPTokenizer``);
the ``tokenizers`` objects used here are stable, and the test suite checks that the ids equal
those of ``transformers.CLIPTokenizer`` built from the same vocabulary. Like transformers'
tokenizer (and so like diffusers, ComfyUI and AUTOMATIC1111's SD1 path) it does not run
``ftfy`` or HTML-unescape the text, which OpenAI's reference tokenizer does: ``&amp;`` stays
three tokens.

Padding differs between families: OpenAI CLIP (SD1, SDXL's CLIP-L) pads with the end token
49407, OpenCLIP (SD2, SDXL's bigG) pads with 0. ``pad_id`` is a constructor argument;
``with_pad`` gives a second tokenizer sharing the (immutable) BPE model.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894 merges are used by CLIP
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"

# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py), applied after lowercasing.
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)


def byte_alphabet() -> dict[int, str]:
    """Byte value -> the printable character GPT-2/CLIP BPE uses for it, in vocabulary order.

    Bytes that are already printable, non-space Latin-1 characters stand for themselves and come
    first (in byte order); the remaining 68 bytes get the code points 256, 257, ... in byte
    order. Vocabulary ids 0..255 follow this dict's order, not byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in set(printable)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def read_merges(path: str | Path | None = None) -> list[tuple[str, str]]:
    """The first 48,894 merges of CLIP's BPE file (the ones CLIP's vocabulary is made of)."""
    if path is None:
        with resources.files("noisecraft.models").joinpath("data", VOCAB_FILE).open("rb") as f:
            raw = f.read()
    else:
        raw = Path(path).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != N_MERGES or bad:
        raise ValueError(
            f"{path or VOCAB_FILE}: expected {N_MERGES} merge lines of two symbols after the "
            f"header, got {len(merges)} lines ({len(bad)} malformed, first at line {bad[:1]}); "
            "is it CLIP's bpe_simple_vocab_16e6.txt.gz?"
        )
    return merges  # type: ignore[return-value]


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id table: bytes, bytes + ``</w>``, merged symbols, BOS, EOS."""
    alphabet = list(byte_alphabet().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def build_backend(path: str | Path | None = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` reproducing CLIP's BPE (no BOS/EOS added, no truncation)."""
    merges = read_merges(path)
    bpe = BPE(
        vocab=build_vocab(merges),
        merges=list(merges),
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token=EOS_TOKEN,
    )
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(BOS_TOKEN, normalized=True), AddedToken(EOS_TOKEN, normalized=True)]
    )
    return backend


class CLIPTokenizer:
    """CLIP's tokenizer: text -> token ids (49,408-entry vocabulary, 77 positions).

    Args:
        pad_id: id used after the end token to fill 77 positions: 49407 (OpenAI CLIP, SD1 and
            SDXL's CLIP-L) or 0 (OpenCLIP, SD2 and SDXL's bigG).
        vocab_path: another copy of ``bpe_simple_vocab_16e6.txt.gz``; default: the packaged one.

    Building reads and parses the 1.3 MB merges file (a fraction of a second); build one per
    model and reuse it (``with_pad`` shares the parsed BPE).
    """

    bos_id = BOS_ID
    eos_id = EOS_ID
    vocab_size = VOCAB_SIZE
    max_length = MAX_LENGTH

    def __init__(
        self, *, pad_id: int = EOS_ID, vocab_path: str | Path | None = None,
        _backend: Tokenizer | None = None,
    ) -> None:
        if not 0 <= pad_id < VOCAB_SIZE:
            raise ValueError(f"pad_id={pad_id} is not a token id; allowed: 0..{VOCAB_SIZE - 1}")
        self.pad_id = pad_id
        self._backend = _backend if _backend is not None else build_backend(vocab_path)

    def with_pad(self, pad_id: int) -> CLIPTokenizer:
        """The same tokenizer padding with ``pad_id`` (shares the BPE model, no re-parsing)."""
        if pad_id == self.pad_id:
            return self
        return CLIPTokenizer(pad_id=pad_id, _backend=self._backend)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, untruncated."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for several texts at once."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, text: str, *, length: int = MAX_LENGTH) -> list[int]:
        """``[BOS] + ids + [EOS]`` padded with ``pad_id`` to ``length`` (77); ids that do not fit
        are cut, keeping the end token last, as CLIP does. For longer prompts with weights use
        ``noisecraft.prompts.tokenize_weighted`` (75-token chunks)."""
        if length < 2:
            raise ValueError(f"length={length} leaves no room for BOS and EOS; allowed: >= 2")
        ids = [BOS_ID, *self.encode(text)[: length - 2], EOS_ID]
        return ids + [self.pad_id] * (length - len(ids))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (BOS, EOS and padding skipped; word ends become spaces)."""
        ids = [i for i in ids if i not in (BOS_ID, EOS_ID)]
        if self.pad_id not in (BOS_ID, EOS_ID):
            ids = [i for i in ids if i != self.pad_id]
        to_byte = {c: b for b, c in byte_alphabet().items()}
        raw = bytearray()
        for i in ids:
            for ch in self._backend.id_to_token(int(i)).replace("</w>", " "):
                raw.extend([to_byte[ch]] if ch in to_byte else ch.encode("utf-8"))
        return raw.decode("utf-8", errors="replace").strip()

    def __repr__(self) -> str:
        return f"CLIPTokenizer(pad_id={self.pad_id})"

