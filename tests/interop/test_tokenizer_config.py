"""An HF tokenizer encodes text as transformers 5 does whatever tokenizer_config.json says:
transformers encodes through the tokenizer.json's own post-processor and does not act on
`add_bos_token` / `add_eos_token` there (checked with the generic tokenizer class and a
Llama one, which loads a byte-level tokenizer.json as the generic class), so neither do we."""
import json

import pytest
from tokenizers import Tokenizer, processors

from sparsejax.data.tokenizer import HFTokenizer

pytestmark = pytest.mark.hf  # needs the [hf] extra (CI's --hf-only run)
transformers = pytest.importorskip("transformers")

TEXT = "def add(a, b):\n    return a + b\n"
FLAGS = {"no flags": {}, "bos off": {"add_bos_token": False}, "bos on": {"add_bos_token": True},
         "bos and eos": {"add_bos_token": True, "add_eos_token": True}}


@pytest.fixture(scope="module", params=["no post-processor", "bos template"])
def tokenizer_json(request, tmp_path_factory, bpe_tokenizer):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    bpe_tokenizer(path)
    if request.param == "bos template":
        tok = Tokenizer.from_file(str(path))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
        tok.save(str(path))
    return path, request.param == "bos template"


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "LlamaTokenizerFast"])
@pytest.mark.parametrize("flags", sorted(FLAGS))
def test_text_is_encoded_as_transformers_encodes_it(tokenizer_json, tokenizer_class, flags):
    path, adds_bos = tokenizer_json
    (path.parent / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "<pad>", **FLAGS[flags]}))
    want = transformers.AutoTokenizer.from_pretrained(str(path.parent))(TEXT)["input_ids"]
    got = HFTokenizer(str(path), bos_id=1, eos_id=2).encode_text(TEXT).tolist()
    assert got == want
    assert (got[0] == 1) == adds_bos and got[-1] != 2
