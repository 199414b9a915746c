"""Post-training pruning cost per layer: SparseGPT's phases (XᵀX accumulation, factorization,
solve, mask selection) for unstructured 50% and 2:4, on one CPU core by default, beside the
reference PyTorch implementation when given a checkout of it; Wanda; optionally a whole model.

    python benchmarks/prune.py                                  # 1024² and 2048² layers
    python benchmarks/prune.py --reference=/path/to/sparsegpt   # + the reference, ratios
    python benchmarks/prune.py --dims 2048 4096 --samples 128 --seq_len 2048 --all_cores \\
        --model base.gin                                # all cores, larger, a whole model

Per layer (a [d, d] kernel, `--samples` calibration sequences of `--seq_len` tokens, fed
`--batch` sequences at a time, the same random activations on both sides):
  * XᵀX: accumulating the layer's input statistics (sparsejax: the driver's jitted
    `input_stats`; reference: `SparseGPT.add_batch`), timed once after a warm-up call;
  * the solve at 50% unstructured and at 2:4, block 128, dampening 0.01, timed as one
    compiled call (`solve_kernel`: factorization, solve and mask selection; best of
    `--repeat` after the compile, which is reported apart) against the reference's
    `fasterprune`; `ratio` is reference seconds / sparsejax seconds.
Phases: the factorization and the mask selection are timed alone, the solve is the rest of
the call. sparsejax: `hessian_inverse_factor`, and the selection functions the solve uses
applied to every block (unstructured: the k lowest scores by bisection) or every group of M
(N:M), on the scores before any update (`selection`); the reference: its
`torch.linalg.cholesky` / `torch.cholesky_inverse` calls and its `torch.sort` / `torch.topk`
calls, timed by wrapping them during `fasterprune`. Both sides' seconds are wall time;
`cpu` ratios use process CPU time instead (steadier on a busy machine; each side runs one
thread). The sanity columns compare the two results: reconstruction error tr(ΔᵀHΔ) ratio
and mask agreement.

One core: every thread of this process is pinned to one core (`--core`, default the first
this process may use; `os.sched_setaffinity` on each thread, as `taskset -c` does for a new
process), so XLA's threads and those of the LAPACK library behind its Cholesky and
triangular solves share that core, and torch runs `torch.set_num_threads(1)`.
XLA_FLAGS=--xla_cpu_multi_thread_eigen=false is accepted by jaxlib 0.10.2 but not relied on
(the affinity mask binds every thread whatever the library); `intra_op_parallelism_threads=1`
is not an XLA flag (alone in XLA_FLAGS it stops the start: XLA reads a word without `--` as
the name of a flag file). `--all_cores` leaves the affinity as it is.

The reference (github.com/IST-DASLab/sparsegpt) is imported from `--reference` at run time
(`load_reference`); nothing of it is copied here. Its module imports `transformers` only for
an isinstance check; without transformers a stand-in module serves that import alone. It
calls `torch.cuda.synchronize()`, a no-op here when torch has no CUDA device.

The last line is JSON with the figures and ratios; the device is named.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparsejax.sparsity.posttrain import sparsegpt, solvers, stats as stats_lib  # noqa: E402

try:  # only for --reference
    import torch  # noqa: E402
except ImportError:
    torch = None

MODES = {"unstructured": (0, 0), "2:4": (2, 4)}
BLOCK, DAMP, SPARSITY = 128, 0.01, 0.5


def pin_one_core(core: int | None) -> int:
    """Pins every thread of this process to one core (the first allowed if None)."""
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[0] if core is None else core
    if core not in allowed:
        raise ValueError(f"--core={core}: this process may run on cores {allowed}")
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {core})
    if torch is not None:
        torch.set_num_threads(1)
    return core


def load_reference(path: str):
    """The `SparseGPT` class of a checkout of the reference code at `path` (its
    sparsegpt.py and quant.py), imported from there."""
    src = os.path.join(os.path.abspath(path), "sparsegpt.py")
    if not os.path.isfile(src):
        raise ValueError(f"--reference={path!r} has no sparsegpt.py: give the directory of a "
                         f"checkout of github.com/IST-DASLab/sparsegpt")
    if torch is None:
        raise ValueError(f"--reference={path!r} needs torch (pip install torch==2.13.0)")
    saved = {k: sys.modules.get(k) for k in ("transformers", "quant")}
    if importlib.util.find_spec("transformers") is None:
        stand_in = types.ModuleType("transformers")
        stand_in.Conv1D = type("Conv1D", (), {})  # what the reference's isinstance checks name
        sys.modules["transformers"] = stand_in
    sys.path.insert(0, os.path.dirname(src))
    try:
        spec = importlib.util.spec_from_file_location("sparsegpt_reference", src)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(src))
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module.SparseGPT


@contextlib.contextmanager
def reference_phases(totals: dict):
    """Adds the seconds of the reference's factorization and selection calls to `totals`
    ('factor', 'select') while active; `torch.cuda.synchronize` is a no-op without CUDA."""
    patched = [(torch.linalg, "cholesky", "factor"), (torch, "cholesky_inverse", "factor"),
               (torch, "sort", "select"), (torch, "topk", "select")]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patched]

    def timed(fn, phase):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            totals[phase] = totals.get(phase, 0.0) + time.perf_counter() - t0
            return out
        return call

    for (obj, name, phase), (_, _, fn) in zip(patched, originals):
        setattr(obj, name, timed(fn, phase))
    sync = torch.cuda.synchronize
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield totals
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
        torch.cuda.synchronize = sync


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def best(fn, repeat: int) -> tuple[tuple[float, float], object]:
    """((best wall s, best cpu s) over `repeat` calls, the last result)."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0 = clock()
        out = jax.block_until_ready(fn())
        w, c = since(t0)
        wall, cpu = min(wall, w), min(cpu, c)
    return (wall, cpu), out


def compiled(fn, *args):
    """(lower + compile seconds, the compiled function)."""
    t0 = time.perf_counter()
    c = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0, c


def matmul_peak(n: int = 2048, repeat: int = 3) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    _, f = compiled(lambda a, b: a @ b, a, a)
    (t, _), _ = best(lambda: f(a, a), repeat)
    return 2.0 * n ** 3 / t


def calibration_pool(d: int, tokens: int, seed: int = 0) -> np.ndarray:
    """Eight distinct chunks of activations [8, tokens, d] (cycled over the calibration
    set), features on scales from 0.1 to 10 as real activations have."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(np.log(0.1), np.log(10.0), d)).astype(np.float32)
    return rng.standard_normal((8, tokens, d), np.float32) * scale


def sparsejax_stats(pool: np.ndarray, chunks: int) -> tuple[float, jax.Array]:
    d = pool.shape[-1]
    xs = [jnp.asarray(c) for c in pool]
    ones = jnp.ones(pool.shape[1], jnp.float32)
    step = jax.jit(lambda s, x: s + stats_lib.input_stats(x, ones))
    zero = stats_lib.InputStats(jnp.zeros((d, d)), jnp.zeros(d), jnp.zeros(()))
    jax.block_until_ready(step(zero, xs[0]))  # compile
    t0 = time.perf_counter()
    acc = zero
    for i in range(chunks):
        acc = step(acc, xs[i % len(xs)])
    acc = jax.block_until_ready(acc)
    return time.perf_counter() - t0, acc.hessian


def reference_stats(ref_cls, w: np.ndarray, pool: np.ndarray, chunks: int, batch: int):
    """(seconds of add_batch over the calibration set, the reference object)."""
    d = pool.shape[-1]
    layer = torch.nn.Linear(d, w.shape[1], bias=False)
    layer.weight.data = torch.from_numpy(np.ascontiguousarray(w.T))
    g = ref_cls(layer)
    xs = [torch.from_numpy(c).reshape(batch, -1, d) for c in pool]
    g.add_batch(xs[0], None)  # warm-up
    g.H.zero_()
    g.nsamples = 0
    t0 = time.perf_counter()
    for i in range(chunks):
        g.add_batch(xs[i % len(xs)], None)
    return time.perf_counter() - t0, g


def reference_solve(g, w: np.ndarray, h: torch.Tensor, n: int, m: int, repeat: int):
    """((wall, cpu) best of `repeat` fasterprune calls, phases of the best, pruned kernel)."""
    wall, cpu, phases, out = float("inf"), float("inf"), None, None
    for _ in range(repeat):
        g.layer.weight.data = torch.from_numpy(np.ascontiguousarray(w.T))
        g.H = h.clone()
        totals: dict = {}
        with reference_phases(totals), contextlib.redirect_stdout(io.StringIO()):
            t0 = clock()
            g.fasterprune(SPARSITY, prunen=n, prunem=m, blocksize=BLOCK, percdamp=DAMP)
            w_s, c_s = since(t0)
        if w_s < wall:
            phases = dict(totals, total=w_s)
        wall, cpu = min(wall, w_s), min(cpu, c_s)
        out = g.layer.weight.data.numpy().T.copy()
    phases["solve"] = phases["total"] - phases.get("factor", 0.0) - phases.get("select", 0.0)
    return (wall, cpu), phases, out


def selection(w: jax.Array, u: jax.Array, n: int, m: int) -> jax.Array:
    """The mask selection a solve of w [in, out] makes, alone: every block's k lowest
    scores (unstructured) or every group's M - N lowest (N:M), with the solve's own
    (private) selection functions, on the scores before any update."""
    d_in, d_out = w.shape
    scores = w ** 2 / jnp.diagonal(u)[:, None] ** 2
    if n:
        groups = scores.reshape(d_in // m, m, d_out)
        return jax.vmap(lambda g: sparsegpt._nm_prune(g, n, m))(groups)
    k = jnp.int32(round(SPARSITY * BLOCK * d_out))
    return jax.lax.map(lambda b: sparsegpt._lowest(b, k), scores.reshape(-1, BLOCK, d_out))


def recon_error(w, pruned, h) -> float:
    delta = np.asarray(w, np.float64) - np.asarray(pruned, np.float64)
    return float(np.sum(delta * (np.asarray(h, np.float64) @ delta)))


def layer_costs(d: int, args, ref_cls) -> dict:
    tokens = args.batch * args.seq_len
    chunks = args.samples // args.batch
    pool = calibration_pool(d, tokens)
    w = (np.random.default_rng(1).standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    out = {"d": d, "tokens": chunks * tokens}
    out["stats_s"], h = sparsejax_stats(pool, chunks)
    if ref_cls is not None:
        out["ref_stats_s"], g = reference_stats(ref_cls, w, pool, chunks, args.batch)
        h_ref = g.H.clone()  # 2/N XᵀX: the same masks and weights (λ is relative)
    wj = jnp.asarray(w)
    _, factor = compiled(lambda h: sparsegpt.hessian_inverse_factor(h, DAMP), h)
    (out["factor_s"], _), u = best(lambda: factor(h), args.repeat)
    for mode, (n, m) in MODES.items():
        r = out[mode] = {}
        solve = lambda w, h: sparsegpt.solve_kernel(w, h, dampening=DAMP, block_size=BLOCK,
                                                    sparsity=SPARSITY, n=n, m=m)
        r["compile_s"], fn = compiled(solve, wj, h)
        (r["total_s"], r["total_cpu_s"]), (pruned, kept) = best(lambda: fn(wj, h), args.repeat)
        _, select = compiled(lambda w, u: selection(w, u, n, m), wj, u)
        (r["select_s"], _), _ = best(lambda: select(wj, u), args.repeat)
        r["factor_s"] = out["factor_s"]
        r["solve_s"] = r["total_s"] - r["factor_s"] - r["select_s"]
        r["error"] = recon_error(w, pruned, h)
        if ref_cls is not None:
            (r["ref_total_s"], r["ref_total_cpu_s"]), ph, ref_w = reference_solve(
                g, w, h_ref, n, m, args.repeat)
            r.update({f"ref_{k}_s": ph.get(k, 0.0) for k in ("factor", "solve", "select")})
            r["ratio"] = r["ref_total_s"] / r["total_s"]
            r["cpu_ratio"] = r["ref_total_cpu_s"] / r["total_cpu_s"]
            r["ref_error_over_error"] = recon_error(w, ref_w, h) / r["error"]
            r["mask_agreement"] = float(np.mean((ref_w != 0) == np.asarray(kept)))
    # Wanda: the diagonal of XᵀX (column sums of x², as Wanda computes it) and the selection
    sq = jax.jit(lambda acc, x: acc + jnp.sum(x * x, axis=0))
    xs = [jnp.asarray(c) for c in pool]
    jax.block_until_ready(sq(jnp.zeros(d), xs[0]))
    t0 = time.perf_counter()
    acc = jnp.zeros(d)
    for i in range(chunks):
        acc = sq(acc, xs[i % len(xs)])
    acc = jax.block_until_ready(acc)
    out["wanda_stats_s"] = time.perf_counter() - t0
    calib = stats_lib.LayerCalibration(stats_lib.InputStats(jnp.diag(acc), jnp.zeros(d),
                                                            jnp.zeros(())), None, 1)
    pruner, structure = solvers.PRUNERS.get("wanda")(), solvers.make_structure("per_output")
    jax.block_until_ready(pruner.prune(wj, calib, density=0.5, structure=structure))
    (out["wanda_select_s"], _), _ = best(
        lambda: pruner.prune(wj, calib, density=0.5, structure=structure), args.repeat)
    # useful FLOPs of the solve: factorization 2/3 d³, lazy updates d³, in-block 2 d² B
    out["solve_useful_flops"] = 2.0 / 3.0 * d ** 3 + d ** 3 + 2.0 * d * d * BLOCK
    return out


def whole_model(gin_file: str, samples: int) -> dict:
    """prune_model seconds for SparseGPT and Wanda on a random-init model of `gin_file`."""
    # imported here: the model stack is only needed for --model
    import flax.linen as nn
    from sparsejax import config as config_lib
    from sparsejax.models.transformer import ModelConfig, Transformer, padded_params
    from sparsejax.parallel.mesh import make_mesh
    from sparsejax.sparsity.posttrain.config import PruneConfig
    from sparsejax.sparsity.posttrain.driver import CalibrationSet, prune_model
    from sparsejax.train.trainer import TrainConfig
    config_lib.parse_gin([gin_file], [])
    cfg, train = ModelConfig(), TrainConfig()
    rng = np.random.default_rng(0)
    tok = rng.integers(0, cfg.vocab_size, (samples, train.seq_len)).astype(np.int32)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.asarray(tok[:1])))["params"]
    calib = CalibrationSet(tok, tok, np.ones(tok.shape, np.float32),
                           np.broadcast_to(np.arange(tok.shape[1]), tok.shape).copy(),
                           np.ones(tok.shape, np.int32))
    out = {"model": gin_file, "samples": samples, "seq_len": train.seq_len}
    for method in ("sparsegpt", "wanda"):
        t0 = time.perf_counter()
        r = prune_model(cfg, params, None, calib, PruneConfig(method=method), mesh=make_mesh(),
                        valid=padded_params(cfg), batch_size=train.global_batch_size)
        out[f"{method}_s"] = time.perf_counter() - t0
        out[f"{method}_layers"] = len(r.report["layers"])
    return out


def report(r: dict, peak: float, has_ref: bool) -> dict:
    d = r["d"]
    flat = {f"stats_s_{d}": round(r["stats_s"], 4)}
    line = f"[{d} x {d}, {r['tokens']} tokens] XᵀX: sparsejax {r['stats_s']:.2f} s"
    if has_ref:
        flat[f"ref_stats_s_{d}"] = round(r["ref_stats_s"], 4)
        flat[f"stats_ratio_{d}"] = round(r["ref_stats_s"] / r["stats_s"], 2)
        line += f" | reference {r['ref_stats_s']:.2f} s | ratio {flat[f'stats_ratio_{d}']:.2f}"
    print(line)
    for mode in MODES:
        m = r[mode]
        key = f"{mode}_{d}"
        frac = r["solve_useful_flops"] / m["total_s"] / peak
        line = (f"[{d} x {d}] {mode}: sparsejax {m['total_s']:.3f} s (factor "
                f"{m['factor_s']:.3f}, solve {m['solve_s']:.3f}, select {m['select_s']:.3f}; "
                f"compile {m['compile_s']:.1f} s; {frac:.3f} of peak)")
        flat.update({f"{key}_s": round(m["total_s"], 5), f"{key}_compile_s": round(m["compile_s"], 2),
                     **{f"{key}_{p}_s": round(m[f"{p}_s"], 5) for p in ("factor", "solve", "select")},
                     f"{key}_fraction_of_peak": round(frac, 4)})
        if has_ref:
            line += (f" | reference {m['ref_total_s']:.3f} s (factor {m['ref_factor_s']:.3f}, "
                     f"solve {m['ref_solve_s']:.3f}, select {m['ref_select_s']:.3f}) | ratio "
                     f"{m['ratio']:.2f} (cpu {m['cpu_ratio']:.2f}) | error ratio "
                     f"{m['ref_error_over_error']:.4f}, masks agree {m['mask_agreement']:.5f}")
            flat.update({f"{key}_ref_s": round(m["ref_total_s"], 5),
                         **{f"{key}_ref_{p}_s": round(m[f"ref_{p}_s"], 5)
                            for p in ("factor", "solve", "select")},
                         f"{key}_ratio": round(m["ratio"], 2),
                         f"{key}_cpu_ratio": round(m["cpu_ratio"], 2),
                         f"{key}_ref_error_over_error": round(m["ref_error_over_error"], 4),
                         f"{key}_mask_agreement": round(m["mask_agreement"], 5)})
        print(line)
    wanda = r["wanda_stats_s"] + r["wanda_select_s"]
    print(f"[{d} x {d}] Wanda {wanda:.3f} s (stats {r['wanda_stats_s']:.3f} s, select "
          f"{r['wanda_select_s']:.3f} s)")
    flat[f"wanda_s_{d}"] = round(wanda, 4)
    return flat


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="sequences per accumulation call")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--reference", default=None,
                   help="a checkout of github.com/IST-DASLab/sparsegpt: time it beside")
    p.add_argument("--core", type=int, default=None, help="the core to pin to")
    p.add_argument("--all_cores", action="store_true", help="no pinning")
    p.add_argument("--model", default="", help="also prune a whole random-init model (gin)")
    args = p.parse_args(argv)
    bad = [d for d in args.dims if d % BLOCK]
    if bad:
        raise ValueError(f"--dims={bad}: each must be a multiple of the block size {BLOCK}")
    if args.samples % args.batch:
        raise ValueError(f"--samples={args.samples} must be a multiple of --batch={args.batch}")
    ref_cls = None if args.reference is None else load_reference(args.reference)
    pinned = "all cores" if args.all_cores else f"pinned to core {pin_one_core(args.core)}"
    dev = jax.devices()[0]
    device = (f"{dev.platform}:{dev.device_kind} x{jax.device_count()} ({os.cpu_count()} "
              f"cores, {platform.processor() or platform.machine()}; {pinned})")
    print(f"device: {device}")
    peak = matmul_peak()
    layers = [layer_costs(d, args, ref_cls) for d in args.dims]
    peak = max(peak, matmul_peak())  # the best of before and after (a shared machine)
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    out = {"device": device, "matmul_peak_gflops": round(peak / 1e9, 1),
           "torch": None if ref_cls is None else torch.__version__, "jax": jax.__version__}
    for r in layers:
        out.update(report(r, peak, ref_cls is not None))
    if args.model:
        w = whole_model(args.model, args.samples)
        print(f"whole model {w['model']} ({w['sparsegpt_layers']} kernels, {w['samples']} x "
              f"{w['seq_len']} calibration tokens): SparseGPT {w['sparsegpt_s']:.1f} s, Wanda "
              f"{w['wanda_s']:.1f} s")
        out.update({f"whole_model_{k}": round(v, 1) for k, v in w.items() if k.endswith("_s")})
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
