"""The `foe` command line: each subcommand fills a config and calls the library.

Subcommands live in small modules beside this one; each exposes `register(commands, bench)` and
sets `func` on its parsers. Modules are imported for their parsers only; heavy imports happen in
the command functions, so `foe --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

MODULES = (
    "foe.cli.model_cmds",  # info, init, generate
    "foe.cli.bench_model",  # bench model
    "foe.cli.bench_forward",  # bench forward
    "foe.cli.bench_step",  # bench step
    "foe.cli.serve_cmd",  # serve
    "foe.cli.bench_serve",  # bench serve, bench compare
    "foe.cli.train_cmds",  # train, eval, compare-quality
    "foe.cli.sim_cmd",  # sim
    "foe.cli.cluster_cmd",  # cluster
)

DESCRIPTION = """\
Federation of Experts (FoE): MoE and FoE transformers side by side.

Start here:
  foe info --preset 7b                 sizes of the MoE and FoE 7b presets
  foe bench forward                    the main experiment: MoE (ep, tp) vs FoE (gp) on 2 local ranks
  foe serve --arch foe --strategy gp --nproc 2
                                       OpenAI-compatible server on 127.0.0.1:8000
  foe bench compare                    the paper's serving experiment (Poisson arrivals), MoE vs FoE
  foe compare-quality                  train MoE and FoE alike on the built-in corpus, compare quality
  foe sim serve --preset 7b            project the paper's tables onto 8x H100 nodes
  foe cluster sweep                    (root) MoE vs FoE on an emulated 2-node cluster whose links are as
                                       slow, relative to compute, as InfiniBand is to an H100
Every subcommand has its own --help; docs/ in the repository explains each in depth."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from foe import __version__
    parser.add_argument("--version", action="version", version=f"foe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = commands.add_parser(
        "bench", help="benchmarks: forward, model, step, engine, serve, compare, vs-vllm",
        description="Benchmarks that print tables and write JSON (and PNG plots where useful).",
    ).add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # a command not built yet
        module.register(commands, bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from foe.malloc import tune_malloc
    tune_malloc()  # before the first large tensor: freed activations stay in the heap (see foe/malloc.py)
    try:
        check_outputs(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `foe info | head`: the reader left early, which is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except (ValueError, OSError) as e:  # bad input or an unusable path: a clear message, no traceback
        name = " ".join(filter(None, (args.command, getattr(args, "bench_command", None),
                                      getattr(args, "sim_command", None), getattr(args, "cluster_command", None))))
        print(f"foe {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def check_outputs(args: argparse.Namespace) -> None:
    """Every command's --json FILE and --out PATH must be writable before the command starts its work,
    so that a typo does not throw away an evaluation or a benchmark at the very end. Commands check
    further what kind of path they need (a directory for `train --out`, an empty one for `init --out`)."""
    from pathlib import Path

    from foe.cli.common import check_output
    if isinstance(getattr(args, "json", None), (str, Path)):
        check_output(args.json, "--json", is_dir=False)
    if isinstance(getattr(args, "out", None), (str, Path)):
        check_output(args.out, "--out", is_dir=None)  # a directory or a file prefix, by command


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # "[Errno 2] No such file ..." reads worse than this
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
