"""The CLI's handling of checkpoints and bad input: run directories accepted wherever a checkpoint is,
outputs checked before the work, `init` refusing to overwrite, option ranges, one-line errors, examples."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from foe.cli.main import build_parser, main
from foe.model.checkpoint import load_checkpoint, save_checkpoint
from foe.tokenizer import byte_level_tokenizer, save_tokenizer
from foe.train.checkpointing import save_training_checkpoint
from tests.conftest import build, tiny


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A `foe train --out` layout: step_00000003 and `latest`, with a tokenizer and optimizer state."""
    torch.manual_seed(0)
    model = build(tiny("foe"))
    opt = torch.optim.AdamW(model.parameters())
    save_training_checkpoint(tmp_path / "run", 3, model, opt, byte_level_tokenizer(), {"train_config": {}})
    return tmp_path / "run"


@pytest.mark.parametrize("argv", [["info"], ["generate", "--max-new-tokens", "2"]])
def test_run_directory_is_a_checkpoint_everywhere(run_dir: Path, argv: list[str], capsys) -> None:
    assert main([*argv, "--checkpoint", str(run_dir)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    direct = main([*argv, "--checkpoint", str(run_dir / "step_00000003")])
    assert direct == 0 and capsys.readouterr().out == out


def test_output_checked_before_the_work(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # --task with a missing file would fail inside the work; the output check must come first.
    rc = main(["eval", "--preset", "tiny", "--no-ppl", "--task", f"boolq={tmp_path / 'none.jsonl'}",
               "--json", str(blocker / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "--json" in err and "not a directory" in err and "task file" not in err
    assert main(["init", "--preset", "tiny", "--out", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_oserror_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").mkdir()  # open() of a directory: IsADirectoryError, an OSError
    rc = main(["info", "--checkpoint", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("foe info: error: ") and err.count("\n") == 1


def test_init_refuses_a_non_empty_out_and_force_clears_stale_files(tmp_path: Path, run_dir: Path, capsys) -> None:
    out = tmp_path / "ck"
    save_checkpoint(build(tiny("moe")), out)
    save_tokenizer(byte_level_tokenizer(), out)
    (out / "trainer_state.json").write_text("{}")
    before = (out / "model.safetensors").read_bytes()
    assert main(["init", "--preset", "tiny", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "model.safetensors").read_bytes() == before
    assert main(["init", "--preset", "tiny", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_init_from_checkpoint_copies_weights_and_tokenizer(tmp_path: Path, run_dir: Path) -> None:
    src = run_dir / "step_00000003"
    assert main(["init", "--checkpoint", str(run_dir), "--out", str(tmp_path / "copy")]) == 0
    names = sorted(p.name for p in (tmp_path / "copy").iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    a, b = load_checkpoint(src), load_checkpoint(tmp_path / "copy")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tokenizer_larger_than_the_vocab_is_refused(tmp_path: Path, capsys) -> None:
    ck = save_checkpoint(build(tiny("foe", vocab_size=257)), tmp_path / "ck")
    save_tokenizer(byte_level_tokenizer(), ck)  # 257 tokens: fits exactly
    assert main(["info", "--checkpoint", str(ck)]) == 0
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256}))
    assert main(["generate", "--checkpoint", str(ck)]) == 2
    err = capsys.readouterr().err
    assert "257 tokens" in err and "vocab_size is only 256" in err


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--max-new-tokens", "-3"], "--max-new-tokens: must be >= 1, got -3"),
    (["generate", "--top-p", "0"], "--top-p: must be in (0.0, 1.0]"),
    (["generate", "--temperature", "-1"], "--temperature: must be in [0.0, inf]"),
    (["generate", "--top-k", "-1"], "--top-k: must be >= 0"),
    (["eval", "--seq-len", "0"], "--seq-len: must be >= 1, got 0"),
    (["eval", "--val-fraction", "1"], "--val-fraction: must be in (0.0, 1.0)"),
    (["eval", "--val-tokens", "x"], "--val-tokens: must be an integer, got 'x'"),
    (["train", "--out", "o", "--micro-batch", "0"], "--micro-batch: must be >= 1"),
    (["train", "--out", "o", "--warmup", "-1"], "--warmup: must be >= 0"),
    (["train", "--out", "o", "--lr", "0"], "--lr: must be in (0.0, inf]"),
])
def test_numeric_options_are_range_checked(argv: list[str], msg: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("command", ["info", "init", "generate", "train", "eval", "compare-quality",
                                     "sim clusters", "sim forward", "sim serve", "sim calibrate"])
def test_every_command_help_has_examples(command: str) -> None:
    parser = build_parser()
    sub = parser
    for word in command.split():
        sub = next(a for a in sub._actions if a.dest in ("command", "sim_command")).choices[word]
    text = sub.format_help()
    assert "examples:\n  foe " in text or "examples:\n  torchrun " in text, text[-300:]


def test_checkpoint_files_follow_the_umask(tmp_path: Path, run_dir: Path) -> None:
    old = os.umask(0o027)
    try:
        torch.manual_seed(0)
        model = build(tiny("foe"))
        save_training_checkpoint(tmp_path / "r", 1, model, torch.optim.AdamW(model.parameters()),
                                 byte_level_tokenizer(), {})
        save_checkpoint(model, tmp_path / "plain")
    finally:
        os.umask(old)
    paths = [tmp_path / "r" / "step_00000001", tmp_path / "r" / "latest", tmp_path / "plain" / "config.json",
             *(tmp_path / "r" / "step_00000001").iterdir(), *(tmp_path / "plain").iterdir()]
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~0o027
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_number_lists_and_ranges_parse_and_refuse_clearly() -> None:
    """The shared argparse types every subcommand's list and range options use."""
    import argparse

    from foe.cli.common import at_least, number_list
    ints = number_list(int, "integers", positive=True)
    assert ints("1,4, 16") == (1, 4, 16) and ints("8") == (8,)
    assert number_list(float)("0.5,1.5") == (0.5, 1.5)
    for bad, msg in (("", "comma-separated integers"), ("1,x", "comma-separated integers"), ("0,4", "positive")):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            ints(bad)
    port = at_least(0, 65535, " (0: any free port)")
    assert port("0") == 0 and port("65535") == 65535
    with pytest.raises(argparse.ArgumentTypeError, match=r"0\.\.65535 \(0: any free port\), got 65536"):
        port("65536")
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1, got 0"):
        at_least(1)("0")
