"""Forward and backward passes of the layers the shipped models use, in numpy, float32.

Each forward returns its output and what its backward needs; each backward takes the gradient of the loss
with respect to the output (same shape) and returns the gradients with respect to the input and the
parameters. Conventions are torch's: images are N x C x H x W, a Linear weight is [out, in], a Conv2d weight
is [out, in, kh, kw]. Per-channel sums reduce along a contiguous axis first (numpy's pairwise summation),
which keeps float32 round-off at the level of torch's own reductions.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


# --- Linear ------------------------------------------------------------------------------------------------

def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x [N, in] @ weight[out, in]^T + bias [out] -> [N, out]."""
    return x @ weight.T + bias


def linear_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray,
                    need_dx: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(dx [N, in] or None, dweight [out, in], dbias [out]) from dy [N, out]."""
    return (dy @ weight if need_dx else None), dy.T @ x, dy.sum(axis=0)


# --- Conv2d (im2col: one strided view, one copy, one matmul) -----------------------------------------------

class ConvCache(NamedTuple):
    cols: np.ndarray  # [N * Ho * Wo, C * kh * kw], patch entries in the weight's (c, i, j) order
    x_shape: tuple[int, int, int, int]
    stride: int
    padding: int


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int = 1,
           padding: int = 0) -> tuple[np.ndarray, ConvCache]:
    """x [N, C, H, W], weight [O, C, kh, kw], bias [O] -> y [N, O, Ho, Wo] (zero padding, no dilation)."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding))) if padding else x
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
    y = cols @ weight.reshape(o, -1).T + bias  # [N * Ho * Wo, O]
    return np.ascontiguousarray(y.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)), ConvCache(cols, x.shape, stride,
                                                                                            padding)


def conv2d_backward(dy: np.ndarray, cache: ConvCache, weight: np.ndarray,
                    need_dx: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(dx [N, C, H, W] or None, dweight [O, C, kh, kw], dbias [O]) from dy [N, O, Ho, Wo]."""
    n, c, h, w = cache.x_shape
    o, _, kh, kw = weight.shape
    _, _, ho, wo = dy.shape
    s, p = cache.stride, cache.padding
    dy2 = dy.transpose(0, 2, 3, 1).reshape(n * ho * wo, o)
    dweight = (dy2.T @ cache.cols).reshape(weight.shape)
    dbias = channel_sum(dy)
    if not need_dx:
        return None, dweight, dbias
    dcols = (dy2 @ weight.reshape(o, -1)).reshape(n, ho, wo, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)
    dxp = np.zeros((n, c, h + 2 * p, w + 2 * p), dtype=dy.dtype)
    for i in range(kh):  # col2im: scatter-add each kernel offset's contributions (kh * kw strided adds)
        for j in range(kw):
            dxp[:, :, i:i + s * ho:s, j:j + s * wo:s] += dcols[:, :, i, j]
    return dxp[:, :, p:p + h, p:p + w], dweight, dbias


# --- BatchNorm2d -------------------------------------------------------------------------------------------

def channel_sum(a: np.ndarray) -> np.ndarray:
    """Per-channel sum of a [N, C, ...] array -> [C]."""
    return a.reshape(a.shape[0], a.shape[1], -1).sum(axis=2).sum(axis=0)


def _channel(v: np.ndarray) -> np.ndarray:
    return v.reshape(1, -1, 1, 1)


class BatchNormCache(NamedTuple):
    x_hat: np.ndarray  # [N, C, H, W], the normalised input
    inv_std: np.ndarray  # [C], 1 / sqrt(batch variance + eps)


def batch_norm_train(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, running_mean: np.ndarray,
                     running_var: np.ndarray, momentum: float = BN_MOMENTUM,
                     eps: float = BN_EPS) -> tuple[np.ndarray, BatchNormCache, np.ndarray, np.ndarray]:
    """Training mode, as torch: normalise x [N, C, H, W] by the batch mean and the biased batch variance
    (per channel, over N * H * W values); returns (y, cache, new running_mean [C], new running_var [C]),
    the running statistics moved by `momentum` towards the batch mean and the unbiased batch variance."""
    count = x.size // x.shape[1]
    if count < 2:
        raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel, got input {x.shape}")
    mean = channel_sum(x) / count
    centred = x - _channel(mean)
    var = channel_sum(centred * centred) / count
    inv_std = 1 / np.sqrt(var + eps)
    x_hat = centred * _channel(inv_std)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * (var * (count / (count - 1)))
    return x_hat * _channel(weight) + _channel(bias), BatchNormCache(x_hat, inv_std), new_mean, new_var


def batch_norm_backward(dy: np.ndarray, cache: BatchNormCache,
                        weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx [N, C, H, W], dweight [C], dbias [C]) of training-mode BatchNorm (batch statistics depend on x)."""
    count = dy.size // dy.shape[1]
    dbias = channel_sum(dy)
    dweight = channel_sum(dy * cache.x_hat)
    scale = _channel(weight * cache.inv_std)
    dx = scale * (dy - _channel(dbias / count) - cache.x_hat * _channel(dweight / count))
    return dx, dweight, dbias


def batch_norm_eval(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, running_mean: np.ndarray,
                    running_var: np.ndarray, eps: float = BN_EPS) -> np.ndarray:
    """Evaluation mode: x [N, C, H, W] normalised by the running statistics."""
    scale = weight / np.sqrt(running_var + eps)
    return x * _channel(scale) + _channel(bias - running_mean * scale)


# --- ReLU ----------------------------------------------------------------------------------------------------

def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def relu_backward(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dx from dy and the forward output y (gradient 0 where y <= 0, as torch's threshold_backward)."""
    return np.where(y > 0, dy, 0).astype(dy.dtype, copy=False)


# --- losses --------------------------------------------------------------------------------------------------

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of [N, C]."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [N, C]."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def log_softmax_backward(dlogp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """dlogits from dlogp, both [N, C]: dlogp - softmax * rowsum(dlogp)."""
    return dlogp - np.exp(logp) * dlogp.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[np.float32, np.ndarray]:
    """Mean cross-entropy of logits [N, C] against int labels [N]; returns (loss, dloss/dlogits [N, C])."""
    n = len(labels)
    logp = log_softmax(logits)
    rows = np.arange(n)
    loss = -logp[rows, labels].sum() / n
    dlogp = np.zeros_like(logp)
    dlogp[rows, labels] = -1 / n
    return loss, log_softmax_backward(dlogp, logp)


def cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> np.float32:
    """Summed cross-entropy (no gradient), for evaluation."""
    return -log_softmax(logits)[np.arange(len(labels)), labels].sum()


def kl_div_batchmean(logits: np.ndarray, target: np.ndarray) -> tuple[np.float32, np.ndarray]:
    """torch.nn.functional.kl_div(log_softmax(logits), target, reduction="batchmean"):
    sum(target * (log target - log_softmax(logits))) / N with 0 log 0 = 0, for logits and target
    probabilities [N, C]; returns (loss, dloss/dlogits [N, C]). The target is a constant."""
    n = len(logits)
    logp = log_softmax(logits)
    entropy_part = np.where(target > 0, target * np.log(np.where(target > 0, target, 1)), 0)
    loss = (entropy_part - target * logp).sum() / n
    return loss, log_softmax_backward(-target / n, logp)
