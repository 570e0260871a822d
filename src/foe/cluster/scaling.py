"""`--scaled-to h100`: link rates for the emulated cluster from a stated rule, not a choice.

The rule. For FoE's group-parallel layer, let q = (time to move one layer's activations, T x d_model x
dtype bytes, over a link) / (one rank's compute time for that layer), at the same phase and tokens.
Choose each emulated link's rate so that q here equals q for the `7b` preset on 8x H100 with NVLink 4
(intra-node) and NDR InfiniBand (inter-node):

    rate_here = T d s_here / (q_h100 x t_here),   q_h100 = (T d_7b s_h100 / bw_h100) / t_h100

- t_h100 is the cost model's roofline for one rank's share of the 7b layer (`foe.sim.cost_model`,
  `h100` preset). The GEMM efficiency is uncertain, so its range gives a band of rates.
- t_here is measured: the preset's FoE forward on this machine, per layer, divided by the ranks that
  share it.
- bw_h100 is the achievable link rate: the preset's published peak x nccl-tests' efficiency (sources in
  `foe.sim.hardware` and docs/cost-model.md).

Prefill and decode give different quotients (an H100 decode step is memory-bound, a CPU one is
dominated by overheads), so the rates hold for the phase they were derived for, which is printed. Latency
is not part of the rule: it cannot be injected here (see `shaping.py`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from foe.config import ModelConfig

H100_GEMM_EFFICIENCY_RANGE = (0.5, 0.8)  # large BF16 GEMMs on H100: measured MFU spans about this
REFERENCE_PRESET, REFERENCE_GPUS = "7b", 8
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Shape:
    """The forward the quotient is taken at: prefill `seqs` x `length` new tokens, or decode `seqs` tokens
    over `length` cached ones."""

    phase: str = "prefill"
    seqs: int = 4
    length: int = 64

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")

    @property
    def tokens(self) -> int:
        return self.seqs * (self.length if self.phase == "prefill" else 1)


@dataclass(frozen=True)
class ScaledRates:
    intra_mbit: float
    inter_mbit: float
    band: dict[str, tuple[float, float]]  # link -> (low, high) Mbit/s over the H100 GEMM efficiency range
    arithmetic: list[str]
    phase: str
    t_here_s: float  # the measured per-rank layer compute the rule used
    activation_bytes: int  # T x d_model x 4 B here

    def quotient(self, inter_mbit: float) -> float:
        """q at an inter-node rate: moving a layer's activations over it / a rank's layer compute."""
        return self.activation_bytes * 8 / (inter_mbit * 1e6) / self.t_here_s


def h100_layer_seconds(shape: Shape, gemm_efficiency: float) -> float:
    """One rank's compute for one 7b FoE layer on 8x H100 (the cost model's roofline)."""
    from foe.sim.batch import Batch
    from foe.sim.cost_model import forward_time
    from foe.sim.hardware import CLUSTERS
    from foe.sim.imbalance import load_routing_stats
    cfg = ModelConfig.from_preset(REFERENCE_PRESET, arch="foe")
    cluster = CLUSTERS["h100"].replace(matmul_efficiency=gemm_efficiency)
    batch = (Batch.prefill(shape.seqs, shape.length) if shape.phase == "prefill"
             else Batch.decode(shape.seqs, shape.length))
    return forward_time(cfg, "gp", cluster, batch, load_routing_stats()).layer.compute


def measured_layer_seconds(preset: str, shape: Shape, ranks: int, threads: int, repeats: int = 20) -> float:
    """One rank's share of one FoE layer of `preset` here: the best forward time over `repeats`, per
    layer, divided by the ranks (group parallelism splits a layer's groups evenly)."""
    import torch

    from foe.model.checkpoint import build_model
    torch.set_num_threads(threads)
    cfg = ModelConfig.from_preset(preset, arch="foe")
    model = build_model(None, cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    n = shape.length if shape.phase == "prefill" else shape.length + 1
    ids = torch.randint(0, cfg.vocab_size, (shape.seqs, n), generator=g)
    with torch.inference_mode():
        if shape.phase == "prefill":
            last = torch.arange(shape.seqs) * shape.length + shape.length - 1

            def step() -> None:
                model(ids, logits_at=last)
        else:
            cache = model.new_cache(shape.seqs, n)
            model(ids[:, :-1], cache=cache, logits_at=torch.arange(shape.seqs) * shape.length)
            pos = torch.full((shape.seqs, 1), shape.length, dtype=torch.long)
            every = torch.arange(shape.seqs)

            def step() -> None:  # the same position each time: the token overwrites its own slot
                model(ids[:, -1:], pos_BL=pos, cache=cache, logits_at=every)
        step()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
    return best / cfg.n_layers / ranks


def scaled_to_h100(preset: str, shape: Shape, ranks: int, threads: int | None = None,
                   t_here: float | None = None) -> ScaledRates:
    """The intra- and inter-node rates (Mbit/s per rank and direction) that give this machine, running
    `preset` on `ranks` ranks, the 7b-on-H100 quotient of link time to compute time at `shape`."""
    from foe.sim.hardware import CLUSTERS
    h100 = CLUSTERS["h100"]
    here_cfg, ref_cfg = ModelConfig.from_preset(preset, arch="foe"), ModelConfig.from_preset(REFERENCE_PRESET, arch="foe")
    threads = threads or max(1, (os.cpu_count() or 1) // ranks)
    t_here = t_here if t_here is not None else measured_layer_seconds(preset, shape, ranks, threads)
    T = shape.tokens
    bytes_here, bytes_ref = T * here_cfg.d_model * 4, T * ref_cfg.d_model * h100.dtype_bytes
    lines = [f"rule: (T x d_model x bytes / link rate) / (one rank's layer compute) equal here and for "
             f"{REFERENCE_PRESET} on {REFERENCE_GPUS}x H100; {shape.phase}, {shape.seqs} x {shape.length} "
             f"({'new' if shape.phase == 'prefill' else 'cached'} tokens), T = {T} tokens",
             f"here: {preset} FoE, fp32, {ranks} rank(s) x {threads} thread(s): layer compute per rank "
             f"t_here = {t_here * 1e3:.3f} ms (measured); activations {bytes_here / 1e3:.1f} kB"]
    rates: dict[str, float] = {}
    band: dict[str, tuple[float, float]] = {}
    eff_lo, eff_hi = H100_GEMM_EFFICIENCY_RANGE
    central = h100.matmul_efficiency
    t_ref = {e: h100_layer_seconds(shape, e) for e in (eff_lo, central, eff_hi)}
    lines.append(f"H100: {REFERENCE_PRESET} FoE, bf16, {REFERENCE_GPUS} ranks: layer compute per rank t_h100 = "
                 f"{t_ref[central] * 1e6:.1f} us at GEMM efficiency {central:g} ({t_ref[eff_hi] * 1e6:.1f}-"
                 f"{t_ref[eff_lo] * 1e6:.1f} us over {eff_lo:g}-{eff_hi:g}); activations {bytes_ref / 1e3:.1f} kB")
    for name, link in (("intra", h100.intra), ("inter", h100.inter)):
        def rate(eff: float) -> float:
            q = (bytes_ref / link.bw) / t_ref[eff]
            return bytes_here / (q * t_here) * 8 / 1e6
        rates[name] = rate(central)
        band[name] = tuple(sorted((rate(eff_lo), rate(eff_hi))))  # type: ignore[assignment]
        q = (bytes_ref / link.bw) / t_ref[central]
        lines.append(f"{name}-node: H100 link {link.bw / 1e9:.0f} GB/s achievable ({link.bandwidth / 1e9:.0f} x "
                     f"{link.efficiency:g}) -> q = {bytes_ref / link.bw * 1e6:.2f} us / {t_ref[central] * 1e6:.1f} us "
                     f"= {q:.3f}; rate here = {bytes_here / 1e3:.1f} kB / ({q:.3f} x {t_here * 1e3:.3f} ms) = "
                     f"{rates[name]:.2f} Mbit/s (band {band[name][0]:.2f}-{band[name][1]:.2f})")
    return ScaledRates(rates["intra"], rates["inter"], band, lines, shape.phase, t_here, bytes_here)


def with_rates(spec, rates: ScaledRates):  # noqa: ANN001, ANN201
    """The ClusterSpec with the scaled rates (intra only when several ranks share a node)."""
    return dataclasses.replace(spec, intra_mbit=round(rates.intra_mbit, 3), inter_mbit=round(rates.inter_mbit, 3))
