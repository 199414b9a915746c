"""Measures of an MoE layer's routing over a token sequence, for expert offloading and
expert-level compression (numpy; `sparsejax moe-report` computes them on calibration text).

A routing is a boolean array [T, E]: token t (in sequence order) is routed to expert e.

* load: each expert's share of the assignments; co-activation: how often two experts serve
  the same token (AᵀA, its diagonal the counts).
* segment coverage (routing consistency, as in the local-routing-consistency studies): cut a
  sequence into segments of S consecutive tokens; one set of C experts per segment covers
  the assignments that fall in the set. The best set is the segment's C most used experts, so
  the coverage of (S, C) is Σ over segments of their top-C counts / Σ of all assignments.
  Only whole segments count.
* cache hit rate: the experts are requested token by token (a token's experts in index
  order); a cache of C experts hits a request when the expert is resident. `optimal_hits`
  evicts the expert needed farthest in the future (Belady's MIN: the most hits any eviction
  policy gets on this request sequence), `lru_hits` the least recently used one (what a
  policy without foresight gets). The cache starts empty for each sequence.
"""
from __future__ import annotations

import heapq
from typing import Iterable, Sequence

import numpy as np


def expert_load(routing: np.ndarray) -> np.ndarray:
    """Share of the assignments per expert [E] (sums to 1; zeros when nothing is routed)."""
    counts = np.asarray(routing, bool).sum(0).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def coactivation(routing: np.ndarray) -> np.ndarray:
    """[E, E] tokens routed to both experts (the diagonal: tokens routed to each)."""
    a = np.asarray(routing, bool).astype(np.int64)
    return a.T @ a


def segment_coverage(routing: np.ndarray, segment: int, experts: int) -> tuple[float, float]:
    """(covered assignments, all assignments) of one sequence's routing [T, E] over its whole
    segments of `segment` tokens, each covered by its `experts` most used experts."""
    a = np.asarray(routing, bool)
    n = (a.shape[0] // segment) * segment
    if n == 0:
        return 0.0, 0.0
    counts = a[:n].reshape(n // segment, segment, -1).sum(1)  # [segments, E]
    top = -np.sort(-counts, axis=1)[:, :experts]
    return float(top.sum()), float(counts.sum())


def requests(routing: np.ndarray) -> list[int]:
    """The request sequence of a routing [T, E]: each token's experts in index order."""
    t, e = np.nonzero(np.asarray(routing, bool))
    return e[np.lexsort((e, t))].tolist()


def optimal_hits(reqs: Sequence[int], capacity: int) -> int:
    """Hits of Belady's MIN (evict the resident expert whose next request is farthest)."""
    n = len(reqs)
    nxt, last = [0] * n, {}
    for i in range(n - 1, -1, -1):
        nxt[i] = last.get(reqs[i], n + 1)
        last[reqs[i]] = i
    cache: dict[int, int] = {}  # expert -> index of its next request
    heap: list[tuple[int, int]] = []  # (-next request, expert), stale entries skipped
    hits = 0
    for i, r in enumerate(reqs):
        if r in cache:
            hits += 1
        elif len(cache) >= capacity:
            while True:
                neg, e = heapq.heappop(heap)
                if cache.get(e) == -neg:
                    del cache[e]
                    break
        cache[r] = nxt[i]
        heapq.heappush(heap, (-nxt[i], r))
    return hits


def lru_hits(reqs: Sequence[int], capacity: int) -> int:
    """Hits of a least-recently-used cache of `capacity` experts."""
    cache: dict[int, None] = {}  # insertion order = recency
    hits = 0
    for r in reqs:
        if r in cache:
            hits += 1
            del cache[r]
        elif len(cache) >= capacity:
            del cache[next(iter(cache))]
        cache[r] = None
    return hits


def consistency(sequences: Iterable[np.ndarray], segments: Sequence[int],
                cache_sizes: Sequence[int]) -> dict:
    """Segment coverage for every (S, C) in segments x cache_sizes and the optimal and LRU
    hit rates for every cache size C, over sequences (routings [T, E]), as ratios of sums
    over all sequences."""
    cov = {(s, c): [0.0, 0.0] for s in segments for c in cache_sizes}
    hits = {c: [0, 0, 0] for c in cache_sizes}  # optimal, lru, requests
    for a in sequences:
        for s in segments:
            for c in cache_sizes:
                got, tot = segment_coverage(a, s, c)
                cov[s, c][0] += got
                cov[s, c][1] += tot
        reqs = requests(a)
        for c in cache_sizes:
            hits[c][0] += optimal_hits(reqs, c)
            hits[c][1] += lru_hits(reqs, c)
            hits[c][2] += len(reqs)
    ratio = lambda x, y: float(x / y) if y else None
    return {"segment_coverage": {str(s): {str(c): ratio(*cov[s, c]) for c in cache_sizes}
                                 for s in segments},
            "cache_hit_rate": {str(c): {"optimal": ratio(hits[c][0], hits[c][2]),
                                        "lru": ratio(hits[c][1], hits[c][2]),
                                        "requests": hits[c][2]} for c in cache_sizes}}
