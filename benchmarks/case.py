"""A benchmark case: inputs built once, and providers timed on them.

A provider turns a case's inputs into a zero-argument callable; every provider
of a case runs on the same inputs in the same process. `bytes` in the inputs
(when present) is what the op must read, for the report's GB/s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Case:
    op: str
    name: str
    make_inputs: Callable[[], dict]
    description: str
    providers: dict[str, Callable[[dict], Callable[[], object]]] = field(default_factory=dict)
    rounds: int | None = None  # None: MEDMTL_BENCH_ROUNDS (default 30)
    inference: bool = True     # run under torch.no_grad()
    group: str | None = None   # cases of one group are also summed in the report

    @property
    def key(self) -> str:
        return f"{self.op}:{self.name}"
