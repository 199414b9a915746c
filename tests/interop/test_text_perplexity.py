"""`sparsejax eval --text_file` under the papers' perplexity protocols equals the same protocol
computed with transformers (skipped unless `transformers` and `torch` are installed): a tiny
random Llama with its own tokenizer.json is imported, and both sides score one text, tokenized
by transformers' tokenizer on one side and by the workdir's on the other. concat follows the
SparseGPT/Wanda evaluation code (windows of seqlen, exp of the mean of the windows' mean
losses); sliding the strided loop of Hugging Face's perplexity guide, each token scored once."""
import json

import numpy as np
import pytest

pytestmark = pytest.mark.hf  # needs the [hf] extra (CI's --hf-only run)
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from sparsejax import cli  # noqa: E402

CFG = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
           rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=1,
           eos_token_id=2, pad_token_id=0)
WINDOW = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bpe_tokenizer):
    root = tmp_path_factory.mktemp("ppl")
    src = root / "hf"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.2)
    model.save_pretrained(src)
    bpe_tokenizer(src / "tokenizer.json")
    text = "\n\n".join(f"def f{i}(a, b):\n    return a * {i} + b\n" for i in range(40))
    (root / "text.txt").write_text(text)
    w = str(root / "w")
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    ids = torch.tensor([tok(text)["input_ids"]])
    return {"model": model, "ids": ids, "w": w, "text": str(root / "text.txt")}


def ours(capsys, *args):
    capsys.readouterr()
    assert cli.main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def concat_reference(model, ids, seqlen):
    """SparseGPT's llama_eval loop: nsamples windows, loss * seqlen summed, / (nsamples * seqlen)."""
    nsamples = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            batch = ids[:, i * seqlen:(i + 1) * seqlen]
            logits = model(batch).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:])
            nlls.append(loss.float() * seqlen)
    return float(torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen))), nsamples


def sliding_reference(model, ids, max_length, stride):
    """The perplexity guide's loop, each window's scored tokens summed (not mean * count - 1)."""
    seq_len, nll_sum, n_tokens, prev_end = ids.size(1), 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, seq_len, stride):
            end = min(begin + max_length, seq_len)
            trg_len = end - prev_end
            input_ids = ids[:, begin:end]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            logits = model(input_ids).logits
            labels = target_ids[0, 1:]
            losses = torch.nn.functional.cross_entropy(logits[0, :-1], labels, reduction="sum",
                                                       ignore_index=-100)
            nll_sum += float(losses)
            n_tokens += int((labels != -100).sum())
            prev_end = end
            if end == seq_len:
                break
    return float(np.exp(nll_sum / n_tokens)), n_tokens


def test_concat_protocol_equals_the_reference(setup, capsys):
    ref, windows = concat_reference(setup["model"], setup["ids"], WINDOW)
    out = ours(capsys, f"--workdir={setup['w']}", f"--text_file={setup['text']}",
               "--protocol=concat", f"--seq_len={WINDOW}")
    assert out["text_tokens"] == setup["ids"].numel()  # the same tokenization
    assert out["windows"] == windows and out["eval_tokens"] == windows * (WINDOW - 1)
    assert out["eval_perplexity"] == pytest.approx(ref, rel=1e-4)
    assert out["eval_loss_stderr"] > 0


@pytest.mark.parametrize("stride", [8, 32])
def test_sliding_protocol_equals_the_reference(setup, capsys, stride):
    ref, n_tokens = sliding_reference(setup["model"], setup["ids"], WINDOW, stride)
    out = ours(capsys, f"--workdir={setup['w']}", f"--text_file={setup['text']}",
               "--protocol=sliding", f"--stride={stride}", f"--seq_len={WINDOW}")
    assert out["eval_tokens"] == n_tokens
    if stride < WINDOW:  # every token after the first scored once
        assert n_tokens == setup["ids"].numel() - 1
    assert out["eval_perplexity"] == pytest.approx(ref, rel=1e-4)


def test_sample_continues_the_tokenizers_own_encoding(setup, capsys):
    """`sample` encodes a prompt as the tokenizer does (this tokenizer adds no BOS, although
    config.json names one), so its greedy continuation is transformers' `generate`'s."""
    prompt = "def f3(a, b):\n    return"
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(
        setup["text"]).replace("text.txt", "hf/tokenizer.json"))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    assert ids[0, 0].item() != CFG["bos_token_id"]
    with torch.no_grad():
        want = setup["model"].generate(ids, max_new_tokens=6, do_sample=False,
                                       pad_token_id=0)[0, ids.shape[1]:].tolist()
    capsys.readouterr()
    assert cli.main(["sample", f"--workdir={setup['w']}", f"--prompt={prompt}",
                     "--max_new_tokens=6"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"][0] == want
