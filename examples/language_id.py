"""Which language a word is from, on real words offline: seven of Debian's word lists, and a small Transformer
encoder over the word's characters (ids and a padding mask in, the languages' logits and probabilities out).

    apt-get install wamerican wfrench wngerman wspanish witalian wportuguese wdutch    # .ci/run does
    python -m train --task examples.language_id:TASK --out runs/language_id
    python -m export --task examples.language_id:TASK --checkpoint runs/language_id/best.pt
    bentoml serve     # then, text in, as the server tokenizes it with the vocabulary in the contract:
    curl -s -X POST 127.0.0.1:3000/v2/models/language-id/infer -H 'Content-Type: application/json' \\
        -d '{"inputs": [{"name": "ids", "shape": [1], "datatype": "BYTES", "data": ["wunderbar"]}],
             "outputs": [{"name": "probabilities"}]}'

The words: each list lower-cased (Unicode NFC), letters only, at most MAX_LENGTH characters; a word found in
more than one list is dropped (its label would be a coin toss), and every language keeps the same number of
words (`--data.size` per language, or as many as the smallest list has left), drawn with a fixed seed, so the
split is the same for every run: 80% training, 10% validation (settings were chosen on it:
bench/language_id.py), 10% test. `--data.dir` names another folder of the same files.
"""

import itertools
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from t2d import DataError, DataOptions, Input, Model, Output, Splits, Task, Tokenizer

LISTS = {"english": "american-english", "french": "french", "german": "ngerman", "spanish": "spanish",
         "italian": "italian", "portuguese": "portuguese", "dutch": "dutch"}
PACKAGES = "wamerican wfrench wngerman wspanish witalian wportuguese wdutch"
FOLDER = "/usr/share/dict"
MAX_LENGTH = 24
SPLIT_SEED = 0  # the words drawn and their split: fixed, whatever the run's seed
# The letters of the seven languages; any other character is <unk>. The vocabulary is data: it travels in the
# exported contract, and the server tokenizes requests with it.
LETTERS = "abcdefghijklmnopqrstuvwxyzßàáâãäåæçèéêëìíîïñòóôõöøùúûüýÿœ"


def read_lists(folder: str) -> dict[str, dict[str, None]]:
    """Each language's words (the keys, in the list's own order): lower-cased, NFC, letters only, at most MAX_LENGTH
    characters."""
    missing = [name for name in LISTS.values() if not (Path(folder) / name).is_file()]
    if missing:
        raise DataError(f"no word list {', '.join(missing)} in {folder}: apt-get install {PACKAGES} "
                        f"(or pass --data.dir FOLDER)")
    words = {}
    for language, name in LISTS.items():
        # The whole file at once: NFC and lower-casing per line give the same words, and every train, export and
        # test run reads 1.8 million lines here.
        text = unicodedata.normalize("NFC", (Path(folder) / name).read_text(encoding="utf-8")).lower()
        words[language] = dict.fromkeys(w for w in text.split() if w.isalpha() and len(w) <= MAX_LENGTH)
    return words


def labelled_words(folder: str, per_language: int) -> tuple[list[str], list[int]]:
    """The same number of unambiguous words per language, shuffled with SPLIT_SEED."""
    words = read_lists(folder)
    seen, shared = set(), set()
    for found in words.values():
        shared |= seen.intersection(found)
        seen |= found.keys()
    # Sorted, so that the draw does not depend on the lists' order; the lists come nearly sorted, which sorts fast.
    unique = {lang: sorted(itertools.filterfalse(shared.__contains__, found)) for lang, found in words.items()}
    n = min(per_language, *(len(found) for found in unique.values()))
    g = torch.Generator().manual_seed(SPLIT_SEED)
    texts, labels = [], []
    for label, found in enumerate(unique.values()):
        pick = torch.randperm(len(found), generator=g)[:n].tolist()
        texts += [found[i] for i in pick]
        labels += [label] * n
    order = torch.randperm(len(texts), generator=g).tolist()
    return [texts[i] for i in order], [labels[i] for i in order]


def data(opts: DataOptions) -> Splits:
    texts, labels = labelled_words(opts.dir or FOLDER, opts.size)
    y = torch.tensor(labels)
    n_test = n_val = len(texts) // 10

    def part(a: int, b: int):
        return {"ids": texts[a:b]}, y[a:b]

    return Splits(train=part(n_test + n_val, len(texts)), val=part(n_test, n_test + n_val), test=part(0, n_test))


@dataclass
class EncoderConfig:
    width: int = 192
    """Embedding and model width."""
    convs: int = 2
    """Convolutions (kernel 3) over the characters before the encoder: each sees one more neighbour on each side,
    as character n-grams do; 0 for none."""
    layers: int = 2
    heads: int = 4
    feedforward: int = 512
    dropout: float = 0.2
    char_dropout: float = 0.0
    """While training, the share of a word's characters replaced by <unk> (a regularizer: no single letter decides);
    never at evaluation or in the exported graph."""


class WordEncoder(nn.Module):
    """Characters -> embeddings -> convolutions over neighbouring characters (padding kept at zero) + learned
    positions -> Transformer encoder (padding masked) -> the mean and the max over the real characters -> the
    languages' logits, and their softmax."""

    def __init__(self, cfg: EncoderConfig, vocab: int, classes: int):
        super().__init__()
        self.char_dropout = cfg.char_dropout
        self.embed = nn.Embedding(vocab, cfg.width, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.width, cfg.width, 3, padding=1) for _ in range(cfg.convs))
        self.position = nn.Parameter(torch.randn(MAX_LENGTH, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, cfg.feedforward, cfg.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.classify = nn.Linear(2 * cfg.width, classes)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor):
        # (B, L) int64 ids, (B, L) bool, True at padding -> (B, languages) logits, (B, languages) probabilities
        keep = (~padding).unsqueeze(-1).to(self.position.dtype)  # (B, L, 1)
        if self.training and self.char_dropout > 0:
            hidden = (torch.rand(ids.shape, device=ids.device) < self.char_dropout) & ~padding
            ids = ids.masked_fill(hidden, CHARACTERS.unknown)
        h = self.embed(ids)  # (B, L, width)
        for conv in self.convs:  # (B, width, L): a character and its neighbours; padding stays zero
            h = torch.relu(conv(h.transpose(1, 2))).transpose(1, 2) * keep
        h = self.encoder(h + self.position[:ids.shape[1]], src_key_padding_mask=padding)
        mean = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        top = h.masked_fill(padding.unsqueeze(-1), float("-inf")).amax(1)
        logits = self.classify(torch.cat([mean, top], 1))
        return logits, logits.softmax(-1)


CHARACTERS = Tokenizer.characters(LETTERS)

TASK = Task(
    name="language-id",
    kind="classification",
    inputs=(Input("ids", (None,), dtype="int64", max_length=MAX_LENGTH, tokenizer=CHARACTERS,
                  description="a word, one id per character (send the text itself as BYTES)"),
            Input("padding", (None,), dtype="bool", padding_mask_of="ids",
                  description="True past the word's end; made by the server for text")),
    outputs=(Output("logits", len(LISTS)), Output("probabilities", len(LISTS), description="softmax of the logits")),
    classes=tuple(LISTS),
    data=data,
    models={"transformer": Model(EncoderConfig, lambda cfg, task: WordEncoder(cfg, CHARACTERS.size, len(LISTS)))},
    # Chosen on the validation split (bench/language_id.py; BENCHMARKS.md has the runs, and the variants tried).
    defaults={"run": {"epochs": 9}, "data": {"size": 20000, "batch_size": 256, "eval_batch_size": 1024,
                                              "group_by_length": True},
              "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.05, "ema": 0.999},
              "sched": {"name": "onecycle"},
              "stop": {"monitor": "accuracy", "keep": "last"}},
    description="the language of a word (seven of Debian's word lists)",
)
