"""Top-k support ids with the contract's tie rule, without a full sort and without a host sync.

The support is the first k entries of a *stable* descending sort of the ranking side's logits:
among entries equal to the k-th largest, the lower vocabulary ids are in the support.
``torch.topk`` leaves the choice among such ties unspecified (bf16 logits tie often), and a
stable sort of [rows, V] costs far more than a top-k. Per row:

1. ``topk(k, sorted=True)`` gives the k-th largest value; every entry above it is in its
   result, first (``n_above`` of them);
2. the remaining ``k - n_above`` slots go to the lowest ids among the entries equal to it: a
   second top-k on an int32 key that is ``V - id`` on those entries and 0 elsewhere.

Rows are processed in blocks, so the int32 keys add at most :data:`KEY_ELEMENTS` x 5 bytes.
The CUDA op (``csrc/cuda_ops.cpp``) implements the same steps in ATen.
"""

import torch
from torch import Tensor

KEY_ELEMENTS = 1 << 24  # int32 keys + bool mask per block of rows (~80 MiB)


def topk_support(ranked: Tensor, k: int) -> Tensor:
    """Ids [n, k] (int64) of the top-k support of each row of ``ranked`` [n, V] (tie rule above).

    NaN ranks above everything, as in a descending ``torch.sort``; such rows are NaN anyway.
    """
    n, vocab = ranked.shape
    values, ids = ranked.topk(k, dim=1, sorted=True)
    if k >= vocab or n == 0:
        return ids
    kth = values[:, k - 1:k]
    n_above = (values > kth).sum(1, keepdim=True)  # all entries above the k-th are in the top-k
    slot = torch.arange(k, device=ranked.device)[None, :]
    from_tied = (slot - n_above).clamp_min(0)  # slot j >= n_above takes the (j - n_above)-th tie
    key_by_id = torch.arange(vocab, 0, -1, device=ranked.device, dtype=torch.int32)  # V - id
    step = max(1, KEY_ELEMENTS // vocab)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        tied = ranked[rows] == kth[rows]
        key = torch.where(tied, key_by_id, 0)
        key_vals, tied_ids = key.topk(k, dim=1, sorted=True)  # lowest tied ids first
        pick = tied_ids.gather(1, from_tied[rows])
        ok = key_vals.gather(1, from_tied[rows]) > 0  # a real tie (not a NaN k-th value)
        ids[rows] = torch.where((slot >= n_above[rows]) & ok, pick, ids[rows])
    return ids
