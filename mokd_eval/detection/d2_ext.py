"""detectron2 extension: the C4 res5 RoI head of the paper's recipe, for every ResNet depth.

Two changes to detectron2's stock `Res5ROIHeads`:
- res5 is built like the backbone would build it: basic blocks for R18 (2) and R34 (3), the first with
  stride 2, 256 -> 512 channels; bottleneck blocks (the stock head) for deeper ResNets. (The stock head
  builds three bottleneck blocks whatever the depth.)
- a norm layer (MODEL.RESNETS.NORM, SyncBN in our configs) follows res5, as in the C4 recipe of SEED [15],
  which the paper follows and which is MoCo's (there called `Res5ROIHeadsExtraNorm`): fine-tuning a
  self-supervised backbone with normalised heads.
Its parameter names (`roi_heads.res5.<i>.conv1`, `...shortcut`) match `mokd export --to detectron2` output;
`roi_heads.res5.norm` starts fresh.

Importing this module registers the head in ROI_HEADS_REGISTRY when detectron2 is importable, and does
nothing otherwise (AVAILABLE tells which).
"""

from __future__ import annotations

import importlib.util

BASIC_RES5_BLOCKS = {18: 2, 34: 3}  # blocks of res5 (layer4) in ResNet-18 / ResNet-34
AVAILABLE = importlib.util.find_spec("detectron2") is not None

if AVAILABLE:
    from detectron2.layers import get_norm
    from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
    from torch import nn

    class MokdRes5ROIHeads(Res5ROIHeads):
        """Res5ROIHeads with a depth-matched res5 and a norm layer after it."""

        @classmethod
        def _build_res5_block(cls, cfg):
            depth = cfg.MODEL.RESNETS.DEPTH
            norm = cfg.MODEL.RESNETS.NORM
            if depth in BASIC_RES5_BLOCKS:
                out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8  # res5 is 8x res2: 512
                n = BASIC_RES5_BLOCKS[depth]
                blocks = ResNet.make_stage(BasicBlock, n, stride_per_block=[2] + [1] * (n - 1),
                                           in_channels=out_channels // 2, out_channels=out_channels, norm=norm)
                res5 = nn.Sequential(*blocks)
            else:
                res5, out_channels = super()._build_res5_block(cfg)
            res5.add_module("norm", get_norm(norm, out_channels))
            return res5, out_channels

    if "MokdRes5ROIHeads" not in ROI_HEADS_REGISTRY:
        ROI_HEADS_REGISTRY.register(MokdRes5ROIHeads)
