"""Training loops of the recipe (torch on CPU): the DetectNet_v2 detector and the crop classifiers.

Deterministic: fixed seeds, a fixed number of iterations, one sample order per seed, torch's
deterministic algorithms. The detector trains on 256×256 crops of the 416×416 inputs, aligned to the
16-pixel grid so the targets crop exactly; the network is fully convolutional, so this is the same
model at about a third of the cost per step, which is what makes a from-scratch ResNet18 fit the
recipe's CPU budget.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engines.configs import STRIDE
from engines.data import SceneSet, detectnet_targets

TRAIN_CROP = 256


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC RGB -> float NCHW in [0,1] (the model config's scale 1/255, mean 0, std 1)."""
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return t.contiguous(memory_format=torch.channels_last)


def _photometric(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness/contrast jitter and noise, per sample, so INT8 and JPEG artefacts hurt less."""
    n = x.shape[0]
    gain = 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.3
    bias = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.12
    noise = torch.randn(x.shape, generator=gen) * 0.015
    return (x * gain + bias + noise).clamp_(0.0, 1.0)


class DetectorBatches:
    """Random grid-aligned crops with their targets; precomputes full-image targets once."""

    def __init__(self, data: SceneSet, num_classes: int, seed: int) -> None:
        self.images = data.images
        targets = [detectnet_targets(b, c, num_classes) for b, c in zip(data.boxes, data.classes, strict=True)]
        self.cov = np.stack([t[0] for t in targets])
        self.bbox = np.stack([t[1] for t in targets])
        self.mask = np.stack([t[2] for t in targets])
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int, crop: int = TRAIN_CROP) -> tuple[torch.Tensor, ...]:
        idx = self.rng.integers(0, len(self.images), batch)
        size = self.images.shape[1]
        cells = crop // STRIDE
        imgs, covs, bbs, masks = [], [], [], []
        for i in idx:
            gy, gx = self.rng.integers(0, (size - crop) // STRIDE + 1, 2)
            y, x = gy * STRIDE, gx * STRIDE
            imgs.append(self.images[i, y : y + crop, x : x + crop])
            covs.append(self.cov[i, :, gy : gy + cells, gx : gx + cells])
            bbs.append(self.bbox[i, :, gy : gy + cells, gx : gx + cells])
            masks.append(self.mask[i, :, gy : gy + cells, gx : gx + cells])
        return (_to_tensor(np.stack(imgs)), torch.from_numpy(np.stack(covs)), torch.from_numpy(np.stack(bbs)),
                torch.from_numpy(np.stack(masks)))


def detectnet_loss(cov_logits: torch.Tensor, bbox: torch.Tensor, cov_t: torch.Tensor, bbox_t: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = cov_t.shape
    weight = mask * (1.0 + 4.0 * cov_t)  # positives are a few percent of the cells
    cov_loss = F.binary_cross_entropy_with_logits(cov_logits, cov_t, weight=weight, reduction="sum")
    cov_loss = cov_loss / weight.sum().clamp(min=1.0)
    pos = cov_t.repeat_interleave(4, dim=1)
    bbox_loss = (F.smooth_l1_loss(bbox, bbox_t, reduction="none", beta=0.1) * pos).sum() / pos.sum().clamp(min=1.0)
    return cov_loss, bbox_loss


def _fit(model: nn.Module, iters: int, lr: float, desc: str,
         step_loss: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> list[float]:
    """AdamW + one-cycle LR for ``iters`` steps; ``step_loss`` draws a batch and returns its loss and
    the parts shown on the progress bar."""
    model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iters, pct_start=0.1)
    history: list[float] = []
    bar = tqdm(range(iters), desc=desc)
    for step in bar:
        loss, shown = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix({k: f"{float(v.detach()):.4f}" for k, v in shown.items()})
    model.eval()
    return history


def train_detector(model: nn.Module, batches: DetectorBatches, iters: int, lr: float, batch: int,
                   desc: str) -> list[float]:
    gen = torch.Generator().manual_seed(int(batches.rng.integers(1 << 31)))

    def step_loss() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, cov_t, bbox_t, mask = batches.sample(batch)
        cov_logits, bbox = model.forward_logits(_photometric(x, gen))
        cov_loss, bbox_loss = detectnet_loss(cov_logits, bbox, cov_t, bbox_t, mask)
        return cov_loss + bbox_loss, {"cov": cov_loss, "bbox": bbox_loss}

    return _fit(model, iters, lr, desc, step_loss)


def train_classifier(model: nn.Module, crops: np.ndarray, labels: np.ndarray, iters: int, lr: float, batch: int,
                     seed: int, desc: str) -> list[float]:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    def step_loss() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = rng.integers(0, len(crops), batch)
        x = crops[idx]
        flip = rng.random(batch) < 0.5  # left/right facing objects are the same class
        x[flip] = x[flip, :, ::-1]
        logits = model(_photometric(_to_tensor(x), gen))
        loss = F.cross_entropy(logits, torch.from_numpy(labels[idx]), label_smoothing=0.05)
        return loss, {"loss": loss}

    return _fit(model, iters, lr, desc, step_loss)


@torch.no_grad()
def classifier_accuracy(model: nn.Module, crops: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(crops), batch):
        pred = model(_to_tensor(crops[i : i + batch])).argmax(1).numpy()
        correct += int((pred == labels[i : i + batch]).sum())
    return correct / max(1, len(crops))
