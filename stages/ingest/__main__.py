"""`python -m stages.ingest`: the ingest stage from the command line."""

from stages.ingest import main

if __name__ == "__main__":  # not when a spawned worker imports this as its parent's main module
    raise SystemExit(main())
