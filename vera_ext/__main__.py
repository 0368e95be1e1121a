"""Command line: `python -m vera_ext bench [--quick] [--device cpu|cuda] [--json PATH]`."""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bench": "side-by-side benchmark: base layer vs PEFT's VeRA vs vera_ext"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m vera_ext <command> [options]\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:<8} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from . import bench

    return bench.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
