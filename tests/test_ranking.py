import math

import pytest
import torch

from client.ranking import intra_list_diversity, mmr, utility


def test_mmr_hand_built_case():
    u = torch.tensor([1.0, 0.9, 0.5])
    vectors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # items 0 and 1 are the same, 2 differs
    assert mmr(u, vectors, k=3, diversity=0.0, pool=10) == [0, 1, 2]
    # lambda 0.5: pick 0 (0.5); then item 1 scores 0.45 - 0.5 = -0.05, item 2 scores 0.25 - 0 -> 2; then 1
    assert mmr(u, vectors, k=3, diversity=0.5, pool=10) == [0, 2, 1]
    assert mmr(u, vectors, k=2, diversity=0.0, pool=10) == [0, 1]


def test_mmr_threshold_by_hand():
    # second pick: item 1 scores (1-l)*0.9 - l*1, item 2 scores (1-l)*0.5; equal at l = 0.4/1.4 = 0.2857
    u = torch.tensor([1.0, 0.9, 0.5])
    vectors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert mmr(u, vectors, k=2, diversity=0.28, pool=10) == [0, 1]
    assert mmr(u, vectors, k=2, diversity=0.29, pool=10) == [0, 2]


def test_lambda_zero_is_plain_top_k():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(500, generator=g)
    vectors = torch.nn.functional.normalize(torch.randn(500, 8, generator=g), dim=-1)
    assert mmr(u, vectors, k=25, diversity=0.0, pool=100) == torch.argsort(u, descending=True)[:25].tolist()


def test_excluded_items_never_returned_and_k_capped():
    u = torch.tensor([0.3, -math.inf, 0.9, -math.inf])
    vectors = torch.eye(4)
    assert mmr(u, vectors, k=10, diversity=0.3, pool=10) == [2, 0]


def test_utility_weights_and_value_term():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    assert torch.equal(utility(probs, torch.tensor([1.0, 0.0])), probs[:, 0])
    assert torch.equal(utility(probs, torch.tensor([0.0, 2.0])), probs[:, 1])
    torch.testing.assert_close(utility(probs, torch.tensor([1.0, 3.0])), probs[:, 0] * 0.25 + probs[:, 1] * 0.75)
    values = torch.tensor([10.0, 30.0, math.nan])  # scaled to 0, 1, unknown -> 0
    torch.testing.assert_close(utility(probs, torch.tensor([1.0, 0.0]), values, 0.5), torch.tensor([0.9, 0.7, 0.5]))
    # candidates of a larger catalog whose values span [0, 40]: scaled 0.25, 0.75, unknown -> 0
    scaled = utility(probs, torch.tensor([1.0, 0.0]), values, 0.5, bounds=(0.0, 40.0))
    torch.testing.assert_close(scaled, torch.tensor([1.025, 0.575, 0.5]))
    with pytest.raises(ValueError, match="sum to a positive number"):
        utility(probs, torch.tensor([0.0, 0.0]))


def test_intra_list_diversity():
    assert intra_list_diversity(torch.eye(3)) == pytest.approx(1.0)
    assert intra_list_diversity(torch.ones(3, 2) / math.sqrt(2)) == pytest.approx(0.0, abs=1e-6)
