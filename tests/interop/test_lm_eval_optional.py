"""lm_eval is an optional extra ([eval]): parsing any config imports every sparsejax module
but the lm-evaluation-harness model, and `sparsejax lm-eval` without lm_eval says what to
install (run as if lm_eval were not installed, whether it is or not)."""
import sys

import sparsejax.interop
from sparsejax import cli, config

MODEL = "sparsejax.interop.lm_eval_model"


def test_commands_need_no_lm_eval(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails
    monkeypatch.delitem(sys.modules, MODEL, raising=False)
    monkeypatch.delattr(sparsejax.interop, "lm_eval_model", raising=False)
    monkeypatch.setattr(config, "_REGISTERED", False)
    config.register_configurables()
    assert MODEL not in sys.modules
    capsys.readouterr()
    assert cli.main(["lm-eval", "--model_args", "workdir=w", "--tasks", "t"]) == 2
    assert "pip install 'sparsejax[eval]'" in capsys.readouterr().err
