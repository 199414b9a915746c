"""An imported workdir through the CLI (no torch): its tokenizer.json tokenizes the data,
`eval` scores the imported params, `train` starts from them, a 2:4 sparse fine-tune exports
exactly-zero N:M weights, and `sample` decodes text."""
import json
import os
import shutil

import gin
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sparsejax import cli
from sparsejax.data.tokenizer import HFTokenizer, make_tokenizer
from sparsejax.train.metrics import read_metrics

CFG = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
           rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2)
TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "import os\nprint(os.getcwd())\n", "for i in range(10):\n    total += i * i\n"]
FAST = ["--gin.TrainConfig.global_batch_size=8", "--gin.TrainConfig.seq_len=32",
        "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=2",
        "--gin.TrainConfig.eval_tokens=512", "--gin.TrainConfig.checkpoint_every=2",
        "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.async_checkpoints=False"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, bpe_tokenizer):
    root = tmp_path_factory.mktemp("imported")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    d, f, v = 32, 64, 300
    t = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(2):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                  p + "self_attn.q_proj.weight": (32, d), p + "self_attn.k_proj.weight": (16, d),
                  p + "self_attn.v_proj.weight": (16, d), p + "self_attn.o_proj.weight": (d, 32),
                  p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                  p + "mlp.down_proj.weight": (d, f)})
    save_file({k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in t.items()},
              str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(CFG))
    bpe_tokenizer(src / "tokenizer.json")
    data = root / "data"
    data.mkdir()
    for i in range(60):
        (data / f"doc_{i:02d}.txt").write_text(TEXT[i % 4] * (1 + i % 3))
    w = str(root / "w")
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0
    return {"src": src, "w": w, "data": f"--gin.TrainConfig.dataset='files:{data}/*.txt'",
            "root": root}


def eval_loss(capsys, *args):
    capsys.readouterr()
    assert cli.main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_loss"]


def test_tokenizer_comes_with_the_import(imported):
    w = imported["w"]
    assert os.path.exists(os.path.join(w, "tokenizer.json"))
    text = open(os.path.join(w, "pretrained.gin")).read()
    assert "make_tokenizer.kind = 'hf'" in text and "make_tokenizer.bos_id = 1" in text
    gin.parse_config(text)
    tok = make_tokenizer()
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300
    ids = tok.encode("def add(a, b):", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) < 12  # merges, not bytes
    assert tok.decode(ids) == "def add(a, b):"


def last_eval(workdir):
    rec = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "eval_loss" in r]
    return rec[-1]["eval_loss"]


def train(workdir, data, *extra):
    return cli.main(["train", f"--workdir={workdir}", "--quiet", data, *FAST,
                     "--gin.learning_rate_schedule.peak_lr=1e-9",
                     "--gin.learning_rate_schedule.warmup_steps=0", *extra])


def test_eval_train_sparse_finetune_export_sample(imported, capsys, tmp_path):
    w, data = imported["w"], imported["data"]
    loss_imported = eval_loss(capsys, f"--workdir={w}", data, *FAST,
                              "--gin.evaluate_checkpoint.eval_tokens=512")
    # train starts from the imported params: at a vanishing learning rate, same eval loss...
    dense = str(tmp_path / "dense")
    shutil.copytree(w, dense)
    assert train(dense, data, "--gin.TrainConfig.num_steps=1") == 0
    assert abs(last_eval(dense) - loss_imported) < 1e-3
    # ...which a run of the same architecture from random init does not have
    rand = str(tmp_path / "random")
    assert train(rand, data, "--gin.TrainConfig.num_steps=1",
                 f"--gin_file={os.path.join(w, 'pretrained.gin')}") == 0
    assert abs(last_eval(rand) - loss_imported) > 0.05
    # 2:4 sparse fine-tuning from the imported params, then export
    sparse = str(tmp_path / "sparse")
    shutil.copytree(w, sparse)
    assert train(sparse, data, "--gin_file=sparsity/nm_2of4.gin",
                 "--gin.OneShotSchedule.step=0", "--gin.TrainConfig.num_steps=2") == 0
    w = sparse
    capsys.readouterr()
    out = str(tmp_path / "export")
    gin.clear_config()
    assert cli.main(["export-hf", f"--workdir={w}", f"--out={out}"]) == 0
    tensors = load_file(os.path.join(out, "model.safetensors"))
    q = tensors["model.layers.0.self_attn.q_proj.weight"]  # [out, in]: 2:4 along `in`
    groups = q.reshape(q.shape[0], -1, 4)
    assert (np.sum(groups == 0, axis=-1) >= 2).all()
    assert not (tensors["model.embed_tokens.weight"] == 0).all(axis=1).any()  # not pruned
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    # sample: text through the tokenizer, greedy, deterministic
    capsys.readouterr()
    gin.clear_config()
    assert cli.main(["sample", f"--workdir={w}", "--prompt=def add", "--prompt=class",
                     "--max_new_tokens=5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["texts"]) == 2 and result["tokens_per_s"] > 0
    assert all(len(t) == 5 for t in result["tokens"])


def test_relufied_silu_checkpoint_fine_tunes(imported, capsys, tmp_path):
    """ReLU-fication: the imported SwiGLU model with ReLU on the gate, then fine-tuned."""
    w, data = imported["w"], imported["data"]
    relu = ["--gin.ModelConfig.mlp_activation='relu'"]
    silu_loss = eval_loss(capsys, f"--workdir={w}", data, *FAST,
                          "--gin.evaluate_checkpoint.eval_tokens=512")
    switched = eval_loss(capsys, f"--workdir={w}", data, *FAST, *relu,
                         "--gin.evaluate_checkpoint.eval_tokens=512")
    assert abs(switched - silu_loss) > 1e-3  # the switch takes effect on the imported params
    run = str(tmp_path / "relu")
    shutil.copytree(w, run)
    assert cli.main(["train", f"--workdir={run}", "--quiet", data, *FAST, *relu,
                     "--gin.TrainConfig.num_steps=6", "--gin.learning_rate_schedule.peak_lr=3e-3",
                     "--gin.learning_rate_schedule.warmup_steps=0"]) == 0
    assert "ModelConfig.mlp_activation = 'relu'" in open(os.path.join(run, "config.gin")).read()
    evals = [r["eval_loss"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))
             if "eval_loss" in r]
    assert evals[-1] < switched - 0.05, (switched, evals)


def test_vocab_smaller_than_tokenizer_is_refused(imported, capsys, tmp_path):
    w = imported["w"]
    assert cli.main(["eval", f"--workdir={w}", imported["data"],
                     "--gin.make_tokenizer.kind='byte'", "--gin.make_tokenizer.path=None",
                     "--gin.ModelConfig.vocab_size=200"]) == 2
    assert "smaller than the tokenizer's vocabulary (259" in capsys.readouterr().err
