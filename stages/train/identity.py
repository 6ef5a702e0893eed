"""What the training code is, for the checkpoint's fingerprint: the source of every module a
training run executes (stages.train and the lmmem modules it imports, read from the code by
stages.common.harness.code_files), torch and transformers. A checkpoint made by other code is not
resumed; editing code that training does not run (the report's charts, int4) changes nothing."""

from __future__ import annotations

import torch

from stages.common.harness.code_files import closure
from stages.train import checkpoint


def code_identity() -> dict[str, str]:
    import transformers

    texts = [f.read_text(encoding="utf-8") for f in closure("stages.train")]
    return {"sources": checkpoint.fingerprint(*texts), "torch": torch.__version__,
            "transformers": transformers.__version__}
