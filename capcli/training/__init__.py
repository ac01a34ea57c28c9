"""The training recipe: :mod:`.trainer` (the loop), :mod:`.objectives` (what a step optimises),
:mod:`.schedules` (learning rates, teacher forcing), :mod:`.stopping` (time budgets, signals),
:mod:`.runlog` (metrics.jsonl, TensorBoard) and :mod:`.memory` (a batch that fits)."""
