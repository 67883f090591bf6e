"""Text to token ids, as data: the vocabulary travels in the exported contract, so the server maps a
request's strings to ids with this same code and no code of the user's (Hugging Face's tokenizer.json
idea, for the two simplest kinds of vocabulary).

    from t2d import Input, Tokenizer
    chars = Tokenizer.characters("abcdefghijklmnopqrstuvwxyz")   # id 0 padding, 1 unknown, then one per char
    Input("ids", (None,), dtype="int64", max_length=24, tokenizer=chars)

A text longer than the input's max_length is an error, never cut short: a model that saw a truncated
word would answer for another word. Torch-free: the server imports it.
"""

import unicodedata
from dataclasses import dataclass

LEVELS = ("char", "word")
PAD, UNKNOWN = "<pad>", "<unk>"


class TextError(ValueError):
    """A text the tokenizer cannot encode within the input's limits; the message is one line."""


@dataclass(frozen=True)
class Tokenizer:
    """Maps a string to ids: `level` char (each character a token) or word (split on whitespace), each token
    its index in `vocab`, or `unknown`'s index when not in it. Strings are NFC-normalized first (so "é" typed
    as e + accent is the same token), and lowercased when `lower`."""

    vocab: tuple[str, ...]
    """One token per id; by convention id 0 is the padding token and id 1 the unknown one."""
    level: str = "char"
    unknown: int = 1
    """The id of a token not in the vocabulary."""
    lower: bool = False

    def __post_init__(self):
        object.__setattr__(self, "vocab", tuple(str(t) for t in self.vocab))
        if self.level not in LEVELS:
            raise ValueError(f"Tokenizer.level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("Tokenizer.vocab repeats a token")
        if not 0 <= self.unknown < len(self.vocab):
            raise ValueError(f"Tokenizer.unknown must be an id of the vocabulary (0 to {len(self.vocab) - 1})")
        if self.level == "char" and any(len(t) != 1 for t in self.vocab if t not in (PAD, UNKNOWN)):
            raise ValueError("a char Tokenizer's vocab holds single characters (and <pad>, <unk>)")
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(self.vocab)})

    @classmethod
    def characters(cls, chars: str, lower: bool = False) -> "Tokenizer":
        """<pad> (id 0), <unk> (id 1), then each distinct character of `chars` in order."""
        return cls((PAD, UNKNOWN, *dict.fromkeys(unicodedata.normalize("NFC", chars))), "char", 1, lower)

    @classmethod
    def words(cls, words, lower: bool = False) -> "Tokenizer":
        """<pad> (id 0), <unk> (id 1), then each distinct word in order."""
        return cls((PAD, UNKNOWN, *dict.fromkeys(words)), "word", 1, lower)

    @property
    def size(self) -> int:
        return len(self.vocab)

    def tokens(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFC", text)
        if self.lower:
            text = text.lower()
        return list(text) if self.level == "char" else text.split()

    def encode(self, text: str, max_length: int) -> list[int]:
        """The ids of `text`; TextError if it is empty or longer than `max_length` tokens."""
        if not isinstance(text, str):
            raise TextError(f"expected a string, got {type(text).__name__}")
        tokens = self.tokens(text)
        if not tokens:
            raise TextError("the text is empty (no tokens)")
        if len(tokens) > max_length:
            raise TextError(f"the text has {len(tokens)} {'characters' if self.level == 'char' else 'words'}; "
                            f"the model takes at most {max_length}")
        ids = self._ids  # type: ignore[attr-defined]
        return [ids.get(t, self.unknown) for t in tokens]

    def to_dict(self) -> dict:
        return {"level": self.level, "vocab": list(self.vocab), "unknown": self.unknown, "lower": self.lower}

    @classmethod
    def from_dict(cls, d: dict) -> "Tokenizer":
        """The tokenizer a contract describes; ValueError if the description is malformed."""
        if not isinstance(d, dict) or not isinstance(d.get("vocab"), list) or not all(
                isinstance(t, str) for t in d["vocab"]) or type(d.get("unknown")) is not int \
                or type(d.get("lower", False)) is not bool:
            raise ValueError("a tokenizer needs level, vocab (a list of strings), unknown (an id) and lower")
        return cls(tuple(d["vocab"]), d.get("level"), d["unknown"], d.get("lower", False))
