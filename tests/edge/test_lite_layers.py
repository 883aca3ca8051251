"""edge_client.lite.layers against torch autograd, layer by layer: forward outputs and the gradients of a
random upstream gradient with respect to the inputs and the parameters.

Tolerance: every output is compared as max |lite - torch| <= RTOL * max |torch| per array (plus a 1e-30 floor
for an all-zero reference), RTOL = 2e-5. Both sides compute in float32 (unit round-off 6e-8) but sum in
different orders (BLAS blocking, torch's vectorised reductions vs numpy's pairwise sums); on sums of up to a
few thousand terms that leaves errors of some 1e-7 to 1e-6 of the largest value, observed at most ~1e-6 here.
2e-5 keeps a margin of more than 10x over that while any real mistake (a wrong index, a missing term, a
biased instead of an unbiased variance) is off by 1e-3 or more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_client.lite import layers as L
from edge_client.lite.model import Flatten

RTOL = 2e-5


def close(lite: np.ndarray, ref: torch.Tensor | np.ndarray, rtol: float = RTOL, scale: float | None = None) -> None:
    """max |lite - ref| <= rtol * scale, scale max |ref| unless given (for a result that cancels to ~0)."""
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert lite.dtype == np.float32, lite.dtype
    assert lite.shape == ref.shape, (lite.shape, ref.shape)
    err = float(np.abs(lite - ref).max(initial=0))
    scale = float(np.abs(ref).max(initial=0)) if scale is None else scale
    assert err <= rtol * scale + 1e-30, f"max error {err:.3e} vs scale {scale:.3e}"


def arr(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def leaf(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy()).requires_grad_(True)


@pytest.mark.parametrize("n,fan_in,fan_out", [(1, 1, 1), (1, 7, 3), (5, 13, 2), (32, 784, 200), (3, 32, 10)])
def test_linear(n: int, fan_in: int, fan_out: int) -> None:
    rng = np.random.default_rng(n * 1000 + fan_in)
    x, w, b, dy = arr(rng, n, fan_in), arr(rng, fan_out, fan_in), arr(rng, fan_out), arr(rng, n, fan_out)
    tx, tw, tb = leaf(x), leaf(w), leaf(b)
    ty = F.linear(tx, tw, tb)
    ty.backward(torch.from_numpy(dy))
    close(L.linear(x, w, b), ty)
    dx, dw, db = L.linear_backward(dy, x, w)
    close(dx, tx.grad), close(dw, tw.grad), close(db, tb.grad)
    assert L.linear_backward(dy, x, w, need_dx=False)[0] is None


CONV_CASES = [  # n, c, h, w, out, kernel, stride, padding
    (1, 1, 28, 28, 6, 3, 2, 1),  # the cnn's first layer, batch 1
    (4, 6, 14, 14, 16, 3, 2, 1),  # the cnn's second layer
    (2, 3, 9, 7, 4, 3, 1, 0),  # odd sizes, no padding
    (1, 2, 11, 13, 3, 5, 3, 2),  # stride 3, padding 2, odd H != W
    (3, 1, 5, 5, 2, 1, 1, 0),  # 1x1 kernel
    (2, 3, 8, 10, 5, 4, 2, 1),  # even kernel
    (1, 1, 4, 4, 1, 3, 2, 1),  # tiny
]


@pytest.mark.parametrize("n,c,h,w,o,k,s,p", CONV_CASES)
def test_conv2d(n: int, c: int, h: int, w: int, o: int, k: int, s: int, p: int) -> None:
    rng = np.random.default_rng(h * 100 + w * 10 + k)
    x, weight, bias = arr(rng, n, c, h, w), arr(rng, o, c, k, k), arr(rng, o)
    tx, tw, tb = leaf(x), leaf(weight), leaf(bias)
    ty = F.conv2d(tx, tw, tb, stride=s, padding=p)
    dy = arr(rng, *ty.shape)
    ty.backward(torch.from_numpy(dy))
    y, cache = L.conv2d(x, weight, bias, s, p)
    close(y, ty)
    assert y.flags.c_contiguous
    dx, dw, db = L.conv2d_backward(dy, cache, weight)
    close(dx, tx.grad), close(dw, tw.grad), close(db, tb.grad)
    assert L.conv2d_backward(dy, cache, weight, need_dx=False)[0] is None


def _torch_bn(c: int, weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray) -> torch.nn.Module:
    bn = torch.nn.BatchNorm2d(c)  # eps 1e-5, momentum 0.1: the cnn's
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(weight)), bn.bias.copy_(torch.from_numpy(bias))
        bn.running_mean.copy_(torch.from_numpy(mean)), bn.running_var.copy_(torch.from_numpy(var))
    return bn


@pytest.mark.parametrize("n,c,h,w", [(32, 6, 14, 14), (1, 16, 7, 7), (1, 3, 1, 2), (5, 1, 3, 5), (2, 7, 1, 1)])
def test_batch_norm_train(n: int, c: int, h: int, w: int) -> None:
    rng = np.random.default_rng(n + 10 * c + 100 * h)
    x = arr(rng, n, c, h, w, scale=3.0) + 1.5  # mean and scale far from 0 and 1
    weight, bias, dy = arr(rng, c), arr(rng, c), arr(rng, n, c, h, w)
    mean, var = arr(rng, c), rng.uniform(0.5, 2.0, c).astype(np.float32)
    bn = _torch_bn(c, weight, bias, mean, var).train()
    tx = leaf(x)
    ty = bn(tx)
    ty.backward(torch.from_numpy(dy))
    y, cache, new_mean, new_var = L.batch_norm_train(x, weight, bias, mean, var)
    close(y, ty), close(new_mean, bn.running_mean), close(new_var, bn.running_var)
    dx, dweight, dbias = L.batch_norm_backward(dy, cache, weight)
    # dx is a difference of terms of size |weight * inv_std * dy|; with 2 values per channel it cancels to 0
    # exactly (the output no longer depends on x), so it is compared at the scale of those terms
    terms = float(np.abs(dy * (weight * cache.inv_std).reshape(1, -1, 1, 1)).max())
    close(dx, tx.grad, scale=max(terms, float(tx.grad.abs().max())))
    close(dweight, bn.weight.grad), close(dbias, bn.bias.grad)
    # the running variance takes the unbiased batch variance, the normalisation the biased one
    count = n * h * w
    unbiased = x.transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64).var(axis=1, ddof=1)
    np.testing.assert_allclose(new_var, 0.9 * var + 0.1 * unbiased, rtol=1e-5)
    assert count > 1


def test_batch_norm_train_refuses_one_value_per_channel() -> None:
    x = np.ones((1, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match="more than 1 value"):
        L.batch_norm_train(x, np.ones(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32),
                           np.ones(3, np.float32))
    with pytest.raises(ValueError):  # torch refuses it too
        torch.nn.BatchNorm2d(3).train()(torch.from_numpy(x))


@pytest.mark.parametrize("n,c,h,w", [(9, 6, 14, 14), (1, 16, 7, 7), (3, 1, 2, 5)])
def test_batch_norm_eval(n: int, c: int, h: int, w: int) -> None:
    rng = np.random.default_rng(c * h)
    x, weight, bias = arr(rng, n, c, h, w, scale=2.0), arr(rng, c), arr(rng, c)
    mean, var = arr(rng, c), rng.uniform(0.1, 3.0, c).astype(np.float32)
    bn = _torch_bn(c, weight, bias, mean, var).eval()
    with torch.no_grad():
        close(L.batch_norm_eval(x, weight, bias, mean, var), bn(torch.from_numpy(x)))


@pytest.mark.parametrize("shape", [(1, 1), (4, 6, 5, 3), (32, 200)])
def test_relu(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    x, dy = arr(rng, *shape), arr(rng, *shape)
    x.flat[::3] = 0.0  # exact zeros: torch's gradient there is 0
    tx = leaf(x)
    ty = F.relu(tx)
    ty.backward(torch.from_numpy(dy))
    y = L.relu(x)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_array_equal(L.relu_backward(dy, y), tx.grad.numpy())
    assert L.relu_backward(dy, y).dtype == np.float32


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 16, 7, 7), (2, 1, 28, 28)])
def test_flatten(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = arr(rng, *shape)
    tx = leaf(x)
    ty = torch.nn.Flatten()(tx)
    dy = arr(rng, *ty.shape)
    ty.backward(torch.from_numpy(dy))
    y, cache = Flatten().forward({}, x, True)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_array_equal(Flatten().backward({}, cache, dy, True)[0], tx.grad.numpy())


@pytest.mark.parametrize("n,c,scale", [(1, 2, 1.0), (32, 10, 1.0), (7, 10, 30.0), (64, 3, 0.01)])
def test_softmax_and_log_softmax(n: int, c: int, scale: float) -> None:
    logits = arr(np.random.default_rng(n), n, c, scale=scale)
    close(L.softmax(logits), F.softmax(torch.from_numpy(logits), dim=1))
    close(L.log_softmax(logits), F.log_softmax(torch.from_numpy(logits), dim=1))


@pytest.mark.parametrize("n,c,scale", [(1, 2, 1.0), (32, 10, 1.0), (7, 10, 30.0), (5, 3, 0.01)])
def test_cross_entropy(n: int, c: int, scale: float) -> None:
    rng = np.random.default_rng(n + c)
    logits, labels = arr(rng, n, c, scale=scale), rng.integers(0, c, n)
    t = leaf(logits)
    loss = F.cross_entropy(t, torch.from_numpy(labels))
    loss.backward()
    lite_loss, dlogits = L.cross_entropy(logits, labels)
    close(np.asarray(lite_loss), loss)
    close(dlogits, t.grad, scale=1 / n)  # (softmax - onehot) / n: terms of size 1 / n that may cancel
    close(np.asarray(L.cross_entropy_sum(logits, labels)),
          F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), reduction="sum"))


@pytest.mark.parametrize("n,c,scale", [(1, 2, 1.0), (32, 10, 1.0), (7, 10, 20.0), (5, 3, 0.01)])
def test_kl_div_batchmean(n: int, c: int, scale: float) -> None:
    rng = np.random.default_rng(n * c)
    logits = arr(rng, n, c, scale=scale)
    target = L.softmax(arr(rng, n, c, scale=3.0))
    target[0] = 0.0
    target[0, -1] = 1.0  # a one-hot row: 0 log 0 = 0, no NaN
    t = leaf(logits)
    loss = F.kl_div(F.log_softmax(t, dim=1), torch.from_numpy(target), reduction="batchmean")
    loss.backward()
    lite_loss, dlogits = L.kl_div_batchmean(logits, target)
    assert np.isfinite(lite_loss) and lite_loss.dtype == np.float32
    close(np.asarray(lite_loss), loss)
    close(dlogits, t.grad)
