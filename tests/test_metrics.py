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


def test_auc_with_ties_across_several_clicks_hand_computed():
    from shared.metrics import impression_metrics

    # clicks score 0.5, 0.2; non-clicks 0.5, 0.2, 0.1: pairs (6) won 1 (0.5>0.2) + 1 (0.5>0.1) + 1 (0.2>0.1),
    # tied 0.5=0.5 and 0.2=0.2 count 1/2 each -> (3 + 1) / 6
    out = impression_metrics([np.array([1, 0, 1, 0, 0])], [np.array([0.5, 0.5, 0.2, 0.2, 0.1])])
    assert out["auc"] == pytest.approx(4 / 6)
    # MRR: first click at rank 1 or 2 (1/2 each), second at rank 3 or 4 -> mean of the clicks' expectations
    assert out["mrr"] == pytest.approx(((1 + 1 / 2) / 2 + (1 / 3 + 1 / 4) / 2) / 2)
    # a constant scorer is exactly chance, whatever the labels
    flat = impression_metrics([np.array([1, 1, 0, 0, 0, 0])], [np.zeros(6)])
    assert flat["auc"] == 0.5


def test_history_masking_hand_computed():
    from shared.metrics import mask_seen

    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    target = torch.tensor([3])
    assert ranking_metrics(scores, target)["mrr"] == pytest.approx(1 / 4)
    masked = mask_seen(scores, [np.array([0, 2])], target)  # two items above the target were seen
    assert masked[0].tolist() == pytest.approx([-math.inf, 0.8, -math.inf, 0.6, 0.5]) and scores[0, 0] > 0.8  # a copy
    assert ranking_metrics(masked, target)["mrr"] == pytest.approx(1 / 2)
    # a repeat (the target was seen before) is never masked away
    assert ranking_metrics(mask_seen(scores, [np.array([0, 3])], target), target)["mrr"] == pytest.approx(1 / 3)


def test_ild_and_coverage_hand_computed():
    from client.evaluation import beyond_accuracy

    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    # list 1: items 0, 1 (orthogonal): ILD 1; list 2: items 0, 2 (identical): ILD 0
    out = beyond_accuracy(torch.tensor([[0, 1], [0, 2]]), vectors, num_items=4)
    assert out["ild@10"] == pytest.approx(0.5) and out["coverage@10"] == pytest.approx(3 / 4)
    # three items: pairwise cosines 0, 0.6, 0.8 -> ILD 1 - 1.4 / 3
    assert beyond_accuracy(torch.tensor([[0, 1, 3]]), vectors, 4)["ild@10"] == pytest.approx(1 - 1.4 / 3)
