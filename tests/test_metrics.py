import math

import numpy as np
import pytest
import torch

from shared.metrics import expected_metrics, ranking_metrics

L2 = math.log2


@pytest.mark.parametrize(
    ("greater", "equal", "hr", "ndcg", "mrr"),
    [
        (0, 0, 1.0, 1.0, 1.0),  # first place
        (1, 0, 1.0, 1 / L2(3), 0.5),  # second place
        (9, 0, 1.0, 1 / L2(11), 0.1),  # tenth place: still a hit
        (10, 0, 0.0, 0.0, 1 / 11),  # eleventh place: a miss
        (0, 3, 1.0, (1 + 1 / L2(3) + 1 / L2(4) + 1 / L2(5)) / 4, (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4),  # 4-way tie at top
        (8, 3, 0.5, (1 / L2(10) + 1 / L2(11)) / 4, (1 / 9 + 1 / 10 + 1 / 11 + 1 / 12) / 4),  # tie across the cut
        (20, 5, 0.0, 0.0, sum(1 / r for r in range(21, 27)) / 6),
    ],
)
def test_expected_metrics_hand_computed(greater, equal, hr, ndcg, mrr):
    out = expected_metrics(np.array([greater]), np.array([equal]))
    assert out["hr@10"][0] == pytest.approx(hr, abs=1e-12)
    assert out["ndcg@10"][0] == pytest.approx(ndcg, abs=1e-12)
    assert out["mrr"][0] == pytest.approx(mrr, abs=1e-12)


def test_ranking_metrics_from_scores():
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.3], [1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([1, 2])
    out = ranking_metrics(scores, targets)
    # user 0: rank 2 (0-based 1); user 1: 4-way tie
    assert out["mrr"] == pytest.approx((0.5 + (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4) / 2)
    assert out["ndcg@10"] == pytest.approx((1 / L2(3) + (1 + 1 / L2(3) + 1 / L2(4) + 1 / L2(5)) / 4) / 2)
    assert out["hr@10"] == 1.0


def test_ties_never_favour_the_target():
    constant = torch.zeros(1, 1000)
    out = ranking_metrics(constant, torch.tensor([0]))
    assert out["hr@10"] == pytest.approx(10 / 1000)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="scores must be"):
        ranking_metrics(torch.zeros(3), torch.tensor([0]))
    with pytest.raises(ValueError, match="no users"):
        ranking_metrics(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize(
    ("labels", "scores", "auc", "mrr", "ndcg5"),
    [
        ([1, 0, 0], [0.9, 0.5, 0.1], 1.0, 1.0, 1.0),
        ([0, 1, 0], [0.9, 0.5, 0.1], 0.5, 0.5, 1 / L2(3)),
        ([1, 0], [0.5, 0.5], 0.5, 0.75, (1 + 1 / L2(3)) / 2),  # a tie counts in expectation
        ([1, 0, 1], [0.1, 0.9, 0.5], 0.0, (1 / 2 + 1 / 3) / 2, (1 / L2(3) + 1 / L2(4)) / (1 + 1 / L2(3))),
    ],
)
def test_impression_metrics_hand_computed(labels, scores, auc, mrr, ndcg5):
    from shared.metrics import impression_metrics

    out = impression_metrics([np.array(labels)], [np.array(scores)])
    assert out["auc"] == pytest.approx(auc) and out["mrr"] == pytest.approx(mrr)
    assert out["ndcg@5"] == pytest.approx(ndcg5)


def test_impression_without_a_click_is_an_error():
    from shared.metrics import impression_metrics

    with pytest.raises(ValueError, match="at least one clicked"):
        impression_metrics([np.array([0, 0])], [np.array([0.1, 0.2])])
