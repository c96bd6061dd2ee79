"""CPU half-precision attention (models/half_attention.py): ``fp32_softmax_attention`` computes the math
kernel's fp32 forward, gets gradients right against fp64 (as does ``half_attention``), keeps no fp32 tensor
for backward, ignores autocast, is what ``Attention`` runs in bf16 on CPU, and traces as one graph."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from finealign.models.half_attention import fp32_softmax_attention, half_attention
from finealign.models.layers import Attention


def _inputs(seed=0, B=2, H=3, L=7, S=7, Dh=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, Dh, generator=g) for n in (L, S, S)]


def _reference(q, k, v, mask, is_causal):
    """softmax(q k^T / sqrt(d)) v in the inputs' dtype (fp32 or fp64), fully masked rows -> 0."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1).nan_to_num(0.0) @ v


def _masks():
    g = torch.Generator().manual_seed(5)
    pad = torch.rand(2, 1, 7, 7, generator=g) > 0.3
    pad[:, :, :, 0] = True
    pad[1, 0, 4] = False                                           # query 4 of sample 1 sees no key
    return ((None, False), (None, True), (pad, False))


def test_forward_is_the_fp32_computation_rounded_once():
    """Output = fp32 attention on the (exact) upcast bf16 inputs, rounded to bf16: within one bf16 ulp."""
    q, k, v = (t.bfloat16() for t in _inputs())
    for mask, causal in _masks():
        got = fp32_softmax_attention(q, k, v, mask, causal)
        want = _reference(q.float(), k.float(), v.float(), mask, causal)
        assert got.dtype == torch.bfloat16
        ulp = want.abs() * 2.0 ** -7 + 1e-30
        assert ((got.float() - want).abs() <= ulp).all(), (mask is None, causal)
    with sdpa_kernel(SDPBackend.MATH):                              # PyTorch's math kernel: the same to 1 ulp
        math_out = F.scaled_dot_product_attention(q, k, v).float()
    ours = fp32_softmax_attention(q, k, v, None, False).float()
    assert ((math_out - ours).abs() <= math_out.abs() * 2.0 ** -7).all()


def test_half_attention_against_its_definition_with_causal_and_padding_masks():
    """fp64 reference on the unrounded inputs; a query whose keys are all masked gives 0."""
    base = _inputs(seed=3)
    for mask, causal in _masks():
        want = _reference(*(t.double() for t in base), mask, causal)
        got = half_attention(*(t.bfloat16() for t in base), mask, causal)
        assert got.dtype == torch.bfloat16 and torch.allclose(got.double(), want, atol=0.06), (mask is None, causal)
        assert torch.isfinite(got).all()
    pad = _masks()[2][0]
    assert half_attention(*base, pad, False)[1, :, 4].abs().max() == 0


@pytest.mark.parametrize("attend", [fp32_softmax_attention, half_attention])
def test_gradients_against_fp64_autograd_and_fully_masked_rows_get_none(attend):
    base = _inputs(seed=1)
    grad = torch.randn(base[0].shape, generator=torch.Generator().manual_seed(2))
    for mask, causal in _masks():
        ref_in = [t.double().requires_grad_() for t in base]
        _reference(*ref_in, mask, causal).backward(grad.double())
        ins = [t.bfloat16().requires_grad_() for t in base]
        out = attend(*ins, mask, causal)
        out.backward(grad.bfloat16())
        for name, t, r in zip("qkv", ins, ref_in):
            assert t.grad.dtype == torch.bfloat16
            rel = (t.grad.double() - r.grad).abs().max() / r.grad.abs().max()
            assert rel < 0.03, (name, mask is None, causal, float(rel))
        if mask is not None:
            assert out[1, :, 4].abs().max() == 0 and ins[0].grad[1, :, 4].abs().max() == 0
            assert torch.isfinite(ins[1].grad).all() and torch.isfinite(ins[2].grad).all()


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def test_backward_keeps_no_fp32_tensor_and_less_than_the_math_kernel():
    q, k, v = (t.bfloat16().requires_grad_() for t in _inputs(L=33, S=33, Dh=64))
    ours = _saved(lambda: fp32_softmax_attention(q, k, v, None, False))
    with sdpa_kernel(SDPBackend.MATH):
        theirs = _saved(lambda: F.scaled_dot_product_attention(q, k, v))
    assert ours and all(t.dtype == torch.bfloat16 for t in ours)
    assert any(t.dtype == torch.float32 for t in theirs)              # the math kernel keeps fp32 copies

    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}

    def extra_bytes(ts):                          # beyond q, k, v themselves (alive anyway in a model)
        kept = {t.untyped_storage().data_ptr(): t for t in ts}
        return sum(t.numel() * t.element_size() for p, t in kept.items() if p not in inputs)
    # ours: output + probabilities in bf16; math: fp32 q, k, v and fp32 weights (observed 0.22x)
    assert extra_bytes(ours) < 0.3 * extra_bytes(theirs)


def test_autocast_does_not_lower_the_fp32_products():
    q, k, v = (t.bfloat16().requires_grad_() for t in _inputs(seed=3))
    plain = fp32_softmax_attention(q, k, v, None, True)
    plain.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fp32_softmax_attention(q, k, v, None, True)
        auto.sum().backward()
    assert torch.equal(auto, plain)
    assert all(torch.equal(t.grad, g) for t, g in zip((q, k, v), grads))


def test_attention_module_runs_it_in_bf16_on_cpu_and_half_attention_when_asked():
    torch.manual_seed(0)
    att = Attention(64, 4).bfloat16()
    x = torch.randn(3, 9, 64).bfloat16()
    saved = _saved(lambda: att(x, is_causal=True))
    assert not any(t.dtype == torch.float32 for t in saved)           # the default path keeps no fp32 copy
    with torch.no_grad():
        q, k, v = att.qkv(x).view(3, 9, 3, 4, 16).permute(2, 0, 3, 1, 4)
        want = att.proj(fp32_softmax_attention(q, k, v, None, True).transpose(1, 2).reshape(3, 9, 64))
        assert torch.equal(att(x, is_causal=True), want)
        att.low_precision = True
        assert not torch.equal(att(x, is_causal=True), want)


def test_traces_as_one_graph_for_torch_compile():
    """``train.compile`` compiles each block: the half-precision path has no data-dependent branch, so dynamo
    captures a block with causal or padding masks whole (backend="eager": tracing only, no code generation)."""
    import torch._dynamo
    from finealign.models.layers import Block
    torch.manual_seed(0)
    block = Block(32, 4)
    x = torch.randn(2, 5, 32)
    pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    pad[1, ..., 3:] = False
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kw in ({"is_causal": True}, {"mask": pad}):
            assert torch.equal(compiled(x, **kw), block(x, **kw))
