"""Shared learnable bias per offset: ``PE(i, j) = u_{i−j}``, one scalar per offset and head.

The textbook's point is its weakness: an offset never seen in training has no trained parameter.
Practical form: a table of ``max_distance + 1`` entries per head; offsets ≥ ``max_distance`` are
clipped to the last entry (``clip=True``, default). With ``clip=False`` the scheme shows the
textbook's failure honestly: offsets ≥ ``max_distance`` have no parameter and get 0, the value every
entry had before training. Bidirectional tables mirror the layout for negative offsets.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ToeplitzScheme, bias_float, check_bool, check_int, illustrative_table_


class OffsetBias(ToeplitzScheme):
    name = "offset"
    summary = "one learnable scalar per offset i-j and head, clipped at max_distance"
    paper = "Shaw et al. 2018 (clipped relative positions); textbook §2 'shared bias per offset'"
    learnable = True

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        max_distance: int = 128,
        bidirectional: bool = False,
        clip: bool = True,
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.max_distance = check_int("max_distance", max_distance, minimum=1)
        self.bidirectional = check_bool("bidirectional", bidirectional)
        self.clip = check_bool("clip", clip)
        # entries 0..D for offsets >= 0; in bidirectional use D more entries for offsets -1..-D
        size = self.max_distance + 1 + (self.max_distance if self.bidirectional else 0)
        self.table = nn.Parameter(torch.zeros(size, n_heads))

    @classmethod
    def study_defaults(cls, train_len: int, options: dict) -> dict:
        """``max_distance`` such that the clipped entry sees canonical T5's share of the training pairs,
        the same rule as T5's final bucket (14 at ``train_len = 64``: 61%)."""
        if "max_distance" in options or options.get("clip") is False:
            return {}
        from .t5 import canonical_share_distance

        return {"max_distance": canonical_share_distance(train_len, lambda d: d, 1)}

    def illustrate_(self) -> str:
        return illustrative_table_(self.table)

    @property
    def flat_beyond(self) -> int | None:
        # clipped: every offset >= D reads entry D; unclipped: every offset > D reads 0
        return self.max_distance if self.clip else self.max_distance + 1

    def index(self, offset: Tensor) -> tuple[Tensor, Tensor]:
        """Table index for each offset and a mask of offsets that have a trained entry."""
        d = self.max_distance
        if self.bidirectional:
            mag = offset.abs().clamp(max=d)
            idx = torch.where(offset >= 0, mag, d + mag)
            inside = offset.abs() <= d
        else:
            # causal: j > i is masked; map it to offset 0 so the bias stays finite
            idx = offset.clamp(min=0, max=d)
            inside = offset <= d
        return idx, inside

    def bias_at(self, offset: Tensor) -> Tensor:
        idx, inside = self.index(offset)
        out = bias_float(self.table)[idx]  # [*shape, H]
        if not self.clip:
            out = out * inside.unsqueeze(-1)
        return out.movedim(-1, 0)

    def _offset_header(self) -> str:
        return f"{'entry':>7}  {'':<17}"

    def _offset_cell(self, offset: int) -> str:
        """The table entry an offset reads, and whether it is its own, the clipped one, or none (0)."""
        idx, inside = (int(t) for t in self.index(torch.tensor(offset)))
        if offset < 0 and not self.bidirectional:
            return f"{idx:>7}  {'(masked)':<17}"
        if not inside and not self.clip:
            return f"{'-':>7}  {'none: bias 0':<17}"
        shared = self.clip and abs(offset) >= self.max_distance  # entry D serves every offset >= D
        return f"{idx:>7}  {'clipped' if shared else 'its own':<17}"

    def _offset_notes(self, offsets: list[int]) -> list[str]:
        d = self.max_distance
        notes = [f"clipped: entry {d} serves every offset >= {d}"] if self.clip and any(o >= d for o in offsets) else []
        if self.clip and self.bidirectional and any(o <= -d for o in offsets):
            notes.append(f"clipped: entry {2 * d} serves every offset <= -{d}")
        if not bool(self.table.detach().any()):
            notes.append("(the table starts at 0: training learns its values)")
        return notes

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_distance={self.max_distance}, bidirectional={self.bidirectional}, clip={self.clip}"
