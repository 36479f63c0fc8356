"""MultiTaskModel: what every medmtl model shares.

A model declares the tasks it serves (`tasks`, a subset of its family's
`all_tasks`), returns a dict of task outputs from forward(x), the encoder's
feature maps from forward_features(x), and names its parts and task heads
(module paths) so that summary() can count parameters and multiply-adds per
part and per task.
"""

from __future__ import annotations

from torch import nn

from medmtl.models.summary import ModelSummary, summarize


class MultiTaskModel(nn.Module):
    all_tasks: tuple[str, ...] = ()
    in_channels: int
    tasks: tuple[str, ...]

    def head_paths(self) -> dict[str, list[str]]:
        """Task -> the submodule paths only that task uses. By default none: every
        submodule counts as shared (models with task heads override this)."""
        return {}

    def part_paths(self) -> dict[str, list[str]]:
        """Shared part name -> its submodule paths. By default each top-level child
        that no task head claims is a part of its own."""
        claimed = {p for paths in self.head_paths().values() for p in paths}
        return {name: [name] for name, _ in self.named_children() if name not in claimed}

    def summary(self, img_size=224) -> ModelSummary:
        """Parameters per part and per task head, multiply-adds per task (at batch 1);
        print() it for a table."""
        own = self.head_paths()
        # the tasks forward() returns now (UMS-Rep's pretrain mode: only "denoise")
        heads = {t: own.get(t, []) for t in getattr(self, "active_tasks", self.tasks)}
        return summarize(self, img_size, self.part_paths(), heads, self.summary_notes())

    def summary_notes(self) -> list[str]:
        return []
