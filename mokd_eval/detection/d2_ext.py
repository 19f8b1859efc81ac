"""detectron2 extension: a C4 res5 RoI head of basic blocks, so that R18 and R34 work as C4 backbones.

detectron2's stock `Res5ROIHeads` builds res5 from three bottleneck blocks whatever the depth, while its
`build_resnet_backbone` already builds basic-block stages for DEPTH 18/34 (with RES2_OUT_CHANNELS 64).
`MokdRes5ROIHeads` builds res5 like the backbone would: basic blocks for R18 (2) and R34 (3), the first with
stride 2, 256 -> 512 channels; bottleneck blocks (the stock head) for deeper ResNets. Its parameter names
(`roi_heads.res5.<i>.conv1`, `...shortcut`) match `mokd export --to detectron2` output.

Importing this module registers the head in ROI_HEADS_REGISTRY when detectron2 is importable, and does
nothing otherwise (AVAILABLE tells which).
"""

from __future__ import annotations

import importlib.util

BASIC_RES5_BLOCKS = {18: 2, 34: 3}  # blocks of res5 (layer4) in ResNet-18 / ResNet-34
AVAILABLE = importlib.util.find_spec("detectron2") is not None

if AVAILABLE:
    from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
    from torch import nn

    class MokdRes5ROIHeads(Res5ROIHeads):
        """Res5ROIHeads whose res5 is made of basic blocks for DEPTH 18/34."""

        @classmethod
        def _build_res5_block(cls, cfg):
            depth = cfg.MODEL.RESNETS.DEPTH
            if depth not in BASIC_RES5_BLOCKS:
                return super()._build_res5_block(cfg)
            out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8  # res5 is 8x res2: 512
            n = BASIC_RES5_BLOCKS[depth]
            blocks = ResNet.make_stage(BasicBlock, n, stride_per_block=[2] + [1] * (n - 1),
                                       in_channels=out_channels // 2, out_channels=out_channels,
                                       norm=cfg.MODEL.RESNETS.NORM)
            return nn.Sequential(*blocks), out_channels

    if "MokdRes5ROIHeads" not in ROI_HEADS_REGISTRY:
        ROI_HEADS_REGISTRY.register(MokdRes5ROIHeads)
