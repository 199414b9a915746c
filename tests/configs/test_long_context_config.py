"""configs/long_context.gin: a 4K-context model whose training stream mixes in synthetic
retrieval documents; shrunk to 512 tokens and one layer, a few steps train through
`sparsejax train` with the mix on (the full run is hours on CPU; its time is in the file)."""
from sparsejax import cli, config
from sparsejax.data.retrieval_mix import RetrievalMix
from sparsejax.models.transformer import ModelConfig
from sparsejax.train.metrics import read_metrics
from sparsejax.train.trainer import TrainConfig


def test_long_context_config_settings():
    config.parse_gin(["long_context.gin"], [])
    mc, tc, mix = ModelConfig(), TrainConfig(), RetrievalMix()
    assert mc.max_seq_len == tc.seq_len == 4096
    assert 0 < mix.fraction < 1
    assert mc.attention_kinds == ("dense",)


def test_long_context_trains_a_few_shrunk_steps(tmp_path, capsys):
    w = str(tmp_path / "w")
    shrink = ["--gin.ModelConfig.max_seq_len=512", "--gin.TrainConfig.seq_len=512",
              "--gin.ModelConfig.num_layers=1", "--gin.TrainConfig.global_batch_size=4",
              "--gin.TrainConfig.num_steps=3", "--gin.TrainConfig.log_every=1",
              "--gin.TrainConfig.eval_every=3", "--gin.TrainConfig.eval_tokens=1024",
              "--gin.TrainConfig.checkpoint_every=3", "--gin.TrainConfig.async_checkpoints=False",
              "--gin.make_mesh.num_devices=1",
              # half the rows synthetic, of the tasks that fit 512 tokens
              "--gin.RetrievalMix.fraction=0.5",
              "--gin.RetrievalMix.tasks=('passkey', 'niah_single')"]
    assert cli.main(["train", "--gin_file=long_context.gin", f"--workdir={w}", "--quiet",
                     *shrink]) == 0, capsys.readouterr().err
    records = read_metrics(f"{w}/metrics.jsonl")
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    assert any(r.get("eval_loss") is not None for r in records)
    assert "RetrievalMix.fraction = 0.5" in open(f"{w}/config.gin").read()
