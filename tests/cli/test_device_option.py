"""`--device auto|cpu|cuda` on the single-process model commands: auto is cuda when torch sees a GPU, a
command without the option runs on the CPU, the model is built on the device asked for, and cuda without a
GPU is a clear error before any work. (The CUDA runs themselves are in tests/gpu.)"""

from __future__ import annotations

import argparse

import pytest
import torch

import foe.generate
from foe.cli.common import device_name, model_from_args
from foe.cli.main import build_parser, main

COMMANDS = [["generate"], ["bench", "model"], ["bench", "step"]]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of --device cuda without a GPU")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_single_process_model_command_takes_device(command: list[str], capsys) -> None:
    parser = build_parser()
    assert parser.parse_args(command).device == "auto"
    assert parser.parse_args([*command, "--device", "cuda"]).device == "cuda"
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--device", "tpu"])
    assert "invalid choice" in capsys.readouterr().err


def test_auto_means_cuda_when_torch_sees_a_gpu_and_no_option_means_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_name(argparse.Namespace(device="auto")) == "cuda"
    assert device_name(argparse.Namespace(device="cpu")) == "cpu"
    assert device_name(argparse.Namespace()) == "cpu"  # `foe init` and other commands without --device


def test_the_model_is_built_on_the_device() -> None:
    args = build_parser().parse_args(["generate", "--preset", "tiny", "--device", "cpu"])
    assert model_from_args(args).embed.weight.device.type == "cpu"
    # an explicit device wins over --device (meta: no memory, no GPU needed)
    assert {p.device.type for p in model_from_args(args, device="meta").parameters()} == {"meta"}


def test_generate_on_the_cpu_by_name_is_the_default_run(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen, real = [], foe.generate.generate
    monkeypatch.setattr(foe.generate, "generate", lambda model, *a, **kw: seen.append(model.embed.weight.device.type)
                        or real(model, *a, **kw))
    argv = ["generate", "--preset", "tiny", "--prompt-ids", "5 6 7", "--max-new-tokens", "4"]
    outputs = []
    for extra in ([], ["--device", "cpu"]):
        assert main([*argv, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].split()) == 4
    assert seen == ["cuda" if torch.cuda.is_available() else "cpu", "cpu"]


@no_gpu
@pytest.mark.parametrize("argv", [
    ["generate", "--preset", "tiny"],
    ["bench", "model", "--preset", "tiny", "--batch-sizes", "1", "--seq-lens", "4", "--repeats", "1"],
    ["bench", "step", "--preset", "tiny", "--batch", "1", "--context", "4", "--chunk", "4", "--repeats", "1"],
])
def test_cuda_without_a_gpu_is_a_clear_error(argv: list[str], tmp_path, capsys) -> None:
    json_arg = ["--json", str(tmp_path / "out.json")] if argv[0] == "bench" else []
    assert main([*argv, *json_arg, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "torch sees no CUDA device" in err and "--device cpu" in err
    assert not (tmp_path / "out.json").exists()
