"""`python -m stages.finetune`: the finetune stage from the command line."""

from stages.finetune import main

if __name__ == "__main__":
    raise SystemExit(main())
