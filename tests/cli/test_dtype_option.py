"""`--dtype auto|float32|bfloat16|float64` on the commands that run a model: auto is the checkpoint's stored
dtype (float32 for random weights), and the model really runs in the dtype chosen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import foe.generate
from foe.cli.main import build_parser, main
from foe.config import ModelConfig
from foe.engine.worker import ModelSpec
from foe.model import Transformer
from foe.model.checkpoint import save_checkpoint
from tests.conftest import build, tiny

COMMANDS = [["generate"], ["eval"], ["serve"], ["bench", "model"], ["bench", "forward"], ["bench", "engine"]]


@pytest.fixture
def generated_in(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtype of every model `foe generate` generates with (the real generate still runs)."""
    seen, real = [], foe.generate.generate
    monkeypatch.setattr(foe.generate, "generate", lambda model, *a, **kw: seen.append(model.embed.weight.dtype)
                        or real(model, *a, **kw))
    return seen


def test_generate_in_float64_end_to_end(generated_in: list[torch.dtype], capsys) -> None:
    argv = ["generate", "--preset", "tiny", "--prompt-ids", "5 6 7", "--max-new-tokens", "6"]
    assert main([*argv, "--dtype", "float64"]) == 0
    tokens = [int(t) for t in capsys.readouterr().out.split()]
    torch.manual_seed(0)  # --seed's default: the preset's float32 draw, widened
    model = Transformer(ModelConfig.from_preset("tiny", arch="foe")).double().eval()
    assert generated_in == [torch.float64] and tokens == foe.generate.generate(model, [[5, 6, 7]], 6)[0]
    assert main(argv) == 0 and generated_in[-1] == torch.float32  # auto: random weights are float32


def test_auto_is_the_checkpoint_dtype(tmp_path: Path, generated_in: list[torch.dtype], capsys) -> None:
    save_checkpoint(build(tiny("moe")).double(), tmp_path)
    argv = ["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "2"]
    for extra, dtype in (([], torch.float64), (["--dtype", "bfloat16"], torch.bfloat16)):
        assert main([*argv, *extra]) == 0, capsys.readouterr().err
        assert generated_in[-1] == dtype


@pytest.mark.parametrize("command", COMMANDS)
def test_every_model_command_takes_dtype(command: list[str], capsys) -> None:
    parser = build_parser()
    assert parser.parse_args(command).dtype == "auto"
    assert parser.parse_args([*command, "--dtype", "float64"]).dtype == "float64"
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--dtype", "float16"])
    assert "invalid choice" in capsys.readouterr().err


def test_serve_builds_its_ranks_models_in_the_dtype(tmp_path: Path) -> None:
    save_checkpoint(build(tiny("foe")).double(), tmp_path)
    assert ModelSpec(config=tiny("foe")).build().embed.weight.dtype == torch.float32
    assert ModelSpec(config=tiny("foe"), dtype=torch.bfloat16).build().embed.weight.dtype == torch.bfloat16
    assert ModelSpec(checkpoint=str(tmp_path)).build().embed.weight.dtype == torch.float64


def test_eval_in_float64_agrees_with_float32(tmp_path: Path) -> None:
    import json
    results = {}
    for dtype in ("float32", "float64"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", "--preset", "tiny", "--dtype", dtype, "--task", "copa", "--val-tokens", "256",
                     "--json", str(out)]) == 0
        results[dtype] = json.loads(out.read_text())
    loss = {d: r["perplexity"]["val_loss"] for d, r in results.items()}
    assert loss["float64"] == pytest.approx(loss["float32"], abs=1e-5) and loss["float64"] != loss["float32"]
    assert results["float64"]["tasks"]["copa"]["acc"] == results["float32"]["tasks"]["copa"]["acc"]
