"""Shared by the interop tests: a small byte-level BPE tokenizer.json trained here."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "import os\nprint(os.getcwd())\n", "for i in range(10):\n    total += i * i\n"]


def byte_level_bpe(path, vocab_size=300, text=TEXT):
    """Writes a byte-level BPE tokenizer.json (specials <pad>, <s>, </s> = 0, 1, 2) at `path`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(text) * 20, trainer)
    tok.save(str(path))


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """byte_level_bpe(path, vocab_size=300, text=TEXT)."""
    return byte_level_bpe
