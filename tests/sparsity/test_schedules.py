"""Schedule values at given steps and average-density solving."""
import math

import numpy as np
import pytest

from sparsejax.sparsity import schedules as S


def test_polynomial_values_and_update_steps():
    s = S.PolynomialSchedule(start=10, end=110, frequency=25, exponent=3).bind(200)
    for step, want in [(0, 0.0), (10, 0.0), (35, 1 - 0.75 ** 3), (60, 0.875), (110, 1.0), (500, 1.0)]:
        assert float(s.scale(step)) == pytest.approx(want, abs=1e-6)
    assert [t for t in range(200) if s.is_update_step(t)] == [10, 35, 60, 85, 110]
    # Layer density 1 - scale * (1 - final): final 0.2 at step 60 -> 0.3.
    assert 1 - float(s.scale(60)) * (1 - 0.2) == pytest.approx(0.3)
    assert S.PolynomialSchedule(0, 100, 10, exponent=1).bind(100).scale(25) == pytest.approx(0.25)


def test_drop_grow_cosine_fraction():
    s = S.DropGrowSchedule(frequency=10, end=100, init_fraction=0.3).bind(150)
    assert float(s.update_fraction(0)) == pytest.approx(0.3)
    assert float(s.update_fraction(50)) == pytest.approx(0.15)
    assert float(s.update_fraction(25)) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert float(s.update_fraction(100)) == pytest.approx(0.0, abs=1e-7)
    assert [t for t in range(150) if s.is_update_step(t)] == list(range(10, 100, 10))
    c = S.DropGrowSchedule(frequency=10, end=100, init_fraction=0.3, decay="constant").bind(150)
    assert float(c.update_fraction(90)) == pytest.approx(0.3)


def test_one_shot_and_sparse_then_dense():
    o = S.OneShotSchedule(step=7).bind(20)
    assert o.init_scale == 0.0 and float(o.scale(6)) == 0.0 and float(o.scale(7)) == 1.0
    assert [t for t in range(20) if o.is_update_step(t)] == [7]
    d = S.SparseThenDenseSchedule(dense_step=5).bind(10)
    assert d.init_scale == 1.0 and float(d.scale(4)) == 1.0 and float(d.scale(5)) == 0.0
    assert S.realized_average_density(d, 0.2, 10) == pytest.approx((5 * 0.2 + 5 * 1.0) / 10)


@pytest.mark.parametrize("make", [
    lambda: S.PolynomialSchedule(start=10, end=5).bind(100),
    lambda: S.PolynomialSchedule(start=10, end=10).bind(100),
    lambda: S.DropGrowSchedule(start=50, end=20).bind(100),
    lambda: S.PolynomialSchedule(start=0.5, end=0.25).bind(100),
])
def test_end_before_start_raises(make):
    with pytest.raises(ValueError, match="end"):
        make()


def _simulated_average(schedule, final, total):
    """Independent simulation of the protocol: updates run before the train step."""
    density, acc = 1 - schedule.init_scale * (1 - final), 0.0
    for t in range(total):
        if schedule.is_update_step(t):
            density = 1 - float(schedule.scale(t)) * (1 - final)
        acc += density
    return acc / total


def test_average_density_solves_final_density():
    s = S.AverageDensitySchedule(avg_density=0.5, total_steps=1000, start=100, end=600, frequency=10).bind(1000)
    assert 0 < s.final_density < 0.5
    assert _simulated_average(s, s.final_density, 1000) == pytest.approx(0.5, abs=1e-6)


def test_average_density_solves_start_step():
    s = S.AverageDensitySchedule(avg_density=0.6, total_steps=1000, end=800, frequency=10,
                                 solve_for="start", final_density=0.1).bind(1000)
    assert 0 < s.start < 800
    # Integer start steps: the realized average is within one start step's effect.
    assert _simulated_average(s, 0.1, 1000) == pytest.approx(0.6, abs=2e-3)
    np.testing.assert_allclose(S.realized_average_density(s, 0.1, 1000), _simulated_average(s, 0.1, 1000))


def test_average_density_unreachable_raises():
    with pytest.raises(ValueError, match="avg_density"):
        S.AverageDensitySchedule(avg_density=0.05, total_steps=100, start=50, end=90, frequency=5).bind(100)
    with pytest.raises(ValueError, match="final_density"):
        S.AverageDensitySchedule(avg_density=0.5, solve_for="start")


def test_fractions_resolve_against_the_run_length():
    s = S.PolynomialSchedule(start=0.1, end=0.75, frequency=0.05)
    assert (s.bind(60).start, s.end, s.frequency) == (6, 45, 3)
    assert (s.bind(400).start, s.end, s.frequency) == (40, 300, 20)
    d = S.DropGrowSchedule(frequency=0.05, end=0.75).bind(60)
    assert d.update_steps(60) == list(range(3, 45, 3))
    assert S.OneShotSchedule(step=0.5).bind(60).update_steps(60) == [30]
    assert S.SparseThenDenseSchedule(dense_step=0.5).bind(300).dense_step == 150
    # total_steps defaults to the run's length
    a = S.AverageDensitySchedule(avg_density=0.5, end=0.5, frequency=0.02).bind(300)
    assert a.total_steps == 300
    assert S.realized_average_density(a, a.final_density, 300) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda: S.PolynomialSchedule(end=1.5), r"PolynomialSchedule.end=1.5: a float is a fraction"),
    (lambda: S.DropGrowSchedule(frequency="10"), r"DropGrowSchedule.frequency='10' must be an int"),
    (lambda: S.OneShotSchedule(step=-1), r"OneShotSchedule.step=-1 must be >= 0"),
    (lambda: S.OneShotSchedule(step=100).bind(60), r"not inside the run of 60 steps"),
    (lambda: S.SparseThenDenseSchedule(dense_step=1.0).bind(60), r"never go dense"),
])
def test_bad_steps_are_refused_with_the_setting_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_warmup_is_a_fraction_of_the_run_when_a_float():
    from sparsejax.train.optim import learning_rate_schedule
    lr = learning_rate_schedule(peak_lr=1.0, warmup_steps=0.25, total_steps=100)
    assert float(lr(25)) == pytest.approx(1.0) and float(lr(12)) == pytest.approx(0.48)
    same = learning_rate_schedule(peak_lr=1.0, warmup_steps=25, total_steps=100)
    assert [float(lr(t)) for t in range(0, 100, 9)] == [float(same(t)) for t in range(0, 100, 9)]
    with pytest.raises(ValueError, match="learning_rate_schedule.warmup_steps=1.5"):
        learning_rate_schedule(warmup_steps=1.5, total_steps=100)
