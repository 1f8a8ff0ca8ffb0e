"""`python -m d2r_lib <command>`: runs d2r_lib.lab.cli (build_parser stays importable here too)."""
import sys

try:
    from d2r_lib.lab.cli import build_parser, main
except KeyboardInterrupt:  # Ctrl-C while starting: one line, as at any later moment
    print("error: interrupted (Ctrl-C)", file=sys.stderr)
    raise SystemExit(130) from None

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
