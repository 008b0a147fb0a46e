"""Structured (channel) pruning of the DetectNet_v2 ResNet18 by filter L1 norm, as TAO prunes.

Two kinds of channel groups are pruned:
* the inner channels of each BasicBlock (conv1's filters, and conv2's matching input channels);
* the residual stream of each stage. Every conv that *writes* into a stream (the stem for stage 0,
  each block's conv2, the first block's 1×1 projection) must keep the same channels, because the
  residual adds them element-wise; a stream channel's score is the sum of its writers' normalised
  filter L1 norms (TAO's "equal" grouping for element-wise layers).

``channel_masks`` picks the survivors; ``apply_masks`` gives W' = W·M (pruned filters and their BN
scale/shift zeroed, so they output exactly zero); ``materialise`` builds the genuinely smaller
network from the surviving channels. The recipe checks that masked and materialised models agree
before it fine-tunes the small one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from engines.nets import BLOCKS, STAGES, DetectNetV2, Widths

Masks = tuple[list[torch.Tensor], list[list[torch.Tensor]]]  # kept indices: stream[s], mid[s][b]


def _filter_l1(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().sum(dim=(1, 2, 3))


def _keep(scores: torch.Tensor, ratio: float, multiple: int = 8) -> torch.Tensor:
    k = max(multiple, int(round(len(scores) * ratio / multiple)) * multiple)
    return torch.sort(torch.topk(scores, min(k, len(scores))).indices).values


def channel_masks(model: DetectNetV2, keep_ratio: float) -> Masks:
    bb = model.backbone
    stream, mid = [], []
    for s in range(STAGES):
        writers = [bb.layers[s][b].conv2 for b in range(BLOCKS)]
        writers.append(bb.conv1 if s == 0 else bb.layers[s][0].downsample[0])
        score = sum(_filter_l1(w) / _filter_l1(w).mean() for w in writers)
        stream.append(_keep(score, keep_ratio))
        mid.append([_keep(_filter_l1(bb.layers[s][b].conv1), keep_ratio) for b in range(BLOCKS)])
    return stream, mid


def _zero_outside(t: torch.Tensor, keep: torch.Tensor, dim: int = 0) -> None:
    m = torch.zeros(t.shape[dim], dtype=torch.bool)
    m[keep] = True
    shape = [1] * t.dim()
    shape[dim] = -1
    t.mul_(m.view(shape).to(t.dtype))


@torch.no_grad()
def apply_masks(model: DetectNetV2, masks: Masks) -> DetectNetV2:
    """W' = W·M on a copy: pruned channels produce exact zeros everywhere downstream."""
    stream, mid = masks
    m = copy.deepcopy(model).eval()
    bb = m.backbone

    def mask_out(conv: nn.Conv2d, bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
        for t in (conv.weight, bn.weight, bn.bias):
            _zero_outside(t, keep)

    mask_out(bb.conv1, bb.bn1, stream[0])
    for s in range(STAGES):
        for b in range(BLOCKS):
            blk = bb.layers[s][b]
            mask_out(blk.conv1, blk.bn1, mid[s][b])
            mask_out(blk.conv2, blk.bn2, stream[s])
            if blk.downsample is not None:
                mask_out(blk.downsample[0], blk.downsample[1], stream[s])
    return m


def _copy_conv(dst: nn.Conv2d, src: nn.Conv2d, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> None:
    w = src.weight.detach()
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    dst.weight.copy_(w)
    if src.bias is not None:
        dst.bias.copy_(src.bias.detach() if out_idx is None else src.bias.detach()[out_idx])


def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).copy_(getattr(src, name).detach()[idx])


@torch.no_grad()
def materialise(model: DetectNetV2, masks: Masks) -> DetectNetV2:
    """A new, smaller DetectNetV2 holding only the surviving channels."""
    stream, mid = masks
    widths = Widths(stream=[len(k) for k in stream], mid=[[len(k) for k in row] for row in mid])
    small = DetectNetV2(model.num_classes, widths).eval()
    src, dst = model.backbone, small.backbone
    _copy_conv(dst.conv1, src.conv1, stream[0], None)
    _copy_bn(dst.bn1, src.bn1, stream[0])
    for s in range(STAGES):
        for b in range(BLOCKS):
            a, z = src.layers[s][b], dst.layers[s][b]
            block_in = stream[s - 1] if (b == 0 and s > 0) else stream[s]
            _copy_conv(z.conv1, a.conv1, mid[s][b], block_in)
            _copy_bn(z.bn1, a.bn1, mid[s][b])
            _copy_conv(z.conv2, a.conv2, stream[s], mid[s][b])
            _copy_bn(z.bn2, a.bn2, stream[s])
            if a.downsample is not None:
                _copy_conv(z.downsample[0], a.downsample[0], stream[s], block_in)
                _copy_bn(z.downsample[1], a.downsample[1], stream[s])
    _copy_conv(small.cov, model.cov, None, stream[-1])
    _copy_conv(small.bbox, model.bbox, None, stream[-1])
    return small


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
