"""Routing measures (sparsejax/analysis/routing.py) against brute force on small random
routings: segment coverage against every expert set of each segment, the optimal cache hit
count against an exhaustive search over every eviction choice, LRU against a direct
simulation, load and co-activation against their definitions."""
import functools
import itertools

import numpy as np
import pytest

from sparsejax.analysis import routing as rt


def random_routing(rng, t, e, k):
    a = np.zeros((t, e), bool)
    for i in range(t):
        a[i, rng.choice(e, size=k, replace=False)] = True
    return a


def brute_coverage(a, s, c):
    got = tot = 0
    for j in range(a.shape[0] // s):
        seg = a[j * s:(j + 1) * s]
        got += max(seg[:, list(sub)].sum() for sub in itertools.combinations(range(a.shape[1]), c))
        tot += seg.sum()
    return got, tot


def brute_hits(reqs, capacity):
    """The most hits of any eviction choice (exhaustive, memoized on the cache contents)."""
    @functools.lru_cache(maxsize=None)
    def best(i, cache):
        if i == len(reqs):
            return 0
        r = reqs[i]
        if r in cache:
            return 1 + best(i + 1, cache)
        if len(cache) < capacity:
            return best(i + 1, cache | {r})
        return max(best(i + 1, (cache - {v}) | {r}) for v in cache)
    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(4))
def test_segment_coverage_is_the_best_expert_set_per_segment(seed):
    rng = np.random.default_rng(seed)
    a = random_routing(rng, 13, 5, 2)
    for s, c in ((1, 1), (3, 2), (4, 2), (5, 3), (13, 1)):
        got, tot = rt.segment_coverage(a, s, c)
        assert (got, tot) == brute_coverage(a, s, c)
    assert rt.segment_coverage(a, 20, 2) == (0.0, 0.0)  # no whole segment


@pytest.mark.parametrize("seed", range(6))
def test_optimal_hits_are_the_best_of_every_eviction_choice(seed):
    rng = np.random.default_rng(seed)
    e, k = (5, 2) if seed % 2 else (6, 1)
    a = random_routing(rng, 9, e, k)
    reqs = rt.requests(a)
    assert len(reqs) == a.sum() and reqs[:k] == sorted(np.flatnonzero(a[0]).tolist())
    for c in range(max(k, 1), e + 1):
        opt = rt.optimal_hits(reqs, c)
        assert opt == brute_hits(tuple(reqs), c)
        assert rt.lru_hits(reqs, c) <= opt
    assert rt.optimal_hits(reqs, e) == len(reqs) - len(set(reqs))  # only compulsory misses


def test_lru_evicts_the_least_recently_used():
    # capacity 2: 0 1 0 2 (evicts 1) 1 (evicts 0) 0 (evicts 2) -> one hit (the second 0)
    assert rt.lru_hits([0, 1, 0, 2, 1, 0], 2) == 1
    assert rt.optimal_hits([0, 1, 0, 2, 1, 0], 2) == 2  # MIN evicts 0 (needed last) for 2, hits 1


def test_load_coactivation_and_consistency_summary():
    rng = np.random.default_rng(0)
    seqs = [random_routing(rng, 12, 4, 2) for _ in range(3)]
    a = np.concatenate(seqs)
    np.testing.assert_allclose(rt.expert_load(a), a.sum(0) / a.sum())
    co = rt.coactivation(a)
    assert co[1, 2] == np.sum(a[:, 1] & a[:, 2]) and np.array_equal(np.diag(co), a.sum(0))
    out = rt.consistency(seqs, segments=(4,), cache_sizes=(2, 4))
    got = sum(brute_coverage(s, 4, 2)[0] for s in seqs) / sum(s.sum() for s in seqs)
    assert out["segment_coverage"]["4"]["2"] == pytest.approx(got)
    assert out["segment_coverage"]["4"]["4"] == 1.0
    opt = sum(brute_hits(tuple(rt.requests(s)), 2) for s in seqs) / a.sum()
    assert out["cache_hit_rate"]["2"]["optimal"] == pytest.approx(opt)
    assert out["cache_hit_rate"]["4"]["requests"] == a.sum()
