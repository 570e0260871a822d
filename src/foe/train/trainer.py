"""One training step and one validation pass, for a single process or one rank of a data-parallel run.

A step runs `grad_accum` micro-batches forward and backward, averages gradients over ranks (one
flat all-reduce), clips them, sets the scheduled learning rate and steps AdamW. The loss is
cross-entropy + aux_coef * load-balancing loss (Switch-style, computed per routing domain by the
model: all experts for MoE, each group's experts for FoE) + z_coef * router z-loss.

Which samples a step reads is index arithmetic on the data position (see train/data.py): micro-batch m
of rank r at step s reads samples base + (m * world + r) * micro_batch + [0, micro_batch), base =
s * grad_accum * world * micro_batch. So 2 ranks x micro_batch b read exactly what 1 rank with
micro-batch 2b (or grad_accum 2 with micro-batch b) reads. This module does no I/O, logging or
checkpointing; train/run.py does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from foe.model.precision import upcast
from foe.model.transformer import ModelOutput, Transformer
from foe.train.config import TrainConfig
from foe.train.data import PackedData
from foe.train.distributed import all_reduce_grads, all_reduce_sum
from foe.train.optim import build_optimizer, lr_at, set_lr


@dataclass
class StepStats:
    loss: float  # the optimised objective, mean over micro-batches and ranks
    ce: float  # cross-entropy, nats/token
    aux: float  # load-balancing loss (1.0 = perfectly balanced for softmax routers)
    z: float
    lr: float
    grad_norm: float  # before clipping
    expert_counts: torch.Tensor  # [n_layers, E] tokens per expert over the whole step and all ranks
    seconds: float


def load_balance(counts_LE: torch.Tensor, num_groups: int) -> dict[str, float]:
    """Expert load per routing domain of E/num_groups experts: max/mean (1.0 = perfect) and coefficient of
    variation, averaged over layers and domains (MoE: one domain of E experts; FoE: G domains of E/G).
    Scoring a MoE with FoE's num_groups asks how even its load is within the expert sets FoE's groups own."""
    c = counts_LE.double().reshape(counts_LE.shape[0], num_groups, -1)
    mean = c.mean(-1).clamp_min(1e-9)
    return {"load_max_over_mean": float((c.amax(-1) / mean).mean()),
            "load_cv": float((c.std(-1, unbiased=False) / mean).mean())}


class Trainer:
    def __init__(self, model: Transformer, cfg: TrainConfig, data: PackedData, rank: int = 0, world: int = 1
                 ) -> None:
        self.model, self.cfg, self.data = model, cfg, data
        self.rank, self.world = rank, world
        self.opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]

    @property
    def samples_per_step(self) -> int:
        return self.cfg.grad_accum * self.world * self.cfg.micro_batch

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.cfg.seq_len

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def compute_gradients(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over this rank's micro-batches of step `step` (0-based), then average the
        gradients over ranks. Returns (mean [loss, ce, aux, z] over micro-batches and ranks,
        expert counts [n_layers, E] summed over them)."""
        cfg, model = self.cfg, self.model
        model.train()
        base = step * self.samples_per_step
        sums = torch.zeros(4, dtype=torch.float64)  # loss, ce, aux, z
        counts = None
        for m in range(cfg.grad_accum):
            start = base + (m * self.world + self.rank) * cfg.micro_batch
            x, y = (t.to(self.device) for t in self.data.batch(start, cfg.micro_batch))
            with self._autocast():
                out = model(x)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
            loss = ce + cfg.aux_coef * out.aux_loss.float() + cfg.z_coef * out.z_loss.float()
            (loss / cfg.grad_accum).backward()
            sums += torch.tensor([loss.item(), ce.item(), out.aux_loss.item(), out.z_loss.item()],
                                 dtype=torch.float64)
            c = out.expert_counts.detach().cpu()
            counts = c if counts is None else counts + c
        for p in self.params:  # experts that got no token have no grad: make every rank step every tensor alike
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world > 1:
            all_reduce_grads(self.params, self.world)
            sums = all_reduce_sum(sums)
            counts = all_reduce_sum(counts)
        return sums / (cfg.grad_accum * self.world), counts

    def train_step(self, step: int) -> StepStats:
        """Step `step` (0-based) of the run: gradients, clipping, scheduled LR, AdamW."""
        cfg = self.cfg
        t0 = time.perf_counter()
        mean, counts = self.compute_gradients(step)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        set_lr(self.opt, lr)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss, ce, aux, z = mean.tolist()
        return StepStats(loss, ce, aux, z, lr, grad_norm, counts, time.perf_counter() - t0)

    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed validation windows of the periodic evaluation: the first `val_tokens` held-out tokens."""
        return self.data.val_batches(self.cfg.micro_batch, self.cfg.val_tokens)

    def validation_loss(self) -> float:
        """Mean cross-entropy (nats/token) over the fixed validation windows."""
        return mean_cross_entropy(self.model, self.val_batches(), self.cfg.bf16)


def forward_losses(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]], bf16: bool = False
                   ) -> Iterator[tuple[torch.Tensor, ModelOutput]]:
    """Per-token cross-entropy [B, L] (nats, in at least float32) and the model's output for each
    (inputs_BL, targets_BL) batch, in eval mode without gradients; under bf16 autocast if `bf16`."""
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for x, y in batches:
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                out = model(x.to(device))
            ce = F.cross_entropy(upcast(out.logits).flatten(0, 1), y.to(device).flatten(), reduction="none")
            yield ce.view(y.shape), out


def mean_cross_entropy(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]], bf16: bool = False
                       ) -> float:
    """Token-weighted mean cross-entropy (nats/token) of `model` over (inputs_BL, targets_BL) batches."""
    total, n = 0.0, 0
    for ce, _ in forward_losses(model, batches, bf16):
        total += float(ce.sum())
        n += ce.numel()
    return total / n
