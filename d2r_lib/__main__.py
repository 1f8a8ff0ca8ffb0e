"""`python -m d2r_lib <command>`: the command line of d2r_lib.cli."""
from d2r_lib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
