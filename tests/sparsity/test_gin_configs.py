"""Every example gin config parses and builds its method."""
import pathlib

import gin
import pytest

import sparsejax.sparsity as sp
from sparsejax.sparsity import schedules as S

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "sparsity"

EXPECTED = {
    "dense.gin": (sp.DenseMethod, {}),
    "static_random.gin": (sp.MaskedPruningMethod, {"density": 0.1, "distribution": "erk", "schedule": S.ConstantSchedule}),
    "magnitude_oneshot.gin": (sp.MaskedPruningMethod, {"density": 0.2, "schedule": S.OneShotSchedule}),
    "gmp.gin": (sp.MaskedPruningMethod, {"density": 0.1, "schedule": S.PolynomialSchedule}),
    "set.gin": (sp.MaskedPruningMethod, {"grow": "random", "schedule": S.DropGrowSchedule}),
    "rigl.gin": (sp.MaskedPruningMethod, {"grow": "gradient", "needs_dense_grads": True, "schedule": S.DropGrowSchedule}),
    "snip.gin": (sp.MaskedPruningMethod, {"criterion": "snip", "needs_dense_grads": True}),
    "nm_2of4.gin": (sp.MaskedPruningMethod, {"nm": (2, 4), "density": 0.5}),
    "srste_2of4.gin": (sp.SRSTEMethod, {"n": 2, "m": 4, "lam": 2e-4}),
    "learned_2of4.gin": (sp.LearnedNMMethod, {"n": 2, "m": 4, "anneal_steps": 5000}),
    "spdf.gin": (sp.MaskedPruningMethod, {"density": 0.25, "schedule": S.SparseThenDenseSchedule}),
    "sparse_finetune.gin": (sp.SparseFinetuneMethod, {"mode": "lt_sft", "density": 0.01, "select_step": 500}),
}


def test_all_examples_covered():
    assert sorted(p.name for p in GIN_DIR.glob("*.gin")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gin_example_builds_method(name):
    gin.clear_config()
    try:
        gin.parse_config((GIN_DIR / name).read_text())
        method = sp.make_method()
        cls, attrs = EXPECTED[name]
        assert type(method) is cls
        for key, want in attrs.items():
            got = getattr(method, key)
            if isinstance(want, type):
                assert isinstance(got, want), (key, got)
            else:
                assert got == want, (key, got)
    finally:
        gin.clear_config()


def test_gin_binds_schedule_values_and_nm_override():
    gin.clear_config()
    try:
        gin.parse_config((GIN_DIR / "gmp.gin").read_text())
        s = sp.make_method().schedule
        assert (s.start, s.end, s.frequency, s.exponent) == (1000, 8000, 100, 3.0)
        gin.clear_config()
        gin.parse_config((GIN_DIR / "nm_2of4.gin").read_text() + "\nMaskedPruningMethod.nm = (1, 4)\n")
        assert sp.make_method().nm == (1, 4)
    finally:
        gin.clear_config()


def test_unknown_method_name_raises():
    with pytest.raises(ValueError, match="name: 'foo'"):
        sp.make_method("foo")
