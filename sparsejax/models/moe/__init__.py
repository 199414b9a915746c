"""Mixture-of-Experts: routers, stacked experts, dispatch strategies, balancing losses,
expert parallelism and sparse upcycling."""
