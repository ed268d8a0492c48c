"""Streaming float64 statistics (SPEC §3): the merge law, batch-size invariance, cancellation, non-finite rows.

Every expected value is computed here by plain two-pass numpy (centre explicitly, then the Gram product),
never by the package's own merge.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nrc_audit.core.stats import (
    Accumulator,
    JointAccumulator,
    LayerStatistics,
    Moments,
    batch_moments,
    merge,
)

PINNED = settings(derandomize=True, database=None, deadline=None, max_examples=80)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def two_pass(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean (p,), centred scatter (p, p)) by the textbook two-pass route, float64."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    xc = x - mean  # (n, p)
    return x.shape[0], mean, xc.T @ xc


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got − want| / max |want| (norm-wise relative: off-diagonals may be ≈ 0)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = np.abs(want).max()
    return float(np.abs(got - want).max() / scale) if scale > 0 else float(np.abs(got).max())


def assert_moments_close(m: Moments, want: tuple[int, np.ndarray, np.ndarray], rtol: float = 1e-10) -> None:
    n, mean, scatter = m.to_numpy()
    w_n, w_mean, w_scatter = want
    assert n == w_n
    assert mean.dtype == np.float64 and scatter.dtype == np.float64
    spread = float(np.sqrt(np.abs(np.diag(w_scatter)).max() / max(w_n, 1)))
    assert np.abs(mean - w_mean).max() <= rtol * (np.abs(w_mean).max() + spread)
    assert rel_err(scatter, w_scatter) <= rtol


def stream(x: np.ndarray, batch: int) -> Accumulator:
    acc = Accumulator()
    for i in range(0, len(x), batch):
        acc.update(torch.from_numpy(x[i : i + batch]))
    return acc


# ----------------------------------------------------------------------------- batch moments and merge


def test_batch_moments_matches_two_pass():
    x = np.random.default_rng(0).standard_normal((40, 5)) * [1, 10, 0.1, 3, 1e3] + [0, -2, 5, 1e2, 7]
    assert_moments_close(batch_moments(torch.from_numpy(x)), two_pass(x), rtol=1e-13)


def test_batch_moments_docstring_example():
    m = batch_moments(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    assert (m.n, m.mean.tolist(), m.scatter.tolist()) == (2, [2.0, 4.0], [[2.0, 4.0], [4.0, 8.0]])


def test_float32_batches_are_multiplied_in_float64():
    """float32 input must give exactly the statistics of the same values promoted to float64 first."""
    x32 = (np.random.default_rng(1).standard_normal((64, 4)) * 300 + 1e3).astype(np.float32)
    a = batch_moments(torch.from_numpy(x32))
    b = batch_moments(torch.from_numpy(x32.astype(np.float64)))
    assert a.mean.dtype == torch.float64 and a.scatter.dtype == torch.float64
    assert torch.equal(a.mean, b.mean) and torch.equal(a.scatter, b.scatter)


def test_merge_law_two_halves():
    x = np.random.default_rng(2).standard_normal((57, 6)) * 4 + 20
    a, b = x[:23], x[23:]
    merged = merge(batch_moments(torch.from_numpy(a)), batch_moments(torch.from_numpy(b)))
    assert_moments_close(merged, two_pass(x))
    whole = batch_moments(torch.from_numpy(x)).to_numpy()
    assert rel_err(merged.to_numpy()[2], whole[2]) <= 1e-10


def test_merge_is_symmetric_and_associative():
    x = np.random.default_rng(3).standard_normal((90, 4)) * 7 - 3
    parts = [batch_moments(torch.from_numpy(x[s])) for s in (slice(0, 11), slice(11, 50), slice(50, 90))]
    left = merge(merge(parts[0], parts[1]), parts[2])
    right = merge(parts[0], merge(parts[1], parts[2]))
    swapped = merge(parts[2], merge(parts[1], parts[0]))
    for m in (left, right, swapped):
        assert_moments_close(m, two_pass(x))


def test_merge_none_and_empty_are_identities():
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((9, 3)))
    m = batch_moments(x)
    empty = Moments(0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))
    assert merge(None, None) is None
    assert merge(None, m) is m
    assert merge(m, None) is m
    assert merge(empty, m) is m
    assert merge(m, empty) is m
    # a 0-row batch (its mean is NaN) must not poison the state either
    zero_rows = batch_moments(x[:0])
    assert zero_rows.n == 0
    assert merge(zero_rows, m) is m and merge(m, zero_rows) is m


def test_merge_does_not_mutate_its_inputs():
    rng = np.random.default_rng(5)
    a = batch_moments(torch.from_numpy(rng.standard_normal((5, 2))))
    b = batch_moments(torch.from_numpy(rng.standard_normal((6, 2)) + 3))
    before = [t.clone() for t in (a.mean, a.scatter, b.mean, b.scatter)]
    merge(a, b)
    for t, t0 in zip((a.mean, a.scatter, b.mean, b.scatter), before):
        assert torch.equal(t, t0)


@PINNED
@given(
    n=st.integers(1, 60),
    p=st.integers(1, 8),
    split=st.floats(0.0, 1.0),
    log_scale=st.floats(-3.0, 4.0),
    offset=st.floats(-5.0, 5.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_merge_law_property(n, p, split, log_scale, offset, seed):
    """merge(moments(A), moments(B)) == moments(A ∪ B) to 1e-10 relative, any split (incl. empty sides)."""
    scale = 10.0**log_scale
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) + offset) * scale  # (n, p)
    cut = int(round(split * n))
    a, b = torch.from_numpy(x[:cut]), torch.from_numpy(x[cut:])
    merged = merge(batch_moments(a) if cut else None, batch_moments(b) if cut < n else None)
    assert_moments_close(merged, two_pass(x))
    whole = batch_moments(torch.from_numpy(x)).to_numpy()[2]
    assert rel_err(merged.to_numpy()[2], whole) <= 1e-10


@PINNED
@given(
    n=st.integers(2, 60),
    p=st.integers(1, 8),
    cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
    log_scale=st.floats(-3.0, 4.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_sharded_accumulators_merge_to_the_single_pass(n, p, cuts, log_scale, seed):
    """Any number of shards merged with merge_from equals one accumulator over all rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p)) * 10.0**log_scale + rng.standard_normal(p) * 10.0**log_scale
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    total = Accumulator()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        shard = stream(x[lo:hi], batch=3)
        total.merge_from(shard)
    assert_moments_close(total.moments, two_pass(x))


# ----------------------------------------------------------------------------- accumulators


def test_accumulator_ignores_empty_batches_and_empty_shards():
    x = np.random.default_rng(6).standard_normal((12, 3))
    acc = Accumulator()
    acc.update(torch.zeros(0, 3, dtype=torch.float64))
    assert acc.moments is None and acc.nonfinite_rows == 0
    acc.update(torch.from_numpy(x))
    acc.update(torch.zeros(0, 3, dtype=torch.float64))
    acc.merge_from(Accumulator())
    assert_moments_close(acc.moments, two_pass(x))
    fresh = Accumulator()
    fresh.merge_from(acc)
    assert_moments_close(fresh.moments, two_pass(x))


def test_merge_from_then_update_leaves_the_source_unchanged():
    rng = np.random.default_rng(7)
    x, more = rng.standard_normal((8, 2)), rng.standard_normal((5, 2)) + 4
    src = stream(x, batch=3)
    dst = Accumulator()
    dst.merge_from(src)
    dst.update(torch.from_numpy(more))
    assert_moments_close(src.moments, two_pass(x))
    assert_moments_close(dst.moments, two_pass(np.vstack([x, more])))



def test_float32_stream_equals_float64_stream_of_the_same_values():
    """Streaming float32 batches must promote before any arithmetic: bit-identical to float64 input."""
    x32 = (np.random.default_rng(17).standard_normal((45, 3)) * 1e-2 + 1e4).astype(np.float32)
    a, b = stream(x32, batch=8).moments, stream(x32.astype(np.float64), batch=8).moments
    assert a.mean.dtype == torch.float64 and a.scatter.dtype == torch.float64
    assert torch.equal(a.mean, b.mean) and torch.equal(a.scatter, b.scatter)
    assert_moments_close(a, two_pass(x32.astype(np.float64)), rtol=1e-9)


def test_snapshots_do_not_change_under_later_updates():
    rng = np.random.default_rng(18)
    feats, targets = rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
    acc = JointAccumulator(3)
    acc.update_pair(torch.from_numpy(feats[:6]), torch.from_numpy(targets[:6]))
    first, moments = acc.finalize(), acc.moments
    kept = (first.s_hh.copy(), moments.scatter.clone())
    acc.update_pair(torch.from_numpy(feats[6:]), torch.from_numpy(targets[6:]))
    np.testing.assert_array_equal(first.s_hh, kept[0])
    assert torch.equal(moments.scatter, kept[1])
    assert acc.finalize().n == 10 and first.n == 6

def _joint_data(seed: int = 8, n: int = 101, h: int = 6, t: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = np.maximum(rng.standard_normal((n, h)) @ rng.standard_normal((h, h)), 0.0) + 50.0  # ReLU-like
    targets = feats @ rng.standard_normal((h, t)) + rng.standard_normal((n, t))
    return feats, targets


def _joint_stream(feats: np.ndarray, targets: np.ndarray, batch: int) -> LayerStatistics:
    acc = JointAccumulator(feats.shape[1])
    for i in range(0, len(feats), batch):
        acc.update_pair(torch.from_numpy(feats[i : i + batch]), torch.from_numpy(targets[i : i + batch]))
    return acc.finalize()


def _assert_layer_stats_close(s: LayerStatistics, feats: np.ndarray, targets: np.ndarray, rtol: float) -> None:
    n, mean, scatter = two_pass(np.hstack([feats, targets]))
    h = feats.shape[1]
    assert s.n == n
    assert s.s_hh.shape == (h, h) and s.s_hy.shape == (h, targets.shape[1])
    assert s.s_yy.shape == (targets.shape[1],) * 2
    for got, want in (
        (s.mu_h, mean[:h]),
        (s.mu_y, mean[h:]),
        (s.s_hh, scatter[:h, :h]),
        (s.s_hy, scatter[:h, h:]),
        (s.s_yy, scatter[h:, h:]),
    ):
        assert got.dtype == np.float64
        assert rel_err(got, want) <= rtol


@pytest.mark.parametrize("batch", [1, 7, 101])
def test_joint_accumulator_batch_size_invariance(batch):
    feats, targets = _joint_data()
    _assert_layer_stats_close(_joint_stream(feats, targets, batch), feats, targets, rtol=1e-10)


@pytest.mark.parametrize("block_rows", [1, 4, 16])
@pytest.mark.parametrize("batch", [3, 7, 101])
def test_joint_accumulator_merges_small_blocks_exactly(monkeypatch, block_rows, batch):
    """Blocks of a few rows make the CPU kernel fold (Chan merge) many times per batch and across batches;
    the default block (4096 rows) would hold these 101 rows in one block and never merge."""
    from nrc_audit.core import kernels

    folds = []
    real = kernels.fold_block
    monkeypatch.setattr(kernels, "fold_block", lambda state, b, *rest: (folds.append(b), real(state, b, *rest))[1])
    feats, targets = _joint_data(seed=10)
    acc = JointAccumulator(feats.shape[1], block_rows=block_rows)
    for i in range(0, len(feats), batch):
        acc.update_pair(torch.from_numpy(feats[i : i + batch]), torch.from_numpy(targets[i : i + batch]))
    _assert_layer_stats_close(acc.finalize(), feats, targets, rtol=1e-10)
    assert len(folds) >= len(feats) // block_rows and max(folds) <= block_rows  # many blocks, none larger


def test_joint_accumulator_batch_sizes_agree_with_each_other():
    feats, targets = _joint_data(seed=9)
    runs = [_joint_stream(feats, targets, b) for b in (1, 7, len(feats))]
    for other in runs[1:]:
        for name in ("mu_h", "mu_y", "s_hh", "s_hy", "s_yy"):
            assert rel_err(getattr(other, name), getattr(runs[0], name)) <= 1e-10


def test_joint_accumulator_ignores_empty_batches():
    feats, targets = _joint_data(seed=19, n=12, h=3, t=2)
    acc = JointAccumulator(3)
    acc.update_pair(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64))
    acc.update_pair(torch.from_numpy(feats), torch.from_numpy(targets))
    acc.update_pair(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64))
    _assert_layer_stats_close(acc.finalize(), feats, targets, rtol=1e-12)


def test_joint_accumulator_accepts_1d_targets():
    """SPEC §1: Y may be (N,); it is treated as (N, 1)."""
    feats, targets = _joint_data(seed=20, n=15, h=3, t=1)
    acc = JointAccumulator(3)
    for i in range(0, 15, 4):
        acc.update_pair(torch.from_numpy(feats[i : i + 4]), torch.from_numpy(targets[i : i + 4, 0]))
    _assert_layer_stats_close(acc.finalize(), feats, targets, rtol=1e-12)


def test_joint_accumulator_ignores_empty_batch_with_1d_targets():
    """Regression: reshape(0, -1) of an empty 1-D target batch used to raise in update_pair."""
    acc = JointAccumulator(3)
    acc.update_pair(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    assert acc.nonfinite_rows == 0 and acc.moments is None


def test_joint_accumulator_finalize_without_rows_raises():
    with pytest.raises(ValueError, match="no rows were accumulated"):
        JointAccumulator(4).finalize()


def test_layer_statistics_blocks_split_at_h():
    feats, targets = _joint_data(seed=10, n=20, h=5, t=2)
    s = _joint_stream(feats, targets, batch=20)
    np.testing.assert_allclose(s.s_hy, (feats - feats.mean(0)).T @ (targets - targets.mean(0)), rtol=1e-12)
    np.testing.assert_allclose(s.mu_y, targets.mean(0), rtol=1e-14)


# ----------------------------------------------------------------------------- cancellation


def test_large_mean_small_spread_cancellation():
    """Mean 1e4, spread 1e-2 (float64 input): streamed scatter matches two-pass; the naive formula does not.

    The ratio mean²/variance is 1e12, so the uncentred route XᵀX − N μμᵀ subtracts two numbers of
    size N·1e8 to keep a difference of size N·1e-4: about 12 of float64's 16 digits cancel. SPEC §3 forbids
    that formula; this test documents why with numbers, and pins that the streamed (per-batch centred,
    Chan-merged) route keeps ≥ 9 digits for every batch size, down to 1 row per batch.
    """
    rng = np.random.default_rng(11)
    n, p = 500, 5
    x = 1e4 + 1e-2 * (rng.standard_normal((n, p)) @ rng.standard_normal((p, p)))  # (n, p) float64
    _, mean, want = two_pass(x)

    naive = x.T @ x - n * np.outer(mean, mean)
    naive_err = rel_err(naive, want)
    assert naive_err > 1e-6, f"naive uncentred formula unexpectedly accurate ({naive_err:.1e})"

    for batch in (1, 7, 64, n):
        acc = stream(x, batch)
        got = acc.moments.to_numpy()[2]
        err = rel_err(got, want)
        assert err < 1e-9, f"batch={batch}: streamed scatter relative error {err:.1e}"
        assert err < naive_err * 1e-3  # at least three more digits than the naive route


def test_large_mean_cancellation_through_joint_accumulator():
    rng = np.random.default_rng(12)
    feats = 1e4 + 1e-2 * rng.standard_normal((300, 4))
    targets = feats @ rng.standard_normal((4, 2)) - 1e4
    for batch in (1, 13, 300):
        _assert_layer_stats_close(_joint_stream(feats, targets, batch), feats, targets, rtol=1e-8)


# ----------------------------------------------------------------------------- non-finite rows


def test_nonfinite_rows_are_counted_once_per_row_across_batches():
    x = np.random.default_rng(13).standard_normal((20, 3))
    x[2, 0] = np.nan
    x[5, 1] = np.inf
    x[5, 2] = np.nan  # same row twice: counts once
    x[11, 2] = -np.inf
    x[19, :] = np.nan
    acc = stream(x, batch=4)
    assert acc.nonfinite_rows == 4
    assert acc.moments.n == 20


def test_nonfinite_rows_add_up_under_merge_from():
    rng = np.random.default_rng(14)
    a, b = rng.standard_normal((6, 2)), rng.standard_normal((7, 2))
    a[0, 0] = np.nan
    b[[1, 3], 1] = np.inf
    acc_a, acc_b = stream(a, 2), stream(b, 5)
    acc_a.merge_from(acc_b)
    assert acc_a.nonfinite_rows == 3
    assert acc_a.moments.n == 13


def test_joint_accumulator_reports_nonfinite_feature_rows():
    feats, targets = _joint_data(seed=15, n=30, h=4, t=2)
    feats[[3, 17, 18]] = np.nan
    s = _joint_stream(feats, targets, batch=8)
    assert s.nonfinite_rows == 3
    assert s.n == 30
    assert not np.isfinite(s.s_hh).all()


def test_finite_data_has_no_nonfinite_rows():
    feats, targets = _joint_data(seed=16, n=30, h=4, t=2)
    assert _joint_stream(feats, targets, batch=8).nonfinite_rows == 0
