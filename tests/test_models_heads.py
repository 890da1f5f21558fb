"""Projection heads: the weight-normalised last layer, running normalisation, fp32 under autocast."""

import pytest
import torch

from glmae.models.heads import ProjectionHead, RunningNorm


def test_the_last_layers_norm_stays_fixed_through_an_optimiser_step():
    torch.manual_seed(0)
    head = ProjectionHead(16, 32, 10, bottleneck=8)
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.5)  # a strong pull on every weight
    raw = head.last.weight.detach().clone()
    for _ in range(3):
        head(torch.randn(6, 16)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(head.last.weight, raw)  # the directions moved ...
    torch.testing.assert_close(head.last_weight().norm(dim=1), torch.ones(10))  # ... their norms did not
    assert head(torch.randn(5, 16)).abs().max() <= 1 + 1e-5  # cosines


def test_without_norm_last_the_last_layer_is_a_plain_linear_layer():
    head = ProjectionHead(16, 32, 10, bottleneck=8, norm_last=False)
    assert head.last_weight() is head.last.weight
    old = ProjectionHead(16, 32, 10, bottleneck=0, norm="batch")
    assert old.last is None and old(torch.randn(4, 16)).shape == (4, 10)


def test_a_frozen_last_layer_gets_no_gradient_while_the_rest_does():
    torch.manual_seed(0)
    head = ProjectionHead(16, 32, 10, bottleneck=8)
    head(torch.randn(6, 16), train_last=torch.zeros(())).sum().backward()
    assert torch.count_nonzero(head.last.weight.grad) == 0
    assert torch.count_nonzero(head.mlp[0].weight.grad) > 0


def test_running_norm_output_depends_only_on_its_own_input():
    torch.manual_seed(0)
    norm = RunningNorm(4, momentum=0.5)
    for _ in range(5):
        norm(torch.randn(8, 4) * 3 + 2)  # statistics of past batches
    x = torch.randn(1, 4)
    alone = norm.eval()(x)
    with_others = norm(torch.cat([x, 100 * torch.randn(7, 4)]))[:1]
    torch.testing.assert_close(alone, with_others)
    norm.train()
    before = norm.running_mean.clone()
    torch.testing.assert_close(norm(torch.cat([x, torch.randn(7, 4)]))[:1], alone)  # past statistics only
    assert not torch.equal(norm.running_mean, before)  # then updated


def test_running_norm_standardises_by_the_running_statistics():
    norm = RunningNorm(3, momentum=1.0)  # the statistics become the last batch's
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 6.0, 3.0]])
    norm(x)
    torch.testing.assert_close(norm.running_mean, torch.tensor([2.0, 4.0, 3.0]))
    torch.testing.assert_close(norm.running_var, torch.tensor([1.0, 4.0, 0.0]))
    torch.testing.assert_close(norm.eval()(x)[:, :2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("norm", ["running", "batch", "none"])
def test_the_head_computes_in_fp32_under_autocast(norm):
    torch.manual_seed(0)
    head = ProjectionHead(16, 32, 10, bottleneck=8, norm=norm).eval()  # no statistics moving between calls
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head(x.bfloat16().float()))


def test_an_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="running, batch, none"):
        ProjectionHead(16, 32, 10, norm="layer")
