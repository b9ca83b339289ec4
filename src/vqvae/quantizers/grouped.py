"""What the grouped residual FSQ and LFQ quantizers share: ``groups`` residual stacks side by
side, each on an equal slice of the features, and the lookups that go through every stack."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GroupedStacks(nn.Module):
    """The lookups of a module holding one residual stack per group in ``self.rvqs``, the
    features split along ``split_dim`` (axis 1 with ``self.accept_image_fmap``, else the last);
    indices carry the group on their first axis."""

    rvqs: nn.ModuleList
    accept_image_fmap: bool

    @property
    def codebooks(self) -> Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        return torch.stack([rvq.get_codes_from_indices(chunk)
                            for rvq, chunk in zip(self.rvqs, indices, strict=True)])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return torch.cat([rvq.get_output_from_indices(chunk)
                          for rvq, chunk in zip(self.rvqs, indices, strict=True)],
                         dim=self.split_dim)
