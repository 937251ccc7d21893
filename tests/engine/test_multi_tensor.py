"""The multi-tensor helpers against plain per-tensor torch: the gate of a discarded step's
gradients, the parts that bound a temporary, ASAM's factor, adaptive alpha's cosine, and the
per-tensor reductions with mixed dtypes."""

from __future__ import annotations

import pytest
import torch

from hf_lookbehind.engine.alpha import adaptive_alpha
from hf_lookbehind.engine.multi_tensor import (
    in_parts,
    local_square_sums,
    per_tensor_norms,
    scratch_like,
    select_,
    zero_nonfinite_,
)
from hf_lookbehind.engine.perturbation import _scale_by_asam_factor_

SPECIALS = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -3.5, 2.0**100]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_a_kept_gradient_is_bit_identical_and_a_discarded_one_is_zero(dtype):
    generator = torch.Generator().manual_seed(0)
    grads = [
        torch.tensor(SPECIALS).to(dtype),
        torch.randn(3, 4, generator=generator).to(dtype).t(),  # not contiguous
        torch.randn((), generator=generator).to(dtype),
    ]
    before = [g.clone() for g in grads]
    zero_nonfinite_(grads, torch.ones((), dtype=dtype))
    for g, b in zip(grads, before):
        assert torch.equal(_bits(g), _bits(b))  # NaN payloads and -0.0 included
    zero_nonfinite_(grads, torch.zeros((), dtype=dtype))
    for g in grads:
        assert torch.equal(_bits(g), torch.zeros_like(_bits(g)))  # +0.0 everywhere


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_select_takes_either_list_bit_for_bit(dtype):
    """Where ``take`` is set the targets become the sources, else they stay, NaN payloads,
    infinities and -0.0 included on both sides."""
    generator = torch.Generator().manual_seed(1)
    specials = torch.tensor(SPECIALS).to(dtype)
    for take in (False, True):
        targets = [specials.clone(), torch.randn(3, 4, generator=generator).to(dtype).t()]
        sources = [specials.flip(0).clone(), torch.randn(3, 4, generator=generator).to(dtype).t()]
        expected = [(s if take else t).clone() for t, s in zip(targets, sources)]
        select_(targets, sources, torch.tensor(take))
        for got, want in zip(targets, expected):
            assert torch.equal(_bits(got), _bits(want))


def test_mixed_dtypes_are_gated_together():
    grads = [torch.tensor([float("nan"), 1.0]), torch.tensor([2.0], dtype=torch.float64)]
    zero_nonfinite_(grads, torch.zeros(()))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize(
    "sizes",
    [[5] * 8, [100, 1, 1, 1], [1, 1, 1, 100], [0, 0], [3], [], [10] * 110, list(range(1, 10))],
)
@pytest.mark.parametrize("parts", [1, 2, 4])
def test_parts_cover_every_tensor_once_and_bound_the_temporary(sizes, parts):
    tensors = [torch.empty(n) for n in sizes]
    runs = list(in_parts(tensors, parts))
    assert [i for run in runs for i in range(run.start, run.stop)] == list(range(len(sizes)))
    assert len(runs) <= parts and all(run.stop > run.start for run in runs)
    for run in runs:
        assert sum(sizes[run][:-1]) * parts <= sum(sizes)  # a share, plus its last tensor


def test_scratch_is_one_buffer_per_dtype_shaped_like_the_tensors():
    tensors = [torch.ones(2, 3), torch.ones(4, dtype=torch.float64), torch.ones(()), torch.ones(5)]
    scratch = scratch_like(tensors)
    assert [(s.shape, s.dtype) for s in scratch] == [(t.shape, t.dtype) for t in tensors]
    storages = {s.dtype: set() for s in scratch}
    for s in scratch:
        storages[s.dtype].add(s.untyped_storage().data_ptr())
    assert all(len(pointers) == 1 for pointers in storages.values())


def test_asam_factor_equals_the_per_tensor_product_bit_for_bit():
    generator = torch.Generator().manual_seed(1)
    params = [torch.randn(n, generator=generator) for n in (7, 300, 1, 40, 41)]
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    scaled = [True, True, False, True, True]
    expected = [g * (p.abs() + 0.01) if s else g.clone() for p, g, s in zip(params, grads, scaled)]
    _scale_by_asam_factor_(params, grads, scaled, 0.01)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_adaptive_alpha_is_the_cosine_of_eq_8(scope):
    generator = torch.Generator().manual_seed(2)
    first = [torch.randn(n, generator=generator, dtype=torch.float64) for n in (5, 1, 30)]
    last = [2 * f + 0.3 * torch.randn(f.shape, generator=generator, dtype=f.dtype) for f in first]
    first.append(torch.zeros(4, dtype=torch.float64))  # a tensor that did not move
    last.append(torch.zeros(4, dtype=torch.float64))
    flat = [torch.cat(first), torch.cat(last)] if scope == "global" else None
    pairs = [flat] if flat else list(zip(first, last))
    expected = torch.stack([
        (torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-8) + 1) / 2 for a, b in pairs
    ])  # fmt: skip
    alpha = adaptive_alpha([f.clone() for f in first], last, scope)
    torch.testing.assert_close(alpha.reshape(-1), expected, rtol=0, atol=1e-14)
    if scope == "per_tensor":
        assert alpha[-1] == 0.5


def test_per_tensor_reductions_keep_the_order_of_mixed_dtypes():
    tensors = [
        torch.full((4,), 2.0, dtype=torch.bfloat16),
        torch.full((9,), 1.0, dtype=torch.float64),
        torch.full((1,), 3.0),
    ]
    norms = per_tensor_norms(tensors)
    assert norms.dtype == torch.float64 and norms.tolist() == [4.0, 3.0, 3.0]
    squares = local_square_sums(tensors)
    assert [s.item() for s in squares] == [16.0, 9.0, 9.0]
    assert {s.dtype for s in squares} == {torch.float64}
