"""Unusual tensors: gradients on mixed devices are reduced on the accelerator, complex
parameters are measured like ``clip_grad_norm_``, and ``AdaptiveGradClip`` clips a sparse
embedding gradient in place."""

from __future__ import annotations

import pytest
import torch

from lightning_gradguard.core import GuardCore
from lightning_gradguard.core.guard import Action
from lightning_gradguard.core.norms import grad_norms
from lightning_gradguard.core.policies import AdaptiveGradClip

NAN = float("nan")


def test_mixed_cpu_accelerator_norm_is_reduced_on_the_accelerator() -> None:
    # 'meta' stands in for an accelerator: the device choice is what is tested on CPU
    grads = [torch.ones(3), torch.ones(4, device="meta")]
    norms = grad_norms(grads)
    assert norms.total.device.type == "meta"
    assert norms.per_tensor is not None
    assert norms.per_tensor.device.type == "meta"
    assert grad_norms([torch.ones(3), torch.ones(2)]).total.device.type == "cpu"


def test_complex_parameters_are_measured_like_clip_grad_norm() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    opt = torch.optim.SGD([w], lr=0.1)
    guard = GuardCore([w], opt)
    (w.abs() ** 2).sum().backward()
    expected = float(torch.nn.utils.get_total_norm([w.grad]))
    report = guard.step()
    assert report.finite
    assert report.grad_norm == pytest.approx(expected, rel=1e-6)
    w.grad = torch.full_like(w, complex(NAN, 0.0))
    assert guard.step().action is Action.SKIP


def test_adaptive_grad_clip_with_sparse_embedding() -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    guard = GuardCore(emb, opt, clip=AdaptiveGradClip(clipping=0.01))
    (emb(torch.tensor([1, 2, 2])).sum() * 100).backward()
    grad = emb.weight.grad
    report = guard.step()
    assert report.action is Action.CLIP
    assert emb.weight.grad is grad  # clipped in place
    dense = grad.to_dense()
    limit = 0.01 * emb.weight.detach().norm(dim=1).clamp_min(1e-3)
    assert bool((dense.norm(dim=1) <= limit * 1.0001).all())
    assert report.grad_norm_clipped == pytest.approx(float(dense.norm()), rel=1e-5)
