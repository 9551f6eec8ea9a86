import pytest

from speculor.analysis import (
    alpha_from_counts,
    alpha_from_tar,
    cost_ratio,
    expected_accepted_length,
    expected_tar,
    optimal_gamma,
    predicted_speedup,
)
from speculor.errors import SpeculorError


@pytest.mark.parametrize(
    ("alpha", "gamma", "expected"),
    [(0.5, 2, 1.75), (0.8, 4, 3.3616), (1.0, 4, 5.0), (0.0, 4, 1.0), (0.7, 0, 1.0), (0.9, 1, 1.9)],
)
def test_expected_accepted_length_by_hand(alpha, gamma, expected):
    # E = (1 - α^(γ+1)) / (1 - α), e.g. (1 - 0.8^5) / 0.2 = 0.67232 / 0.2 = 3.3616.
    assert expected_accepted_length(alpha, gamma) == pytest.approx(expected)


def test_predicted_speedup_by_hand():
    assert predicted_speedup(0.8, 4, 0.1) == pytest.approx(3.3616 / 1.4)
    assert predicted_speedup(1.0, 3, 0.0) == pytest.approx(4.0)
    assert predicted_speedup(0.0, 2, 0.5) == pytest.approx(0.5)


def test_optimal_gamma_by_hand():
    # α = 0.8, c = 0.1: γ = 5, 6, 7 give 3.68928/1.5 = 2.4595, 3.951424/1.6 = 2.4696, 4.1611392/1.7 = 2.4477.
    assert optimal_gamma(0.8, 0.1) == 6
    assert optimal_gamma(0.8, 0.1, gammas=[1, 2, 4]) == 4
    assert optimal_gamma(0.0, 0.0) == 1
    assert optimal_gamma(1.0, 0.0, gammas=range(1, 9)) == 8


def test_alpha_from_tar_inverts_expected_tar():
    # α = 0.5, γ = 2: TAR = (E − 1) / γ = 0.75 / 2 = 0.375.
    assert expected_tar(0.5, 2) == pytest.approx(0.375)
    assert alpha_from_tar(0.375, 2) == pytest.approx(0.5)
    assert alpha_from_tar(0.5904, 4) == pytest.approx(0.8)
    assert alpha_from_tar(0.42, 1) == pytest.approx(0.42)
    assert alpha_from_tar(1.0, 3) == pytest.approx(1.0)
    assert alpha_from_tar(0.0, 3) == pytest.approx(0.0)


def test_alpha_from_counts_and_cost_ratio():
    assert alpha_from_counts(6, 2) == pytest.approx(0.75)
    assert alpha_from_counts(0, 0) == 0.0
    # 2 s over 100 draft steps = 20 ms; 5 s over 50 target steps = 100 ms.
    assert cost_ratio(2.0, 100, 5.0, 50) == pytest.approx(0.2)


def test_out_of_range_inputs_raise():
    with pytest.raises(SpeculorError, match="alpha"):
        expected_accepted_length(1.5, 2)
    with pytest.raises(SpeculorError, match="cost ratio"):
        predicted_speedup(0.5, 2, -1)
    with pytest.raises(SpeculorError, match="TAR"):
        alpha_from_tar(1.2, 2)
    with pytest.raises(SpeculorError, match="timed"):
        cost_ratio(1.0, 0, 1.0, 1)
