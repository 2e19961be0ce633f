"""The reference model of TRL's preference and RL trainers, as one adapter: no copy that is not needed, none saved.

Given a `PeftModel`, TRL's trainers copy its adapter under the name ``ref`` and use that copy as the
reference. For an adapter being continued (`--adapter_name_or_path`) that copy is the model the run starts
from, as it should be. A new LoRA starts as the base model (its B matrices are zero), so the policy with
its adapter disabled is the same reference without the copy. Either way only the trained adapter is saved.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of the adapter it continues


class ReferenceAdapter:
    """Trainer mixin (before TRL's trainer in the bases): `new_adapter=True` drops TRL's reference copy."""

    def __init__(self, *args, new_adapter: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if new_adapter and REFERENCE_ADAPTER in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter(REFERENCE_ADAPTER)

    def _save(self, output_dir=None, state_dict=None):
        """Only the trained adapter is saved: the reference copy is the adapter the run started from."""
        super()._save(output_dir, state_dict)
        shutil.rmtree(Path(output_dir or self.args.output_dir) / REFERENCE_ADAPTER, ignore_errors=True)
