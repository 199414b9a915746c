"""Shared by the interop tests: a small byte-level BPE tokenizer.json trained here, and tiny
transformers models with random weights (for the tests that need transformers and torch)."""
import jax
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparsejax.interop.import_hf import abstract_params, unflatten
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.parallel.mesh import make_mesh
from sparsejax.train.commands import parse_workdir_config
from sparsejax.train.warm_start import restore_pretrained_state

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


def random_hf_model(config_cls, model_cls, directory, config, **save_kw):
    """A transformers model of `config_cls(**config)` in float32 with random weights (norm
    scales near 1, everything else N(0, 0.2)), saved to `directory`. transformers and torch are
    imported by the tests that call it (skipped without them)."""
    import torch
    torch.manual_seed(0)
    model = model_cls(config_cls(**config)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    model.save_pretrained(directory, **save_kw)
    return model


@pytest.fixture(scope="session")
def hf_random_model():
    """random_hf_model(config_cls, model_cls, directory, config, **save_kw)."""
    return random_hf_model


def imported_model(workdir):
    """(Transformer, params, MoE state or None) of an imported workdir (its gin config
    parsed; the MoE state is DeepSeek-V3's selection biases, None for the other families)."""
    parse_workdir_config(workdir, [], [])
    mc = ModelConfig()
    shapes, sh = abstract_params(mc, make_mesh())
    abstract = unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k])
                          for k, v in shapes.items()})
    return (Transformer(mc), *restore_pretrained_state(workdir, abstract))


@pytest.fixture(scope="session")
def imported():
    """imported_model(workdir) -> (Transformer, params, MoE state or None)."""
    return imported_model
