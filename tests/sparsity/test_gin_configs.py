"""Every shipped sparsity config parses and builds the method its comment describes, and a
binding given after a preset wins over it (the preset is a gin file, not Python)."""
import gin
import pytest

import sparsejax.sparsity as sp
from sparsejax import config
from sparsejax.models.formats.block_sparse import BlockSparse
from sparsejax.models.transformer import ModelConfig
from sparsejax.sparsity import schedules as S
from sparsejax.sparsity.criteria.gradient import Gradient
from sparsejax.sparsity.criteria.magnitude import Magnitude
from sparsejax.sparsity.criteria.movement import Movement
from sparsejax.sparsity.criteria.random import Random
from sparsejax.sparsity.criteria.snip import Snip
from sparsejax.sparsity.structures import Global, Unstructured

MP = sp.MaskedPruningMethod
EXPECTED = {  # config -> (method class, {attribute: value or type})
    "dense.gin": (sp.DenseMethod, {}),
    "static_random.gin": (MP, {"density": 0.1, "distribution": "erk", "schedule": S.ConstantSchedule,
                               "init_criterion": Random}),
    "static_magnitude.gin": (MP, {"schedule": S.ConstantSchedule, "init_criterion": Magnitude}),
    "magnitude_oneshot.gin": (MP, {"density": 0.2, "schedule": S.OneShotSchedule, "criterion": Magnitude}),
    "gmp.gin": (MP, {"density": 0.1, "schedule": S.PolynomialSchedule, "structure": Unstructured}),
    "global_gmp.gin": (MP, {"schedule": S.PolynomialSchedule, "structure": Global}),
    "movement.gin": (MP, {"schedule": S.PolynomialSchedule, "criterion": Movement}),
    "average_density.gin": (MP, {"schedule": S.AverageDensitySchedule}),
    "set.gin": (MP, {"grow": Random, "criterion": Magnitude, "schedule": S.DropGrowSchedule}),
    "rigl.gin": (MP, {"grow": Gradient, "needs_dense_grads": True, "schedule": S.DropGrowSchedule}),
    "snip.gin": (MP, {"criterion": Snip, "needs_dense_grads": True, "schedule": S.OneShotSchedule}),
    "nm_2of4.gin": (MP, {"structure": sp.NMStructure, "density": 0.5}),
    "srste_2of4.gin": (sp.SRSTEMethod, {"n": 2, "m": 4, "lam": 2e-4}),
    "learned_2of4.gin": (sp.LearnedNMMethod, {"n": 2, "m": 4}),
    "spdf.gin": (MP, {"density": 0.25, "schedule": S.SparseThenDenseSchedule}),
    "sparse_finetune.gin": (sp.SparseFinetuneMethod, {"mode": "lt_sft", "density": 0.01}),
    "spiel.gin": (sp.SparseFinetuneMethod, {"mode": "spiel", "density": 0.01}),
    "block_static.gin": (sp.DenseMethod, {}),  # the layout is the format's (below)
    "block_set.gin": (sp.BlockDSTMethod, {"grow": "random", "schedule": S.DropGrowSchedule,
                                          "needs_dense_grads": False}),
    "monarch.gin": (sp.DenseMethod, {}),  # the structure is the format's
    "block_gmp.gin": (sp.BlockGMPMethod, {"density": 0.1, "schedule": S.PolynomialSchedule}),
    "block_rigl.gin": (sp.BlockDSTMethod, {"grow": "gradient", "schedule": S.DropGrowSchedule,
                                           "needs_dense_grads": True}),
}


def test_all_shipped_sparsity_configs_covered():
    shipped = [c[len("sparsity/"):] for c in config.shipped_configs() if c.startswith("sparsity/")]
    assert sorted(shipped) == sorted(EXPECTED)


def build(files, bindings=()):
    config.parse_gin(files, list(bindings))
    return sp.make_method().bind(sp.RunInfo(num_steps=200))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gin_example_builds_method(name):
    method = build([f"sparsity/{name}"])
    cls, attrs = EXPECTED[name]
    assert type(method) is cls
    for key, want in attrs.items():
        got = getattr(method, key)
        if isinstance(want, type):
            assert isinstance(got, want), (key, got)
        else:
            assert got == want, (key, got)


def test_fraction_steps_of_a_preset_resolve_against_the_run():
    s = build(["sparsity/gmp.gin"]).schedule
    assert (s.start, s.end, s.frequency, s.exponent) == (20, 150, 10, 3.0)


@pytest.mark.parametrize("binding, attr, want", [
    ("MaskedPruningMethod.criterion='random'", "criterion", Random),
    ("MaskedPruningMethod.schedule='one_shot'", "schedule", S.OneShotSchedule),
    ("MaskedPruningMethod.structure='global'", "structure", Global),
])
def test_a_binding_after_a_preset_wins(binding, attr, want):
    assert isinstance(getattr(build(["sparsity/gmp.gin"], [binding]), attr), want)


def test_grow_override_wins_over_rigl():
    assert isinstance(build(["sparsity/rigl.gin"], ["MaskedPruningMethod.grow='random'"]).grow, Random)
    nm = build(["sparsity/nm_2of4.gin"], ["NMStructure.n=1"])
    assert nm.structure.n == 1 and nm.density == 0.25


def test_unknown_method_name_names_the_preset():
    gin.clear_config()
    with pytest.raises(ValueError, match=r"make_method.name='rigl' is not a registered sparsity "
                                         r"method.*--gin_file=sparsity/rigl.gin"):
        sp.make_method("rigl")


@pytest.mark.parametrize("name", ["block_static.gin", "block_set.gin", "block_rigl.gin"])
def test_block_configs_store_compact_blocks(name):
    config.parse_gin(["tiny.gin", f"sparsity/{name}"], [])
    assert ModelConfig().weight_format == "block_sparse"
    fmt = BlockSparse()
    assert (fmt.block_in, fmt.block_out, fmt.density, fmt.init) == (16, 16, 0.1, "random")
