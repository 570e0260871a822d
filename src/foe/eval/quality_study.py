"""`foe compare-quality`: does FoE keep MoE's quality at equal parameters? A study built to answer that.

- Seeds: N per architecture. A seed fixes initialisation and data order, so the MoE and FoE runs of one
  seed read the same batches in the same order; their difference is one paired sample.
- Fair tuning: the load-balancing coefficient acts on 16-expert domains in MoE and 4-expert domains in
  FoE, so one shared value would regularise them differently. Each architecture sweeps a small grid on
  the first seed and is then compared at its own best, chosen on the *dev* windows.
- Held-out text: whole documents the tokenizer never saw (foe.train.data). Its first `val_tokens` tokens
  are the dev windows (training's periodic evaluation, used for the curves and the choice of the
  coefficient); the rest are the *test* windows on which the result is reported, so the choice does not
  flatter the result.
- Uncertainty: per run, the test loss carries its standard error over windows; across seeds, the paired
  differences FoE - MoE get a 95% Student-t interval. The verdict compares that interval with a margin
  fixed before the study runs: FoE is "comparable" when the interval's upper end of the relative gap
  (FoE - MoE) / MoE is within the margin (3% by default).
- Expert load on the test windows, comparably: the coefficient of variation within each routing domain,
  and MoE's load also scored within the expert sets FoE's groups would own.

Every run is an ordinary `foe train` run directory (OUT/<arch>/aux<coef>/seed<seed>), so an interrupted
study continues with --resume and any run can be served, evaluated or resumed on its own; OUT/<arch>
itself resolves to the chosen coefficient's first-seed checkpoint (`--checkpoint OUT/foe`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foe.config import ModelConfig
from foe.eval.harness import evaluate_tasks, mean_accuracy
from foe.eval.heldout import score_windows
from foe.eval.quality_report import ARCHS, LABEL, plot_study
from foe.eval.stats import t_interval
from foe.model.checkpoint import atomic_write, load_checkpoint, load_config
from foe.tokenizer import load_tokenizer
from foe.train.checkpointing import LATEST
from foe.train.config import TrainConfig
from foe.train.data import PackedData, read_documents, split_documents, tokenize_documents, unigram_loss
from foe.train.run import read_log, run_training
from foe.train.trainer import load_balance



@dataclass(frozen=True)
class StudyConfig:
    preset: str
    train: TrainConfig  # shared by every run; seed and aux_coef are set per run
    seeds: tuple[int, ...] = (0, 1, 2)
    aux_coefs: tuple[float, ...] = (0.001, 0.01, 0.1)
    margin: float = 0.03  # FoE comparable if (FoE - MoE) / MoE stays below this at the 95% interval's top
    sync: str = "attention"
    test_tokens: int = 1 << 30  # cap on the test windows' tokens (default: all of them)
    tasks: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"a study needs at least 2 distinct seeds for an interval, got {list(self.seeds)}")
        if not self.aux_coefs or min(self.aux_coefs) < 0 or len(set(self.aux_coefs)) != len(self.aux_coefs):
            raise ValueError(f"--aux-coefs must be distinct values >= 0, got {list(self.aux_coefs)}")
        if not 0 < self.margin < 1:
            raise ValueError(f"--margin must be in (0, 1), got {self.margin}")

    def model(self, arch: str) -> ModelConfig:
        return ModelConfig.from_preset(self.preset, arch=arch, sync=self.sync)

    def run_dir(self, arch: str, coef: float, seed: int) -> Path:
        return Path(self.train.out_dir) / arch / f"aux{coef:g}" / f"seed{seed}"



def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _train(study: StudyConfig, arch: str, coef: float, seed: int, resume: bool) -> dict[str, Any]:
    run = study.run_dir(arch, coef, seed)
    summary = run_training(study.train.replace(out_dir=str(run), seed=seed, aux_coef=coef), study.model(arch),
                           resume=resume)
    log = read_log(run)
    return {**summary, "aux_coef": coef, "seed": seed, "dev_loss": summary["final_val_loss"],
            "val_curve": [(r["step"], r["val_loss"]) for r in log if r["kind"] == "val"],
            "tokens_per_step": next(r["tokens_per_step"] for r in log if r["kind"] == "meta")}


class _TestSet:
    """The test windows: held-out tokens past the dev windows, and the unigram baseline on exactly those
    tokens. Every run must share one tokenizer (BPE training is deterministic, so runs on the same data
    do); a mismatch would make the losses incomparable, and is refused."""

    def __init__(self, study: StudyConfig) -> None:
        self.study = study
        self.tok_json: str | None = None
        self.batches: list = []
        self.unigram = float("nan")
        self.dev_tokens = 0

    def get(self, ckpt: str) -> list:
        tcfg = self.study.train
        tok = load_tokenizer(ckpt)
        if self.tok_json is None:
            train_docs, val_docs = split_documents(read_documents(tcfg.data), tcfg.val_fraction)
            data = PackedData(tokenize_documents(train_docs, tok), tokenize_documents(val_docs, tok), tcfg.seq_len, 0)
            dev_windows = len(data.val_batches(1, tcfg.val_tokens))
            self.dev_tokens = dev_windows * tcfg.seq_len
            self.batches = data.val_batches(tcfg.micro_batch, self.study.test_tokens, first_window=dev_windows)
            if not self.batches:
                raise ValueError(f"no held-out text is left for testing after the {tcfg.val_tokens} dev tokens; "
                                 f"raise --val-fraction or lower --val-tokens")
            self.tok_json = tok.to_str()
            self.unigram = unigram_loss(data, load_config(ckpt).vocab_size, self.batches)
        elif tok.to_str() != self.tok_json:
            raise ValueError(f"{ckpt} has another tokenizer than the study's other runs: losses would not compare")
        return self.batches


def _test(study: StudyConfig, testset: _TestSet, run: dict[str, Any], foe_groups: int) -> dict[str, Any]:
    """Score one run's final checkpoint on the test windows: loss (± s.e.), expert load, multiple choice."""
    batches = testset.get(run["checkpoint"])
    model = load_checkpoint(run["checkpoint"])
    score = score_windows(model, batches, study.train.bf16)
    mc = evaluate_tasks(model, load_tokenizer(run["checkpoint"]), study.tasks) if study.tasks else {}
    return {"seed": run["seed"], "aux_coef": run["aux_coef"], "checkpoint": run["checkpoint"], **score.to_dict(),
            "load_own": load_balance(score.expert_counts, model.cfg.num_groups),
            "load_in_foe_groups": load_balance(score.expert_counts, foe_groups),
            "mc": mc, "mc_mean": mean_accuracy(mc)}


def compare_quality(study: StudyConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) the whole study and return its report; also writes OUT/compare_quality.json and
    OUT/compare_quality.png."""
    t0 = time.perf_counter()
    out = Path(study.train.out_dir)
    n_runs = len(ARCHS) * (len(study.aux_coefs) + len(study.seeds) - 1)
    runs: dict[tuple[str, float, int], dict[str, Any]] = {}

    def train(arch: str, coef: float, seed: int) -> None:
        _progress(f"[{len(runs) + 1}/{n_runs}] {LABEL[arch]}, balance coefficient {coef:g}, seed {seed} "
                  f"-> {study.run_dir(arch, coef, seed)}")
        runs[(arch, coef, seed)] = _train(study, arch, coef, seed, resume)

    for arch in ARCHS:  # the sweep, on the first seed
        for coef in study.aux_coefs:
            train(arch, coef, study.seeds[0])
    best = {a: min(study.aux_coefs, key=lambda c: runs[(a, c, study.seeds[0])]["dev_loss"]) for a in ARCHS}
    for arch in ARCHS:  # the other seeds, each architecture at its own best
        for seed in study.seeds[1:]:
            train(arch, best[arch], seed)
    for arch in ARCHS:
        point_to_chosen(out / arch, runs[(arch, best[arch], study.seeds[0])]["checkpoint"])
    _progress("scoring every architecture's runs at its best coefficient on the test windows")
    testset, foe_groups = _TestSet(study), study.model("foe").num_groups
    models: dict[str, Any] = {}
    for arch in ARCHS:
        chosen = [runs[(arch, best[arch], s)] for s in study.seeds]
        tests = [_test(study, testset, r, foe_groups) for r in chosen]
        cfg = study.model(arch)
        models[arch] = {"aux_coef": best[arch], "params": cfg.num_params, "active_params": cfg.num_active_params,
                        "experts_per_domain": cfg.n_experts // cfg.num_groups,
                        "test": tests, "test_loss": t_interval([t["val_loss"] for t in tests]).to_dict(),
                        "curves": {str(r["seed"]): r["val_curve"] for r in chosen},
                        "tokens_per_step": chosen[0]["tokens_per_step"],
                        "tokens_trained": chosen[0]["tokens_trained"],
                        "train_seconds": [r["train_seconds"] for r in chosen],
                        "tok_per_s": [r["tok_per_s"] for r in chosen]}
    moe, foe = ([t["val_loss"] for t in models[a]["test"]] for a in ARCHS)
    diff = t_interval([f - m for m, f in zip(moe, foe)])
    rel = t_interval([(f - m) / m for m, f in zip(moe, foe)])
    report: dict[str, Any] = {
        "preset": study.preset, "sync": study.sync, "seeds": list(study.seeds), "aux_coefs": list(study.aux_coefs),
        "margin": study.margin, "train_config": study.train.to_dict(),
        "sweep": [{"arch": a, "aux_coef": c, "seed": s, "dev_loss": r["dev_loss"], "out_dir": r["out_dir"]}
                  for (a, c, s), r in runs.items() if s == study.seeds[0]],
        "best_aux_coef": best, "models": models, "unigram_test_loss": testset.unigram,
        "dev_tokens": testset.dev_tokens,
        "test_tokens": models["moe"]["test"][0]["val_tokens"],
        "paired": {"diff": diff.to_dict(), "rel": rel.to_dict()},
        "verdict": verdict(rel.to_dict(), study.margin),
        "wall_seconds": time.perf_counter() - t0,
    }
    png = out / "compare_quality.png"
    plot_study(report, png)
    report["plot"] = str(png)
    (out / "compare_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def point_to_chosen(arch_dir: Path, checkpoint: str) -> None:
    """Make OUT/<arch> a run directory whose `latest` names the chosen coefficient's first-seed checkpoint,
    so `--checkpoint OUT/foe` (serve, eval, generate) takes the model the study reports on."""
    target = Path(checkpoint).resolve().relative_to(arch_dir.resolve())
    atomic_write(arch_dir / LATEST, lambda tmp: Path(tmp).write_text(f"{target}\n"))


def verdict(rel: dict[str, float], margin: float) -> dict[str, Any]:
    """'comparable' when the 95% interval of (FoE - MoE) / MoE lies below +margin; otherwise 'not comparable',
    with the reason: FoE surely worse by more than the margin, or an interval too wide to tell."""
    hi, lo = rel["hi"], rel["lo"]
    if hi == hi and hi <= margin:
        why = f"the 95% interval of FoE's relative gap, {lo:+.2%} to {hi:+.2%}, stays below the {margin:.0%} margin"
        return {"comparable": True, "text": "comparable", "why": why}
    if lo == lo and lo > margin:
        why = f"FoE is worse than MoE by more than {margin:.0%}: the interval is {lo:+.2%} to {hi:+.2%}"
    else:
        why = (f"the interval {lo:+.2%} to {hi:+.2%} reaches past the {margin:.0%} margin: not shown comparable "
               f"with these seeds (more seeds would narrow it)")
    return {"comparable": False, "text": "not comparable", "why": why}
