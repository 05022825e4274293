"""causvid.eval.toy_eval.flow_matching_loss: the fixed-noise, fixed-t loss used to compare a teacher's fit on its
training latents with held-out ones (docs/results.md), against a hand computation."""

import pytest
import torch

from causvid.eval.toy_eval import flow_matching_loss
from causvid.models.dit import WanDiT
from causvid.models.registry import dit_config


def _inputs(n=5):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 2, 4, 4, 4, generator=g), torch.randn(n, 8, 24, generator=g)  # x0 [N,F,C,h,w], ctx [N,L,D]


def test_flow_matching_loss_is_the_mean_over_items_of_the_hand_loss():
    torch.manual_seed(0)
    model = WanDiT(dit_config("tiny")).eval()
    x0, ctx = _inputs()
    got = flow_matching_loss(model, x0, ctx, (250, 800), seed=7, batch_size=2)  # batches of 2, 2, 1
    assert list(got) == [250.0, 800.0]
    for tv in (250, 800):
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7 + tv))
        sigma = tv / 1000.0
        per_item = []
        for i in range(x0.shape[0]):  # one item at a time: x_t = (1 - sigma) x0 + sigma eps, target eps - x0
            x_t = (1 - sigma) * x0[i:i + 1] + sigma * eps[i:i + 1]
            with torch.no_grad():
                v = model(x_t, torch.tensor([float(tv)]), ctx[i:i + 1])
            per_item.append(((v - (eps[i:i + 1] - x0[i:i + 1])) ** 2).mean())
        assert abs(got[float(tv)] - float(torch.stack(per_item).mean())) < 1e-5
    # the batch size does not change the value; another seed (other noise) does
    assert flow_matching_loss(model, x0, ctx, (250,), seed=7, batch_size=16)[250.0] == pytest.approx(got[250.0], rel=1e-5)
    assert flow_matching_loss(model, x0, ctx, (250,), seed=8)[250.0] != got[250.0]

