"""`python -m d2r_lib <command>`: runs d2r_lib.cli (build_parser stays importable here too)."""
from d2r_lib.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
