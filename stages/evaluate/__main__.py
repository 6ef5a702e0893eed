"""`python -m stages.evaluate`: the evaluate stage from the command line."""

from stages.evaluate import main

if __name__ == "__main__":  # not when a spawned worker imports this as its parent's main module
    raise SystemExit(main())
