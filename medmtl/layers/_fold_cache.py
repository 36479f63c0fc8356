"""Explicit reuse of eval-mode folds (BatchNorm folded into convolution weights).

Plain eval() folds on every call: nothing can prove the weights unchanged
between calls (a write through `.data`, as a mean-teacher EMA update makes,
does not bump the version counter), so a fold made earlier is never reused.
`layer.freeze()` (which `medmtl.optimize(model)` calls) declares the weights
frozen from here on: eval then reuses the last fold (and the cpu backend its
Winograd transforms), refolding only when a parameter or buffer is replaced or
written in place (load_state_dict, running-statistic updates). Writes through
`.data` after freeze() are not seen: call unfreeze() (or train()) first.
"""

from __future__ import annotations

import torch


def _version(t: torch.Tensor) -> int | None:
    """t's version counter; None for inference tensors, which have none."""
    return None if t.is_inference() else t._version


class FoldCacheMixin:
    """freeze() / unfreeze() and the cached fold of an nn.Module that folds in eval mode.

    The cache is one attribute holding (key, fold), read and replaced as a
    whole, so a call never pairs another call's key with its own fold (threads,
    dtypes, devices).
    """

    _frozen: bool = False
    _fold_entry: tuple | None = None

    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self):
        """Declares the weights frozen from here on (see the module docstring): eval
        calls reuse the folded weights. Returns self."""
        self._frozen = True
        self._fold_entry = None
        return self

    def unfreeze(self):
        """Back to folding on every eval call (drops the cached fold). Returns self."""
        self._frozen = False
        self._fold_entry = None
        return self

    def train(self, mode: bool = True):
        """As nn.Module.train; train mode also unfreezes (training changes the weights)."""
        if mode:
            self.unfreeze()
        return super().train(mode)

    def _cached_fold(self, x: torch.Tensor, name: str, make):
        """make() (the fold, in x's dtype), reused across calls only when frozen and no
        graph is built; with a graph, or under torch.compile, it folds every call so
        gradients reach the modules."""
        builds_graph = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not self._frozen or builds_graph or torch.compiler.is_compiling():
            return make()
        key = (x.dtype, x.device, name) + tuple(
            (t.data_ptr(), _version(t)) for t in list(self.parameters()) + list(self.buffers()))
        entry = self._fold_entry
        if entry is None or entry[0] != key:
            # Made outside inference mode, so the cpu backend can keep its Winograd
            # transforms (an inference tensor is never cached there).
            with torch.inference_mode(False), torch.no_grad():
                entry = (key, make())
            self._fold_entry = entry
        return entry[1]
