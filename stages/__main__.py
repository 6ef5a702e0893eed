"""`python -m stages NAME [options]`: stage NAME (`python -m stages.NAME [options]`) run in a
process forked from a warm interpreter that imported torch and transformers once
(stages.common.harness.warm). dvc.yaml runs the torch stages this way."""

import sys

from stages.common.harness.warm import client

raise SystemExit(client(sys.argv[1:]))
