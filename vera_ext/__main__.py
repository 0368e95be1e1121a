"""Command line: ``python -m vera_ext <command> [options]``; ``python -m vera_ext <command> --help`` for each."""

import sys

COMMANDS = {
    "bench": "side-by-side benchmark and profiling: base layer vs PEFT's VeRA vs vera_ext",
    "demo": "a short end-to-end demonstration of vera_ext",
    "export-lora": "write a VeRA adapter directory as a PEFT LoRA adapter (exact, or the best rank-k)",
    "info": "build info, the torch it was built with and the one running, compiled archs, GPU visibility",
}


def _usage() -> str:
    lines = ["usage: python -m vera_ext <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{_usage()}\n\npython -m vera_ext: unknown command {command!r}", file=sys.stderr)
        return 2
    # Imported on demand: each command pulls in what it needs (the bench imports peft, the demo models). `info`
    # first: it is the one command that works when the extension cannot load (it reports why).
    if command == "info":
        from . import info

        return info.main(rest)
    if command == "bench":
        from . import bench

        return bench.main(rest)
    if command == "export-lora":
        from . import lora_export

        return lora_export.main(rest)
    try:
        from . import demo
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.demo":
            raise  # a dependency of the demo is missing: its own message says which
        print("python -m vera_ext demo: this installation has no vera_ext/demo.py", file=sys.stderr)
        return 2
    return demo.main(rest)


if __name__ == "__main__":
    sys.exit(main())
