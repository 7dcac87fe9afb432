"""The `envlf` console script: one command, a subcommand per tool.

    envlf serve                                   # the app (= python app.py), embedded demo world
    envlf train --data ../shared/datasets/ucm-captions --out runs/ucm-lite4 --epochs 4
    envlf evaluate --checkpoint runs/ucm-lite4/best --data ../shared/datasets/ucm-captions --split val
    envlf index build --checkpoint runs/ucm-lite4/best --source ../shared/datasets/ucm-captions --out indexes/ucm
    envlf search --index indexes/ucm --checkpoint runs/ucm-lite4/best --text "storage tanks beside a harbour"
    envlf finetune --checkpoint runs/ucm-lite4/best --feedback feedback.csv --data ... --out runs/ucm-ft1
    envlf export --feedback feedback.csv --qrels labels.qrels --jsonl labels.jsonl

Each subcommand is the `python -m envlf.<module>` tool of the same name (those stay as
aliases) and takes the same arguments: `envlf <subcommand> --help` lists them.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# subcommand -> (module, what it does). Modules are imported only when their subcommand runs,
# on purpose: `envlf --help` and a mistyped name answer at once instead of loading torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("demo.serve", "start the Gradio app (the same flags as python app.py)"),
    "train": ("envlf.train.recipe", "train a model on a captioned dataset"),
    "evaluate": ("envlf.evaluation.cli", "recall@1/5/10 and mR of a checkpoint on a split, ITC and re-ranked"),
    "index": ("envlf.search.cli", "build, grow, inspect or query a gallery index (build|add|info|search)"),
    "search": ("envlf.search.cli", "query an index from the command line (= envlf index search)"),
    "finetune": ("envlf.train.finetune", "fine-tune a checkpoint on the app's relevance labels"),
    "export": ("envlf.feedback.exports", "feedback CSV -> TREC qrels + queries, JSONL pairs"),
    "bench": ("benchmarks.bench", "benchmarks: search latency, load, first start"),
    "world": ("envlf.world.__main__", "generate the synthetic demo world, or its contact sheet"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: envlf <subcommand> [arguments]   (envlf <subcommand> --help for its arguments)", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "example:", '  envlf search --index indexes/ucm --checkpoint runs/ucm-lite4/best --text "a harbour"']
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"envlf: no subcommand {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name == "serve":  # the app reads its flags from sys.argv on import, as app.py does
        sys.argv = ["envlf serve", *rest]
        return int(importlib.import_module("demo.serve").main() or 0)
    if name == "search":
        rest = ["search", *rest]
    return int(importlib.import_module(COMMANDS[name][0]).main(rest) or 0)

if __name__ == "__main__":
    sys.exit(main())
