"""Converted models under torch DDP and FSDP2 ``fully_shard``: 2 gloo processes on localhost.

One run per group of recipes (:data:`QUICK`, :data:`SLOW`) spawns ``tests/_dist_worker.py``
twice (``gloo``, a ``file://`` rendezvous in tmp, ``OMP_NUM_THREADS=1``, killed and failed after
:data:`TIMEOUT_S`; skipped with the reason where the gloo group cannot start): per recipe,
3 SGD steps of a 2-block pre-norm transformer (d = 64, 13 converted ``nn.Linear``), each rank
on one half of a fixed global batch of 4 × 64 tokens (128 tokens per rank). Rank 0 also trains
one process on the whole batch, rank 1 one process accumulating the gradients of the same two
halves. Oracles:

* the two ranks: bit-identical parameters (all-gathered) after training;
* one process accumulating the halves' gradients (loss / 2 each): bit-identical step-0 gradients
  and parameters for *every* recipe, DDP and FSDP2 alike — a rank quantizes exactly what that
  micro-batch quantizes in one process, and ``g0/2 + g1/2`` is the same sum in either;
* one process on the whole batch: float32 reduction-order noise for the split-invariant recipes
  (bound :data:`NOISE_EPS` ulps of each tensor's largest value), a measured bound for local
  per-tensor amax (TENSORWISE, BNB_GLOBAL), whose scale is that of the rank's micro-batch.

docs/numerics.md §10 states what holds and the figures measured here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import fp8core.recipe  # noqa: E402
import fp8core_torch  # noqa: E402
from fp8core import reference as R  # noqa: E402
from fp8core.reference import operand_scales  # noqa: E402

import _dist_worker  # noqa: E402  (tests/ is on sys.path, as for _torch_helpers)

# one 2-process run per group (~8 s of start-up + ~3 s a case on 2 cores): the quick set has
# one split-invariant and one local-amax recipe; BNB_GLOBAL gives TENSORWISE's bits (§9.4)
QUICK = ("ROWWISE", "TENSORWISE", "TENSORWISE+amax")
SLOW = ("BLOCKWISE_1x128", "mixed", "BNB_GLOBAL", "BNB_GLOBAL+amax")
CASES = QUICK + SLOW
SPLIT_INVARIANT = ("ROWWISE", "BLOCKWISE_1x128", "mixed")
LOCAL_AMAX = ("TENSORWISE", "BNB_GLOBAL")
#: per-tensor recipes with amax_reduction=WORLD on the ranks (§10.2)
REDUCED = tuple(c for c in CASES if c.endswith(_dist_worker.REDUCED))

MODES = ("ddp", "fsdp")
WORLD = 2
TIMEOUT_S = 180          # one 2-process run (measured 11-25 s on 2 shared cores)
EPS32 = 2.0 ** -23
# float32 sums of ≤ 256 products in another order (one GEMM over 256 tokens vs two over 128
# then an all-reduce): measured ≤ 5.5 ulps of each gradient tensor's largest value, ≤ 2.9 for
# the parameters after 3 steps; asserted with margin.
NOISE_EPS = 32
# local per-tensor amax, measured: step-0 gradients 0.165 × max|g| (per tensor, worst),
# parameters after 3 steps 0.10 × the largest update of the tensor.
LOCAL_AMAX_GRAD_BOUND = 0.5
LOCAL_AMAX_PARAM_BOUND = 0.5
WORKER = Path(__file__).with_name("_dist_worker.py")
REPO = WORKER.parent.parent


def _params(cases):
    """pytest params of ``cases``, those of :data:`SLOW` marked slow."""
    return [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in cases]


@pytest.fixture(scope="module")
def run_cache():
    return {}


@pytest.fixture
def runs(run_cache, tmp_path_factory, case):
    """Both ranks' results (``[rank0, rank1]``) of the 2-process run of ``case``'s group (run
    once per module; its skip or failure is repeated, not re-run, for the other tests)."""
    group = QUICK if case in QUICK else SLOW
    if group not in run_cache:
        try:
            run_cache[group] = ("ok", _spawn(tmp_path_factory, group))
        except pytest.skip.Exception as e:
            run_cache[group] = ("skip", str(e))
        except pytest.fail.Exception as e:
            run_cache[group] = ("fail", str(e))
    kind, value = run_cache[group]
    if kind == "skip":
        pytest.skip(value)
    if kind == "fail":
        pytest.fail(value, pytrace=False)
    return value


def _spawn(tmp_path_factory, cases):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("torch.distributed has no gloo backend in this build")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    init = (out / "rendezvous").as_uri()
    procs, logs = [], []
    try:
        for rank in range(WORLD):
            log = open(out / f"log{rank}.txt", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(rank), str(WORLD), init, str(out),
                 ",".join(cases)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    except OSError as e:
        for p in procs:
            p.kill()
        pytest.skip(f"cannot spawn worker processes: {e}")
    deadline, timed_out, killed = time.monotonic() + TIMEOUT_S, False, set()
    while True:
        codes = [p.poll() for p in procs]
        if None not in codes:
            break
        failed = any(c not in (None, 0) for c in codes)   # a rank died: its peer would wait
        timed_out = time.monotonic() > deadline
        if failed or timed_out:
            for r, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    p.wait()
                    killed.add(r)
            codes = [p.returncode for p in procs]
            break
        time.sleep(0.1)
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read()[-3000:])
        log.close()
    if codes != [0] * WORLD:
        # a rank that ran (imports fine) but exited by itself before its process group was up
        no_group = [r for r in range(WORLD) if r not in killed and codes[r] != 0
                    and (out / f"imported{r}").exists() and not (out / f"started{r}").exists()]
        if no_group and not timed_out:
            pytest.skip(f"gloo process group could not start on localhost (exit codes {codes}): "
                        f"{texts[no_group[0]][-800:]}")
        why = f" (killed after {TIMEOUT_S} s)" if timed_out else ""
        pytest.fail(f"2-process gloo run failed{why}, exit codes {codes}:\n"
                    + "\n---\n".join(texts))
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _mode(runs, case, mode):
    if mode == "fsdp" and runs[0]["_no_fsdp"]:
        pytest.skip(runs[0]["_no_fsdp"])
    return [r[case][mode] for r in runs]


def _max_rel(a: dict, b: dict, scale: dict) -> tuple[float, str]:
    """Largest max|a − b| / max|scale| over the tensors, and which tensor."""
    return max((((a[n] - b[n]).abs().max() / scale[n].abs().max()).item(), n) for n in a)


def _assert_bits(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    diff = [n for n in a if not torch.equal(a[n], b[n])]
    assert not diff, f"{what}: tensors differ: {diff[:5]} (max |Δ| " \
                     f"{max((a[n] - b[n]).abs().max().item() for n in diff):.3g})"


@pytest.mark.parametrize("case", CASES)  # in-process, quick for every case
def test_converted_model_has_no_buffers(case):
    """Codebooks and format constants are not module state: nothing for DDP's
    ``broadcast_buffers`` to send each step (checked after a forward/backward too)."""
    model = _dist_worker.make_model(case)
    fp8 = [m for m in model.modules() if isinstance(m, fp8core_torch.LinearFP8)]
    assert len(fp8) == 13, [type(m).__name__ for m in model.modules()]
    x, _ = _dist_worker.global_batch()
    model(x[:1, :16]).square().mean().backward()
    assert [n for m in fp8 for n, _ in m.named_buffers()] == []
    assert list(model.buffers()) == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", _params(CASES))
def test_ranks_bit_identical(runs, case, mode):
    r0, r1 = _mode(runs, case, mode)
    both = r0["all_params"]                      # rank 0's all_gather of both ranks' params
    _assert_bits(both[0], both[1], f"{mode} {case}: rank 0 vs rank 1 (all_gather)")
    _assert_bits(r0["params"], r1["params"], f"{mode} {case}: rank files")
    _assert_bits(r0["params"], both[0], f"{mode} {case}: all_gather vs local")
    assert runs[0][case]["buffers"] == [] == runs[1][case]["buffers"]
    assert runs[0][case]["fp8_layers"] == 13
    # the ranks really saw different data (different local losses)
    assert r0["loss0"].item() != r1["loss0"].item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", _params([c for c in CASES if c not in REDUCED]))
def test_equals_one_process_accumulating_the_halves(runs, case, mode):
    """Every recipe, local amax included: a rank's micro-batch quantizes as it would in one
    process, so DDP / FSDP2 == gradient accumulation over the same halves, bit for bit."""
    r0, _ = _mode(runs, case, mode)
    accum = runs[-1][case]["accum"]
    _assert_bits(r0["grads0"], accum["grads0"], f"{mode} {case}: step-0 gradients")
    _assert_bits(r0["params"], accum["params"], f"{mode} {case}: parameters after 3 steps")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", _params(SPLIT_INVARIANT + REDUCED))
def test_split_invariant_recipes_equal_whole_batch(runs, case, mode):
    """Float32 summation order only. REDUCED: with ``amax_reduction`` the per-tensor recipes
    become split-invariant — the scale is the whole batch's (each rank's dY is 2× the whole
    batch's for its tokens, a mean over half the elements, so its amax and scale differ by
    exactly 2 and the codes are the same)."""
    r0, _ = _mode(runs, case, mode)
    single = runs[0][case]["single"]
    g, gname = _max_rel(r0["grads0"], single["grads0"], single["grads0"])
    p, pname = _max_rel(r0["params"], single["params"], single["params"])
    assert g <= NOISE_EPS * EPS32, f"step-0 gradient {gname}: {g / EPS32:.1f} ulps of its max"
    assert p <= NOISE_EPS * EPS32, f"parameter {pname}: {p / EPS32:.1f} ulps of its max"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", _params(LOCAL_AMAX))
def test_local_amax_recipes_within_bound_of_whole_batch(runs, case, mode):
    """Per-tensor scales are each rank's micro-batch amax: not split-invariant (far above
    reduction noise) but within the stated bound."""
    r0, _ = _mode(runs, case, mode)
    single = runs[0][case]["single"]
    g, gname = _max_rel(r0["grads0"], single["grads0"], single["grads0"])
    update = {n: single["params"][n] - single["init"][n] for n in single["params"]}
    p, pname = _max_rel(r0["params"], single["params"], update)
    assert 1e4 * EPS32 < g <= LOCAL_AMAX_GRAD_BOUND, f"step-0 gradient {gname}: {g:.3g} of its max"
    assert p <= LOCAL_AMAX_PARAM_BOUND, f"parameter {pname}: {p:.3g} of its largest update"


@pytest.mark.parametrize("case", _params(REDUCED))
def test_reduced_amax_operands_are_the_whole_batch_codes(runs, case):
    """Every FP8 layer's step-0 input, quantized on each rank as its ``input`` slot does with
    the all-reduced amax (gloo), is bit for bit the reference's codes of the whole batch's
    input (the ranks' inputs stacked in batch order)."""
    r0, r1 = (r[case]["ddp"] for r in runs)
    assert len(r0["inputs0"]) == 13
    rule = fp8core.recipe.get_recipe(case[:-len(_dist_worker.REDUCED)]).input
    local_differs = 0
    for name, x0 in r0["inputs0"].items():
        x1 = r1["inputs0"][name]
        whole = torch.cat([x0, x1]).numpy()
        want, _ = R.quantize_operand(whole, rule)
        got = torch.cat([r0["reduced_codes0"][name], r1["reduced_codes0"][name]]).numpy()
        assert np.array_equal(got, want), name
        # the rank without the batch's largest |x| would quantize other codes on its own
        local = np.concatenate([R.quantize_operand(x.numpy(), rule)[0] for x in (x0, x1)])
        local_differs += not np.array_equal(local, want)
    assert local_differs == 13


def _split(x, rule, at):
    """The wgrad operand X (tokens × K, contraction over the tokens, axis 0) quantized as one
    process does (whole) and as two ranks do (halves, concatenated)."""
    whole = fp8core_torch.fake_quantize_operand(x, rule, axis=0)
    halves = torch.cat([fp8core_torch.fake_quantize_operand(x[:at], rule, axis=0),
                        fp8core_torch.fake_quantize_operand(x[at:], rule, axis=0)])
    return whole, halves


def _qscale(x, rule):
    _, absmax = fp8core_torch.quantize_operand(x, rule, axis=0)
    return torch.from_numpy(np.asarray(operand_scales(absmax.numpy(), rule)[0])).reshape(1, -1)


def _wgrad_input():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 64, generator=g)
    x[128:, ::2] *= 16            # even features: the second half's amax 16× the first's
    x[::5] *= 1e-4                # tiny values, in e4m3's subnormal range under some scales
    return x


def test_rowwise_wgrad_operand_depends_on_split_only_below_e4m3_normal_range():
    """ROWWISE's wgrad operands are axiswise over the *tokens* (one scale per feature column):
    the split changes a column's scale when the halves' amax fall in other binades. The scale is
    a power of two, so an element whose scaled value is in e4m3's normal range (≥ 2**-6, no
    saturation) rounds to the same value under either scale; only elements below it can change."""
    rule = fp8core.recipe.ROWWISE.input_for_grad_weight
    x = _wgrad_input()
    whole, halves = _split(x, rule, 128)
    q_whole = _qscale(x, rule)
    q_half = torch.cat([_qscale(x[:128], rule).expand(128, -1),
                        _qscale(x[128:], rule).expand(128, -1)])
    normal = lambda q: ((x.abs() * q) >= 2.0 ** -6) & ((x.abs() * q) <= 448)  # noqa: E731
    both_normal = normal(q_whole) & normal(q_half)
    assert not torch.equal(q_half, q_whole.expand(256, -1))          # the split moved scales
    assert torch.equal(whole[both_normal], halves[both_normal])
    differ = whole != halves
    assert differ.any()                                               # and some bits
    assert not (differ & both_normal).any()
    same_scale = (q_half == q_whole).all(0)
    assert same_scale.any() and not differ[:, same_scale].any()


def test_blockwise_wgrad_operand_split_invariant_on_block_boundary():
    """BLOCKWISE_1x128's wgrad operands are 1×128 blocks along the tokens: a split on a block
    boundary (128 tokens per rank here) gives the same groups, scales and bits."""
    rule = fp8core.recipe.BLOCKWISE_1x128.input_for_grad_weight
    whole, halves = _split(_wgrad_input(), rule, 128)
    assert torch.equal(whole, halves)
    whole, halves = _split(_wgrad_input(), rule, 64)                  # off the boundary
    assert not torch.equal(whole, halves)


def test_tensorwise_operand_depends_on_split():
    """A local per-tensor float32 scale moves every element's rounding."""
    rule = fp8core.recipe.TENSORWISE.input_for_grad_weight
    whole, halves = _split(_wgrad_input(), rule, 128)
    assert (whole != halves).float().mean().item() > 0.3
