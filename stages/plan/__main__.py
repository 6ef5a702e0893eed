"""`python -m stages.plan`: the plan stage, or one question (--arch)."""

from stages.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
