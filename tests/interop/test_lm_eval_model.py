"""The lm-evaluation-harness model `sparsejax` against lm_eval's own `hf` model (skipped unless
`lm_eval`, `transformers` and `torch` are installed: `pip install -e '.[test,hf,eval]'`).

Tiny random models with a byte-level BPE tokenizer are built with transformers, imported
(`import-hf`) and exported again (`export-hf`); lm_eval runs the tasks of
tests/interop/lm_eval_tasks (multiple choice; rolling perplexity over documents longer than
the model's 64-token context; greedy generation until a newline) on the workdir through
`sparsejax` and on the export through `hf`. Every request's log-likelihood agrees within 1e-4
(absolute), is-greedy flags, accuracies and generations are identical, for a Llama whose
tokenizer adds BOS, a Mixtral whose tokenizer adds none (config.json names a BOS id all the
same, which must not be prepended) and the compact block-sparse workdir that
`prune --compact` writes from the Llama. `sparsejax lm-eval` (lm_eval's command line with the
model registered) with activation thresholds as gin bindings gives the Python API's results,
which differ from the dense model's, and decodes what `sparsejax sample` decodes under the
same thresholds. A sparse run of this repository's own (byte tokenizer, static magnitude masks) is scored as its
masked params score its training documents, BOS first. Bad model_args, workdirs and requests
are refused with one line."""
import json
import os
import shutil

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gin  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.hf  # needs the [hf] and [eval] extras (CI's --hf-only run)
lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from sparsejax import cli  # noqa: E402
from sparsejax.infer.workdir import sample_workdir  # noqa: E402
from sparsejax.interop.lm_eval_model import SparsejaxLM  # noqa: E402
from sparsejax.models.transformer import ModelConfig, Transformer  # noqa: E402
from sparsejax.train.checkpoint import restore_state_numpy  # noqa: E402
from sparsejax.train.commands import parse_workdir_config  # noqa: E402

TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
ALL = ("sj_choice", "sj_text", "sj_complete")
TOL = 1e-4
TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "import os\nprint(os.getcwd())\n", "for i in range(10):\n    total += i * i\n"]
LLAMA = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
TEAL = ["Thresholding.method='teal'", "Thresholding.target=0.5",
        "Thresholding.calibration_tokens=512"]


def save_tokenizer(directory, add_bos):
    """A byte-level BPE tokenizer trained here (no download), saved by transformers with its
    tokenizer_config.json; `add_bos`: its post-processor puts <s> first, as Llama's does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(directory)


def import_export(root, family, add_bos):
    """(workdir, its export-hf directory) of a tiny random HF model of `family`."""
    src, w, out = root / f"{family}_src", str(root / family), str(root / f"{family}_hf")
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **LLAMA, num_local_experts=4, num_experts_per_tok=2))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    model.float().save_pretrained(src)
    save_tokenizer(src, add_bos)
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0
    gin.clear_config()
    assert cli.main(["export-hf", f"--workdir={w}", f"--out={out}"]) == 0
    return w, out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    data = root / "data"
    data.mkdir()
    for i in range(40):
        (data / f"doc_{i:02d}.txt").write_text(TEXT[i % 4] * (1 + i % 3))
    return root


def dataset(root):
    """Training rows for calibration (thresholds, pruning): the documents in root/data."""
    return f"TrainConfig.dataset='files:{root}/data/*.txt'"


@pytest.fixture(scope="module")
def llama(root):
    return import_export(root, "llama", add_bos=True)


@pytest.fixture(scope="module")
def llama_lm(llama):
    return SparsejaxLM(workdir=llama[0], batch_size=8)


def evaluate(model, tasks, **kw):
    """lm_eval.simple_evaluate on the shipped tasks: (results, {task: {doc id: sample}})."""
    out = lm_eval.simple_evaluate(model=model, tasks=list(tasks), log_samples=True,
                                  task_manager=TaskManager(include_path=TASKS),
                                  bootstrap_iters=0, **kw)
    return out["results"], {t: {s["doc_id"]: s for s in out["samples"][t]} for t in tasks}


def hf(path, tasks):
    return evaluate("hf", tasks, batch_size=8,
                    model_args={"pretrained": path, "dtype": "float32", "device": "cpu"})


def responses(samples, task):
    """[(doc id, response)] of every request of a task, in order."""
    return [(doc, r[0]) for doc, s in sorted(samples[task].items()) for r in s["resps"]]


def assert_same(ours, theirs, tasks):
    """Per request: log-likelihoods within TOL, is-greedy flags and generations identical;
    per task: the same accuracies and exact matches."""
    (res_a, sam_a), (res_b, sam_b) = ours, theirs
    for t in tasks:
        a, b = responses(sam_a, t), responses(sam_b, t)
        assert len(a) == len(b) > 0, t
        for (doc, ra), (_, rb) in zip(a, b):
            if isinstance(ra, str):  # generate_until
                assert ra == rb, (t, doc, ra, rb)
            elif isinstance(ra, (tuple, list)):  # loglikelihood: (log-prob, is greedy)
                assert abs(ra[0] - rb[0]) <= TOL and ra[1] == rb[1], (t, doc, ra, rb)
            else:  # loglikelihood_rolling
                assert abs(ra - rb) <= TOL, (t, doc, ra, rb)
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            assert res_a[t].get(metric) == res_b[t].get(metric), (t, metric)


def generate(lm, prompts, **gen_kwargs):
    return lm.generate_until([Instance("generate_until", {}, (p, gen_kwargs), i)
                              for i, p in enumerate(prompts)])


def test_llama_matches_the_hf_model_on_every_request_type(llama, llama_lm):
    ours = evaluate(llama_lm, ALL)
    assert_same(ours, hf(llama[1], ALL), ALL)
    docs = ours[1]
    # BOS comes from the tokenizer's own template, as the hf model's tokenizer adds it
    assert llama_lm.tok_encode("import os")[0] == 1
    # documents longer than the context are scored in several windows
    lengths = [len(llama_lm.tok_encode(s["doc"]["text"])) for s in docs["sj_text"].values()]
    assert max(lengths) > 2 * llama_lm.max_length, lengths
    # some generations were cut at the stop sequence (the newline)
    prompts = [s["doc"]["prompt"] for _, s in sorted(docs["sj_complete"].items())]
    cut = [r for _, r in responses(docs, "sj_complete")]
    uncut = generate(llama_lm, prompts, until=[], max_gen_toks=12)
    assert all(u.startswith(c) for c, u in zip(cut, uncut))
    assert any("\n" in u and c == u.split("\n")[0] for c, u in zip(cut, uncut)), uncut


def test_mixtral_whose_tokenizer_adds_no_bos_matches_the_hf_model(root):
    w, out = import_export(root, "mixtral", add_bos=False)
    lm = SparsejaxLM(workdir=w, batch_size=8)
    # config.json's bos_token_id (1) is not prepended: the tokenizer adds none
    assert lm.tok_encode("import os")[0] != 1 and lm.prefix_token_id == 1
    tasks = ("sj_choice", "sj_text")
    assert_same(evaluate(lm, tasks), hf(out, tasks), tasks)


def test_compact_pruned_workdir_matches_the_hf_model_of_its_export(root, llama):
    compact, out = str(root / "compact"), str(root / "compact_hf")
    assert cli.main(["prune", f"--workdir={llama[0]}", f"--out={compact}", "--compact",
                     "--method=magnitude", "--structure=block", "--sparsity=0.5",
                     "--gin.BlockStructure.block=(16, 16)", "--calibration_samples=8",
                     "--eval_tokens=256", f"--gin.{dataset(root)}",
                     "--gin.TrainConfig.global_batch_size=8", "--gin.TrainConfig.seq_len=32",
                     "--quiet"]) == 0
    assert "ModelConfig.weight_format = 'block_sparse'" in open(
        os.path.join(compact, "config.gin")).read()
    gin.clear_config()
    assert cli.main(["export-hf", f"--workdir={compact}", f"--out={out}"]) == 0
    tasks = ("sj_choice", "sj_complete")
    assert_same(evaluate(SparsejaxLM(workdir=compact, batch_size=8), tasks), hf(out, tasks),
                tasks)


def masked(params, masks):
    if masks is None:
        return params
    if isinstance(params, dict):
        return {k: masked(v, masks.get(k)) for k, v in params.items()}
    return params * masks


def test_sparse_run_with_the_byte_tokenizer_scores_as_its_masked_params(root, make_source):
    """tiny.gin with static magnitude masks (10% kept) at step 0: the byte tokenizer puts its
    BOS first, as the run's training documents start, and a document longer than the
    128-token context gets the rolling log-likelihood of the masked params, computed here
    window by window from the checkpoint."""
    w = str(root / "static")
    make_source(w, f"--gin.{dataset(root)}",
                gin_files=("tiny.gin", "sparsity/static_magnitude.gin"))
    lm = SparsejaxLM(workdir=w, batch_size=8)
    doc = TEXT[0] * 6
    ids = [257] + list(doc.encode())
    assert lm.tok_encode(doc) == ids and len(ids) > lm.max_length == 128
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)])
    _, state = restore_state_numpy(w)
    params = masked(state["params"], state["sparsity"]["masks"])
    assert np.mean(params["layer_0"]["mlp"]["wi_up"]["kernel"] == 0) > 0.5
    model = Transformer(ModelConfig())
    want = 0.0
    for ctx, cont in map(lm_eval.utils.make_disjoint_window,
                         lm_eval.utils.get_rolling_token_windows(ids, 257, 128, 1)):
        seq = np.asarray(ctx + cont)
        logits = np.asarray(model.apply({"params": params}, seq[None, :-1]), np.float64)[0]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        want += float(np.sum(logp[np.arange(len(seq) - 1), seq[1:]][-len(cont):]))
    assert abs(got - want) <= TOL, (got, want)


def test_command_line_with_thresholds_gives_the_api_results_and_decodes_as_sample(
        root, llama, llama_lm, tmp_path, capsys):
    """`sparsejax lm-eval` (model_args batch_size over lm_eval's --batch_size, --gin.*
    flags joining model_args gin) with TEAL thresholds: the same per-request results as the
    Python API given the same bindings; they differ from the dense model's; greedy
    generations are `sparsejax sample`'s under the same thresholds."""
    w, tasks = llama[0], ("sj_choice", "sj_complete")
    bindings = [dataset(root), *TEAL]
    assert cli.main(["lm-eval", "--model_args", f"workdir={w},batch_size=8,gin={bindings[0]}",
                     "--tasks", ",".join(tasks), "--include_path", TASKS, "--log_samples",
                     "--output_path", str(tmp_path / "out"),
                     *[f"--gin.{b}" for b in bindings[1:]]]) == 0
    (results,) = tmp_path.glob("out/**/results_*.json")
    from_cli = json.loads(results.read_text())
    assert from_cli["config"]["sparsejax_gin"] == bindings
    samples = {t: {} for t in tasks}
    for t in tasks:
        (path,) = tmp_path.glob(f"out/**/samples_{t}_*.jsonl")
        for line in path.read_text().splitlines():
            s = json.loads(line)  # (log-prob, is greedy) pairs are written as strings
            s["resps"] = [[(float(r[0]), r[1] == "True") if isinstance(r, list) else r]
                          for (r,) in s["resps"]]
            samples[t][s["doc_id"]] = s
    lm = SparsejaxLM(workdir=w, batch_size=8, gin=";".join(bindings))
    api = evaluate(lm, tasks)
    assert_same((from_cli["results"], samples), api, tasks)
    dense = evaluate(llama_lm, ("sj_choice",))
    assert responses(dense[1], "sj_choice") != responses(api[1], "sj_choice")
    # greedy decoding under thresholds is what `sparsejax sample` decodes (same BOS: the
    # tokenizer's template and config.json agree here)
    prompts = ["def add(a, b):\n", "import", "x"]
    ours = generate(lm, prompts, until=[], max_gen_toks=8)
    parse_workdir_config(w, [], bindings)
    assert sample_workdir(w, prompts, max_new_tokens=8)["texts"] == ours
    # the dense model is back in force for the dense instance (gin is process-wide)
    assert responses(evaluate(llama_lm, ("sj_choice",))[1], "sj_choice") == \
        responses(dense[1], "sj_choice")


def test_bad_input_is_refused_with_one_line(root, llama, llama_lm, tmp_path, capsys):
    w = llama[0]
    with pytest.raises(ValueError, match=r"\['pretrained'\] are not supported by the sparsejax "
                                         r"model; supported: workdir, batch_size, max_length"):
        SparsejaxLM(workdir=w, pretrained="gpt2")
    with pytest.raises(ValueError, match="model_args workdir=None"):
        SparsejaxLM()
    with pytest.raises(ValueError, match=r"batch_size='auto' must be an int >= 1"):
        SparsejaxLM.create_from_arg_obj({"workdir": w}, {"batch_size": "auto"})
    with pytest.raises(ValueError, match="max_length=100 exceeds the model's "
                                         "ModelConfig.max_seq_len=64"):
        SparsejaxLM(workdir=w, max_length=100)
    with pytest.raises(ValueError, match="Thresholding.target=0.5 has no effect"):
        SparsejaxLM(workdir=w, gin="Thresholding.target=0.5")
    with pytest.raises(ValueError, match=r"no effect on this run, so it is refused: "
                                         r"SparseDecode.max_rows"):
        SparsejaxLM(workdir=w, gin="SparseDecode.max_rows=2")
    no_tok = str(tmp_path / "no_tokenizer")
    shutil.copytree(w, no_tok)
    os.remove(os.path.join(no_tok, "tokenizer.json"))
    config = os.path.join(no_tok, "pretrained.gin")  # the copy's own (missing) tokenizer
    with open(config) as f:
        text = f.read().replace(os.path.join(w, "tokenizer.json"),
                                os.path.join(no_tok, "tokenizer.json"))
    with open(config, "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match=f"workdir={no_tok!r} has no usable tokenizer: "
                                         f"make_tokenizer.path="):
        SparsejaxLM(workdir=no_tok)
    for gen_kwargs, needle in (({"until": ["\n"], "do_sample": True, "temperature": 0.7},
                                "decodes greedily; the request asks to sample"),
                               ({"until": ["\n"], "top_p": 0.9},
                                r"generation kwargs \['top_p'\] are not supported"),
                               ({"max_gen_toks": 64}, r"max_gen_toks=64 must be in \[1, "
                                                      r"max_length=64\)")):
        with pytest.raises(ValueError, match=needle) as e:
            generate(llama_lm, ["x"], **gen_kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no chat template"):
        llama_lm.apply_chat_template([{"role": "user", "content": "hi"}])
    # through the command line: exit status 2, the message on one line
    capsys.readouterr()
    assert cli.main(["lm-eval", "--model_args", f"workdir={w},bogus=1", "--tasks",
                     "sj_choice", "--include_path", TASKS]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model_args ['bogus'] are not supported") and \
        "supported: workdir, batch_size" in err
