"""C4 Mask R-CNN from torchvision.models.detection parts, for machines without detectron2.

The design of He et al.'s C4 model as detectron2 builds it: the ResNet up to res4 (stride 16) is the one
feature map for the RPN and the RoI pooling; res5 (layer4, first block stride 2) is the RoI head, shared by
boxes (RoIAlign 14x14 -> res5 -> mean pool -> class + box layers) and masks (RoIAlign 14x14 -> res5 ->
2x deconvolution -> per-class 14x14 masks). Differences from the detectron2 run: BatchNorm is frozen
(FrozenBatchNorm2d) rather than synchronised, RoIAlign is torchvision's (aligned=False), the mask branch
runs res5 a second time on the positive boxes instead of reusing the box branch's features, and training
runs in one process. Its numbers are therefore not interchangeable with the detectron2 backend's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mokd.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = (123.675, 116.28, 103.53) / 255
IMAGENET_STD = (0.229, 0.224, 0.225)  # = (58.395, 57.12, 57.375) / 255


@dataclass
class Schedule:
    """detectron2's multi-step schedule scaled to `iters`: steps at 2/3 and 8/9 (120k, 160k of 180k)."""
    iters: int = 180_000
    batch_size: int = 16
    base_lr: float | None = None  # None: 0.02 x batch / 16 (linear scaling rule)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    gamma: float = 0.1

    @property
    def lr(self) -> float:
        return self.base_lr if self.base_lr is not None else 0.02 * self.batch_size / 16

    @property
    def steps(self) -> tuple[int, ...]:
        from mokd_eval.detection.d2_config import lr_steps

        return tuple(lr_steps(self.iters))

    @property
    def warmup(self) -> int:
        """Linear warm-up length: warmup_iters, but at most a tenth of a shortened run."""
        return min(self.warmup_iters, max(1, self.iters // 10))

    def lr_at(self, it: int) -> float:
        factor = self.gamma ** sum(it >= s for s in self.steps)
        if it < self.warmup:
            alpha = it / self.warmup
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return self.lr * factor


class Res4Backbone(nn.Module):
    """A timm / torchvision ResNet's stem and layer1-3: images -> res4 map (stride 16)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.body = nn.Sequential(resnet.conv1, resnet.bn1, getattr(resnet, "act1", None) or resnet.relu,
                                  resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3)
        self.out_channels = _out_channels(resnet.layer3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Res5BoxHead(nn.Module):
    """RoI features [R, C4, 14, 14] -> res5 -> mean pool -> [R, C5]."""

    def __init__(self, res5: nn.Module):
        super().__init__()
        self.res5 = res5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res5(x).mean(dim=(2, 3))


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    for name in ("conv3", "conv2"):
        if hasattr(last, name):
            return getattr(last, name).out_channels
    raise UserError("cannot tell the width of this ResNet stage")


def standard_stem(resnet: nn.Module) -> None:
    """Undo a small-image stem: detection uses stride-2 conv1 and the stem max-pool (stride 4 in all)."""
    resnet.conv1.stride = (2, 2)
    if isinstance(resnet.maxpool, nn.Identity):
        resnet.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


def build_c4_mask_rcnn(resnet: nn.Module, num_classes: int, *, train_sizes=(600, 800), test_size: int = 800,
                       max_size: int = 1333, rois_per_image: int = 512, test_proposals: int = 1000,
                       sampling: str = "range") -> nn.Module:
    """torchvision MaskRCNN in the C4 design around a ResNet (its weights are used in place).

    num_classes: object classes (background added); train_sizes: (min, max) shorter side, sampled per image
    on a grid of 25 px steps (the test size is used at evaluation). rois_per_image (sampled RoIs per training
    image, detectron2's 512) and test_proposals (RPN proposals kept per test image, 1000) set most of the
    cost, since res5 runs once per RoI; lower them only for quick checks.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    from mokd_eval.export import resnet_structure

    resnet_structure(resnet.state_dict())  # a plain ResNet or a UserError
    standard_stem(resnet)
    resnet = freeze_batchnorm(resnet)
    backbone = Res4Backbone(resnet)
    res5 = resnet.layer4
    c5 = _out_channels(res5)
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=0)
    model = MaskRCNN(
        backbone, num_classes=None, min_size=sizes_grid(train_sizes, test_size, sampling), max_size=max_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=12000, rpn_post_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=test_proposals,
        box_roi_pool=pooler, box_head=Res5BoxHead(res5), box_predictor=FastRCNNPredictor(c5, num_classes + 1),
        box_batch_size_per_image=rois_per_image, box_detections_per_img=100, box_score_thresh=0.05,
        mask_roi_pool=pooler, mask_head=res5, mask_predictor=MaskRCNNPredictor(c5, 256, num_classes + 1))
    return model


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding its statistics and affine parameters."""
    from torchvision.ops import FrozenBatchNorm2d

    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            frozen.weight.copy_(module.weight if module.affine else torch.ones_like(frozen.weight))
            frozen.bias.copy_(module.bias if module.affine else torch.zeros_like(frozen.bias))
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def sizes_grid(train_sizes, test_size: int, sampling: str = "range") -> tuple[int, ...]:
    """The shorter sides training draws from: a range on a 25 px grid (both ends kept), or the listed choice."""
    if sampling == "choice":
        return tuple(sorted(set(train_sizes)))
    lo, hi = min(train_sizes), max(train_sizes)
    grid = sorted(set(range(lo, hi + 1, 25)) | {hi})
    return tuple(grid)


def set_eval_size(model: nn.Module, test_size: int) -> None:
    # GeneralizedRCNNTransform picks a random min_size in training and min_size[-1] in eval
    model.transform.min_size = (test_size,)


def infinite_loader(dataset, batch_size: int, seed: int, num_workers: int):
    from mokd_eval.detection.coco import collate

    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g,
                                             num_workers=num_workers, collate_fn=collate, drop_last=False)
        yield from loader
        epoch += 1


def train_c4(model: nn.Module, dataset, schedule: Schedule, *, device: torch.device, seed: int = 0,
             num_workers: int = 2, log_every: int = 20, log=print) -> list[dict]:
    """SGD on the summed torchvision losses with the multi-step schedule; returns the logged losses."""
    torch.manual_seed(seed)
    model.to(device).train()
    # detectron2's defaults: one weight decay for weights and biases (the frozen norms have no parameters)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=schedule.lr_at(0), momentum=schedule.momentum,
                                weight_decay=schedule.weight_decay)
    history = []
    batches = infinite_loader(dataset, schedule.batch_size, seed, num_workers)
    t0 = time.time()
    for it in range(schedule.iters):
        images, targets = next(batches)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(it)
        losses = model(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"detection training diverged at iteration {it}: losses {losses}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if it % log_every == 0 or it == schedule.iters - 1:
            row = {"iter": it, "lr": schedule.lr_at(it), "loss": loss.item(),
                   **{k: v.item() for k, v in losses.items()}}
            history.append(row)
            log(f"iter {it + 1}/{schedule.iters}  loss {row['loss']:.3f}  lr {row['lr']:.5f}  "
                f"{time.time() - t0:.0f}s")
    return history


@torch.no_grad()
def evaluate_c4(model: nn.Module, dataset, *, device: torch.device, test_size: int = 800,
                batch_size: int = 2, num_workers: int = 2) -> dict[str, float]:
    """Inference on every image of `dataset` at `test_size`, scored with pycocotools (six AP figures)."""
    from mokd_eval.detection.coco import coco_ap, coco_results, collate

    set_eval_size(model, test_size)
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate)
    outputs = {}
    for images, targets in loader:
        preds = model([im.to(device) for im in images])
        for t, p in zip(targets, preds):
            outputs[t["image_id"]] = {k: v.cpu() for k, v in p.items()}
    boxes, segms = coco_results(outputs, dataset)
    return coco_ap(dataset, boxes, segms)


def run_torchvision(resnet: nn.Module, splits, *, schedule: Schedule, train_sizes=(600, 800), test_size: int = 800,
                    rois_per_image: int = 512, test_proposals: int = 1000, device: torch.device, seed: int = 0,
                    num_workers: int = 2, log=print, sampling: str = "range") -> dict:
    """Train the C4 Mask R-CNN on splits.train, evaluate on splits.val: {"metrics", "history", "settings"}."""
    from mokd_eval.detection.coco import CocoDetection

    train_set = CocoDetection(splits.train_json, splits.train_images, train=True)
    val_set = CocoDetection(splits.val_json, splits.val_images, train=False)
    if train_set.cat_ids != val_set.cat_ids:
        raise UserError(f"train and val annotations have different categories ({len(train_set.cat_ids)} vs "
                        f"{len(val_set.cat_ids)} ids)")
    torch.manual_seed(seed)
    model = build_c4_mask_rcnn(resnet, train_set.num_classes, train_sizes=train_sizes, test_size=test_size,
                               rois_per_image=rois_per_image, test_proposals=test_proposals, sampling=sampling)
    history = train_c4(model, train_set, schedule, device=device, seed=seed, num_workers=num_workers, log=log)
    metrics = evaluate_c4(model, val_set, device=device, test_size=test_size, num_workers=num_workers)
    settings = {"backend": "torchvision", "design": "C4 Mask R-CNN (torchvision parts, FrozenBN)",
                **asdict(schedule), "lr": schedule.lr, "steps": list(schedule.steps), "warmup": schedule.warmup,
                "train_sizes": list(sizes_grid(train_sizes, test_size, sampling)), "train_sizes_sampling": sampling,
                "test_size": test_size,
                "rois_per_image": rois_per_image, "test_proposals": test_proposals, "seed": seed}
    return {"metrics": metrics, "history": history, "settings": settings,
            "data": {"train_images": len(train_set), "val_images": len(val_set), "classes": train_set.num_classes}}
