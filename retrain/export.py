"""TRL export of a training snapshot: the exact pairs a run trained on, in TRL's
conversational preference format (what ``trl.RewardTrainer`` and ``DPOTrainer`` read)::

    {"prompt": [{"role": "system", ...}, {"role": "user", ...}],
     "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

TRL's pairwise format has no place for a tie, so tied pairs (``label`` 0.5) are left out.
"""

from __future__ import annotations

from pathlib import Path

from feedback.export import trl_record, write_jsonl
from retrain.data import Pair


def export_trl_jsonl(pairs: list[Pair], path: Path | str) -> int:
    """Writes one JSON object per decisive pair (atomically, via a temporary file); returns
    the count."""
    return write_jsonl((trl_record(p.prompt, p.chosen, p.rejected) for p in pairs if p.decisive), path)
