"""Two users' tasks with general signatures, written as a user writes them (imported by tests/test_signatures.py
and named on the command line as signature_tasks:TABULAR and signature_tasks:WORDS).

TABULAR  numeric features plus a categorical id into an nn.Embedding; two outputs, the target and an embedding.
WORDS    a word's letters (text, tokenized per character) through a small Transformer encoder with a padding mask;
         which of three made-up alphabets the word is from, and the pooled encoding as a second output.
"""

from dataclasses import dataclass

import torch
from torch import nn

from t2d import Input, Model, Output, Splits, Task, Tokenizer

# --- TABULAR --------------------------------------------------------------------------------------------------


def tabular_data(opts) -> Splits:
    g = torch.Generator().manual_seed(0)

    def draw(n):
        numbers = torch.rand(n, 3, generator=g) * torch.tensor([10.0, 1.0, 100.0])
        category = torch.randint(0, 5, (n, 1), generator=g)
        y = numbers[:, :1] * (1 + category.float()) + numbers[:, 2:] / 50
        return {"numbers": numbers, "category": category}, y

    return Splits(train=draw(300), test=draw(80))


@dataclass
class TabularConfig:
    width: int = 16


class TabularNet(nn.Module):
    def __init__(self, cfg: TabularConfig):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.body = nn.Sequential(nn.Linear(3 + 4, cfg.width), nn.ReLU())
        self.head = nn.Linear(cfg.width, 1)
        self.project = nn.Linear(cfg.width, 4)

    def forward(self, numbers, category):  # (B, 3) float, (B, 1) int64 -> (B, 1), (B, 4)
        h = self.body(torch.cat([numbers, self.embed(category[:, 0])], 1))
        return self.head(h), self.project(h)


TABULAR = Task(
    name="tabular", kind="regression",
    inputs=(Input("numbers", (3,)), Input("category", (1,), dtype="int64", range=(0, 4))),
    outputs=(Output("y", 1), Output("embedding", 4)), target="y",
    data=tabular_data, models={"net": Model(TabularConfig, lambda cfg, task: TabularNet(cfg))},
    defaults={"run": {"epochs": 4}, "data": {"batch_size": 32, "val_size": 40}, "optim": {"lr": 0.01}})

# --- WORDS ----------------------------------------------------------------------------------------------------

ALPHABETS = ("abcdefg", "hijklmn", "opqrstu")
CHARS = Tokenizer.characters("".join(ALPHABETS) + "vwxyz")
MAX_LENGTH = 12


def words(n: int, g: torch.Generator) -> tuple[list[str], torch.Tensor]:
    labels = torch.randint(0, 3, (n,), generator=g)
    out = []
    for label in labels.tolist():
        size = int(torch.randint(1, 9, (1,), generator=g))
        letters = torch.randint(0, 7, (size,), generator=g).tolist()
        out.append("".join(ALPHABETS[label][i] for i in letters))
    return out, labels


def words_data(opts) -> Splits:
    g = torch.Generator().manual_seed(1)
    train, test = words(240, g), words(60, g)
    return Splits(train=({"ids": train[0]}, train[1]), test=({"ids": test[0]}, test[1]))


@dataclass
class EncoderConfig:
    width: int = 16
    heads: int = 2


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.width, padding_idx=0)
        self.position = nn.Parameter(torch.randn(MAX_LENGTH, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 2 * cfg.width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.classify = nn.Linear(cfg.width, 3)

    def forward(self, ids, padding):  # (B, L) int64, (B, L) bool: True at padding -> (B, 3), (B, width)
        h = self.encoder(self.embed(ids) + self.position[:ids.shape[1]], src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).float()
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.classify(pooled), pooled


WORDS = Task(
    name="words", kind="classification",
    inputs=(Input("ids", (None,), dtype="int64", max_length=MAX_LENGTH, tokenizer=CHARS),
            Input("padding", (None,), dtype="bool", padding_mask_of="ids")),
    outputs=(Output("logits", 3), Output("pooled", 16)), classes=("first", "second", "third"),
    data=words_data, models={"encoder": Model(EncoderConfig, lambda cfg, task: Encoder(cfg, CHARS.size))},
    defaults={"run": {"epochs": 6}, "data": {"batch_size": 32, "val_size": 40}, "optim": {"lr": 0.01}})
