import numpy as np
import pytest

from slimx.export import ParityTolerance, check_parity, compare_outputs


def test_compare_outputs_figures():
    ref = [np.array([3.0, 4.0], dtype=np.float32)]
    got = [np.array([3.0, 4.1], dtype=np.float32)]
    stats = compare_outputs(ref, got)
    assert stats["max_abs"] == pytest.approx(0.1, rel=1e-5)
    assert stats["rel_err"] == pytest.approx(0.1 / 5.0, rel=1e-5)
    assert stats["cosine"] == pytest.approx((9 + 16.4) / (5 * np.hypot(3, 4.1)), rel=1e-9)


def test_compare_outputs_refuses_mismatched_structure():
    with pytest.raises(ValueError, match="outputs"):
        compare_outputs([np.ones(2)], [np.ones(2), np.ones(2)])
    with pytest.raises(ValueError, match="sizes differ"):
        compare_outputs([np.ones(2)], [np.ones(3)])


def test_check_parity_takes_the_worst_batch_and_applies_the_tolerance():
    batches = [(0,), (1,), (2,)]
    ref = lambda b: [np.ones(8)]  # noqa: E731
    noisy = lambda b: [np.ones(8) + (0.5 if b[0] == 2 else 0.0)]  # noqa: E731
    result = check_parity(ref, noisy, batches, "test", ParityTolerance(min_cosine=0.999, max_rel_err=1e-3))
    assert result.n_inputs == 3 and result.max_abs == pytest.approx(0.5)
    assert not result.passed
    ok = check_parity(ref, ref, batches, "test", ParityTolerance())
    assert ok.passed and ok.cosine == pytest.approx(1.0) and ok.max_abs == 0.0
