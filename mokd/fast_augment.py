"""The fast multi-crop pipeline (augment.pipeline=fast): DINO's distribution, one decode per image, no PIL chain.

It replaces mokd.augment's PIL chain (one torchvision PIL Compose per crop: RandomResizedCrop, flip,
ColorJitter, RandomGrayscale, PIL GaussianBlur, RandomSolarize, ToTensor, Normalize), which stays selectable as
augment.pipeline=pil. Per sample:

1. `sample_params` draws every crop's parameters (box, flip, jitter factors and order, grayscale, blur sigma,
   solarise) from one generator seeded by (seed, epoch, index), as SeededCrops does, with the distributions of
   DINO's DataAugmentationDINO; crops depend on neither worker count, rank, batch layout nor a resume.
2. The file is decoded once; a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves every crop's
   source region at least its output size (PIL `Image.draft`).
3. `cut` crops, resizes (bicubic, antialiased, as PIL resizes) and flips each crop on uint8 (torchvision v2).
4. The photometric part: colour jitter, grayscale, Gaussian blur, solarisation and normalisation, each crop with
   its own parameters. In the loader worker `photometric_cv2` does it per crop with OpenCV's SIMD kernels on
   float32 HWC arrays, in about a third of the time the torch code takes on a CPU (its HSV hue rotation above
   all; docs/loader.md); with data.gpu_augment the worker ships uint8 crops and their parameters, and
   `photometric` does it on the training device for the whole batch at once (`finish_batch`). Both compute
   torchvision's ops in float32 and agree within 1e-4 after normalisation, except where a value that close to
   128/255 is solarised by one and not the other (a step of at most 1/255 there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from mokd.augment import IMAGENET_MEAN, IMAGENET_STD, SeededCrops, sample_seed
from mokd.config import AugmentConfig
from mokd.data import read_image, to_rgb8

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
JITTER = (0.4, 0.4, 0.2, 0.1)  # DINO's ColorJitter: brightness, contrast, saturation, hue
JITTER_P, GRAY_P, SOLARIZE_THRESHOLD = 0.8, 0.2, 128 / 255
BLUR_SIGMA = (0.1, 2.0)  # PIL GaussianBlur radius (its sigma) at 224 px
TRIES = 10  # RandomResizedCrop's attempts before its centre-crop fallback
# Uniforms one crop consumes, a fixed number so that crops are independent: the box (2 per try, 2 for its place),
# flip, jitter, 4 factors, 4 for the order, grayscale, blur, sigma, solarise
DRAWS = 2 * TRIES + 2 + 14
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass(frozen=True)
class CropKind:
    """One crop of the multi-crop: output side, area range, blur and solarise probabilities, blur sigma range."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float
    sigma: tuple[float, float]


def crop_kinds(cfg: AugmentConfig) -> list[CropKind]:
    """DINO's crops: global 1 (blur p 1), global 2 (blur p 0.1, solarise p 0.2), then the locals (blur p 0.5)."""
    def sigma(size: int) -> tuple[float, float]:
        s = (cfg.global_size if cfg.blur_scale == "global" else size) / 224.0
        return BLUR_SIGMA[0] * s, BLUR_SIGMA[1] * s

    g, l = cfg.global_size, cfg.local_size
    return ([CropKind(g, tuple(cfg.global_scale), 1.0, 0.0, sigma(g)),
             CropKind(g, tuple(cfg.global_scale), 0.1, 0.2, sigma(g))]
            + [CropKind(l, tuple(cfg.local_scale), 0.5, 0.0, sigma(l))] * cfg.local_crops)


def sample_box(u: list[float], width: int, height: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w) from 2 * TRIES + 2 uniforms: area fraction uniform in `scale`,
    log aspect ratio uniform in log RATIO, TRIES attempts to fit, else the centre crop at the nearest ratio."""
    area = width * height
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    for t in range(TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(lo + (hi - lo) * u[2 * t + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[-2] * (height - h + 1)), int(u[-1] * (width - w + 1)), h, w
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(gen: torch.Generator, kinds: list[CropKind], width: int, height: int) -> list[dict]:
    """Every crop's parameters for an image of width x height: a list (one per kind) of
    {box: (top, left, h, w), flip, jitter, order [4] (the op at each position, a uniform permutation),
    factors [4] (brightness, contrast, saturation multipliers, hue shift), gray, sigma (0: no blur), solarize}."""
    draws = torch.rand((len(kinds), DRAWS), generator=gen, dtype=torch.float64).tolist()
    out = []
    for kind, u in zip(kinds, draws):
        box = sample_box(u[:2 * TRIES + 2], width, height, kind.scale)
        u = u[2 * TRIES + 2:]
        b, c, s, h = JITTER
        factors = [1 - b + 2 * b * u[2], 1 - c + 2 * c * u[3], 1 - s + 2 * s * u[4], -h + 2 * h * u[5]]
        out.append({
            "box": box, "flip": u[0] < 0.5, "jitter": u[1] < JITTER_P,
            "order": np.argsort(u[6:10], kind="stable").tolist(), "factors": factors,
            "gray": u[10] < GRAY_P,
            "sigma": kind.sigma[0] + (kind.sigma[1] - kind.sigma[0]) * u[12] if u[11] < kind.blur_p else 0.0,
            "solarize": u[13] < kind.solarize_p,
        })
    return out


def decode(path: str, params: list[dict], kinds: list[CropKind], width: int, height: int, img=None
           ) -> tuple[torch.Tensor, float]:
    """The image as uint8 [3, H', W'] at the smallest JPEG DCT scale that leaves every crop's source region at least
    its output side, and that scale (1, 1/2, 1/4 or 1/8; H' = ceil(height x scale)). `img`: the opened file."""
    reduce = min(min(p["box"][2], p["box"][3]) / k.size for p, k in zip(params, kinds))
    try:
        img = Image.open(path) if img is None else img
        if reduce >= 2 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        read_image(path)  # raises the data module's one-line error naming the file
        raise
    image = pil_to_uint8(img)
    return image, 1.0 / round(width / image.shape[2])


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """A PIL image as 8-bit RGB uint8 [3, H, W] (a channels-last view: torch's uint8 resize reads it fastest)."""
    return torch.from_numpy(np.array(img if img.mode == "RGB" else to_rgb8(img))).permute(2, 0, 1)


def scaled_box(box: tuple[int, int, int, int], factor: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A box (top, left, h, w) of the full image on an image decoded at `factor` (height x width): each edge
    rounded to the nearest pixel there, so the box moves by at most half a reduced pixel, which the reduction
    rule keeps under half an output pixel."""
    top, left, h, w = box
    y0, x0 = min(round(top * factor), height - 1), min(round(left * factor), width - 1)
    y1, x1 = min(max(round((top + h) * factor), y0 + 1), height), min(max(round((left + w) * factor), x0 + 1), width)
    return y0, x0, y1 - y0, x1 - x0


def cut(image: torch.Tensor, params: dict, size: int, factor: float = 1.0) -> torch.Tensor:
    """One crop: the box (on an image decoded at `factor`) resized to size x size (bicubic, antialiased, as PIL
    resizes) and flipped: uint8 [3, size, size]."""
    top, left, h, w = params["box"] if factor == 1.0 else scaled_box(params["box"], factor, *image.shape[-2:])
    crop = F.resized_crop(image, top, left, h, w, [size, size], interpolation=F.InterpolationMode.BICUBIC,
                          antialias=True)
    return F.horizontal_flip(crop) if params["flip"] else crop


def param_tensors(p: dict) -> dict[str, torch.Tensor]:
    """One crop's photometric parameters as tensors (what a data.gpu_augment worker ships): jitter, gray, solarize
    bool; order [4] int64 (the op at each position); factors [4], sigma float32."""
    return {"jitter": torch.tensor(p["jitter"]), "order": torch.tensor(p["order"]),
            "factors": torch.tensor(p["factors"], dtype=torch.float32), "gray": torch.tensor(p["gray"]),
            "sigma": torch.tensor(p["sigma"], dtype=torch.float32), "solarize": torch.tensor(p["solarize"])}


def stack_params(params: list[dict]) -> dict[str, list]:
    """The photometric parameters of N crops as lists, as `photometric` takes them (jitter, order, factors, gray,
    sigma, solarize; one entry per crop)."""
    return {k: [p[k] for p in params] for k in ("jitter", "order", "factors", "gray", "sigma", "solarize")}


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma (ITU-R 601, as PIL and torchvision)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of [N, 3, H, W] in [0, 1] by shift [N] turns; saturation and value stay.

    Written with arithmetic only: on the CPU a select on a bool mask (torch.where, masked_fill) costs 30x an add,
    so "is this channel the maximum" is the float 1 - ceil(max - channel), and the wraps use floor.
    """
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    inv = delta.clamp_min(1e-12).reciprocal_()  # grey pixels (delta 0) have no hue and come back unchanged
    is_r = torch.ceil(v - r).neg_().add_(1)  # 1 where r is the maximum (torchvision's tie order: r, then g, then b)
    is_g = torch.ceil(v - g).neg_().add_(1).mul_(1 - is_r)
    is_b = (1 - is_r).sub_(is_g)
    h6 = (g - b).mul_(is_r)  # hue x 6, in [-1, 5)
    h6 = h6.addcmul_((b - r).add_(delta, alpha=2), is_g).addcmul_((r - g).add_(delta, alpha=4), is_b).mul_(inv)
    h6 = h6.add_(6 * shift.view(-1, 1, 1))
    h6 = h6.sub_(torch.floor(h6 / 6), alpha=6)
    # Each channel from (h, s, v): v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for r, g, b
    k = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h6.unsqueeze(1)
    k = k.sub_(torch.floor(k / 6), alpha=6)
    return torch.addcmul(v.unsqueeze(1), delta.unsqueeze(1), torch.minimum(k, 4 - k).clamp_(0, 1), value=-1)


def _bcs(x: torch.Tensor, ops: list[int | None], f: list[float]) -> torch.Tensor:
    """Brightness, contrast or saturation, each crop its own: ops[n] with factor f[n] (None: untouched), in place
    on x [N, 3, H, W]. torchvision's blends, x <- clamp(f x + (1 - f) ref), ref being 0 (brightness), the grey
    image's mean (contrast) or the grey image (saturation); the same arithmetic for a crop whichever ops its batch
    mixes (ref 0 and f 1 leave a value exactly as it was). No clamp when no factor exceeds 1: then the blend of
    values in [0, 1] stays there."""
    ft = torch.tensor(f, device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    ref = None
    for op, grey in ((SATURATION, _gray), (CONTRAST, lambda y: _gray(y.mean(dim=(2, 3), keepdim=True)))):
        if op in ops:
            w = torch.tensor([o == op for o in ops], device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
            ref = grey(x).mul_(w) if ref is None else ref.add_(grey(x).mul_(w))
    x = x.mul_(ft) if ref is None else x.mul_(ft).add_(ref.mul_(1 - ft))
    return x.clamp_(0, 1) if any(v > 1 for v, o in zip(f, ops) if o is not None) else x


def _apply(x: torch.Tensor, rows: list[int], fn) -> torch.Tensor:
    """x with fn(x[rows], rows) in place of those crops (fn may work in place). The rows are chosen from parameters
    on the CPU, so no crop is copied when all or none are chosen."""
    if len(rows) == len(x):
        return fn(x, rows)
    if rows:
        idx = torch.tensor(rows, device=x.device)
        x[idx] = fn(x[idx], rows)
    return x


def colour(x: torch.Tensor, p: dict[str, list], own: bool = False) -> torch.Tensor:
    """ColorJitter (each op in the crop's own order) where p["jitter"], then grayscale where p["gray"]:
    [N, 3, H, W] float in [0, 1]. `p`: the parameters as lists (`stack_params`); `own`: x may be overwritten.

    The batch runs through 7 slots, 3 for the brightness/contrast/saturation ops each crop does before its hue
    shift, the hue slot, and 3 for those after, so that every op touches the whole batch at once (a crop with
    no op in a slot passes through it unchanged) instead of a gather and a scatter per op and order."""
    x = x if own else x.clone()  # the ops work in place
    n = len(x)
    before, after = [[None] * 3 for _ in range(n)], [[None] * 3 for _ in range(n)]
    for i, (jitter, order) in enumerate(zip(p["jitter"], p["order"])):
        if jitter:
            h = order.index(HUE)
            before[i][3 - h:], after[i][:3 - h] = order[:h], order[h + 1:]
    for slot in range(7):
        if slot == 3:
            shift = torch.tensor([f[HUE] for f in p["factors"]], device=x.device, dtype=x.dtype)
            x = _apply(x, [i for i in range(n) if p["jitter"][i]], lambda y, r: _hue(y, shift[r]))
            continue
        ops = [before[i][slot] if slot < 3 else after[i][slot - 4] for i in range(n)]
        if any(op is not None for op in ops):
            x = _bcs(x, ops, [p["factors"][i][op] if op is not None else 1.0 for i, op in enumerate(ops)])
    return _apply(x, [i for i, g in enumerate(p["gray"]) if g], lambda y, r: _gray(y).repeat(1, 3, 1, 1))


def blur(x: torch.Tensor, sigma: list[float]) -> torch.Tensor:
    """Gaussian blur of each crop with its own sigma (0: untouched), truncated at +-ceil(3 sigma) px (below the
    crop's side, as reflect padding needs), reflect-padded as torchvision's gaussian_blur: [N, 3, H, W] float.
    Separable, one shifted multiply-add per tap: on the CPU several times faster than a grouped conv2d."""
    radius = [min(math.ceil(3 * s), min(x.shape[-2:]) - 1) for s in sigma]
    for r in sorted({r for r, s in zip(radius, sigma) if s > 0}):
        rows = [n for n, (rn, s) in enumerate(zip(radius, sigma)) if s > 0 and rn == r]
        x = _apply(x, rows, lambda y, rr: _blur_radius(y, [sigma[n] for n in rr], r))
    return x


def _blur_radius(x: torch.Tensor, sigma: list[float], r: int) -> torch.Tensor:
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / torch.tensor(sigma, device=x.device, dtype=x.dtype).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).view(len(x), 2 * r + 1, 1, 1, 1)  # tap t of crop n: k[n, t]
    for dim in (-1, -2):
        pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
        xp, size = torch.nn.functional.pad(x, pad, mode="reflect"), x.shape[dim]
        out = xp.narrow(dim, 0, size) * k[:, 0]
        for tap in range(1, 2 * r + 1):
            out.addcmul_(xp.narrow(dim, tap, size), k[:, tap])
        x = out
    return x


def solarize(x: torch.Tensor, sel: list[bool]) -> torch.Tensor:
    """Invert pixels at or above 128/255 in the crops where `sel` (PIL's solarize at 128): [N, 3, H, W] float."""
    # y >= t as a float, 1 + floor(y - t) (a bool-mask select costs 30x this on the CPU; y - t > -1 as t < 1)
    return _apply(x, [n for n, s in enumerate(sel) if s],
                  lambda y, r: torch.lerp(y, 1 - y, torch.floor(y - SOLARIZE_THRESHOLD).add_(1)))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean and std, in place on x [N, 3, H, W]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def photometric(crops: torch.Tensor, p: dict[str, list]) -> torch.Tensor:
    """uint8 crops [N, 3, S, S] on any device and their parameters (`stack_params`: lists, so which crops an op
    touches is decided on the CPU) -> normalised float32 [N, 3, S, S]: colour jitter, grayscale, blur, solarise,
    as DINO orders them. data.gpu_augment's path, on the whole batch; the same code on CPU and CUDA tensors (a
    loader worker uses `photometric_cv2`, crop by crop)."""
    x = crops.float().div_(255)
    x = colour(x, p, own=True)
    x = blur(x, p["sigma"])
    return normalize(solarize(x, p["solarize"]))


# ------------------------------------------------------------------------------------------------------------
# The worker's photometric part: OpenCV on one crop at a time, float32 [S, S, 3]

LUMA = np.array([0.2989, 0.587, 0.114], np.float32)  # torchvision's rgb_to_grayscale weights (OpenCV's are 0.299)
GREY = np.tile(LUMA, (3, 1))  # RGB -> grey in all three channels, for cv2.transform
_STD = np.array(IMAGENET_STD)
# x -> (x - mean) / std per channel, as an affine cv2.transform
NORMALISE = np.hstack([np.diag(1 / _STD), -(np.array(IMAGENET_MEAN) / _STD)[:, None]]).astype(np.float32)


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 1, out=x)


def jitter_cv2(x: np.ndarray, op: int, f: float) -> np.ndarray:
    """One ColorJitter op with factor f on x [S, S, 3] float32 in [0, 1], in place where it can: torchvision's
    adjust_brightness, adjust_contrast, adjust_saturation (blends with 0, the grey mean, the grey image, clamped
    to [0, 1]) or adjust_hue (f turns added to the HSV hue)."""
    if op == HUE:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float: H in [0, 360) degrees, unquantised
        # OpenCV's HSV2RGB wraps hues of [0, 720) but not negative ones: shift by f mod 1 turn
        cv2.add(hsv, (360.0 * (f % 1.0), 0.0, 0.0, 0.0), dst=hsv)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if op == BRIGHTNESS:
        np.multiply(x, np.float32(f), out=x)
    elif op == CONTRAST:
        mean = float(LUMA @ np.array(cv2.mean(x)[:3], np.float32))  # the grey image's mean (it is linear)
        cv2.transform(x, np.hstack([f * np.eye(3), np.full((3, 1), (1 - f) * mean)]).astype(np.float32), dst=x)
    else:
        cv2.transform(x, (f * np.eye(3) + (1 - f) * GREY).astype(np.float32), dst=x)
    return _clip(x) if f > 1 else x  # a blend of values in [0, 1] with f <= 1 stays there


def colour_cv2(x: np.ndarray, p: dict) -> np.ndarray:
    """ColorJitter in the crop's own order (if p["jitter"]), then grayscale (if p["gray"]): [S, S, 3] float32."""
    if p["jitter"]:
        for op in p["order"]:
            x = jitter_cv2(x, op, p["factors"][op])
    return cv2.transform(x, GREY) if p["gray"] else x


def blur_cv2(x: np.ndarray, sigma: float) -> np.ndarray:
    """`blur` for one crop (sigma 0: untouched): the same +-ceil(3 sigma) Gaussian and reflect (OpenCV's
    REFLECT_101) border."""
    if sigma <= 0:
        return x
    k = 2 * min(math.ceil(3 * sigma), min(x.shape[:2]) - 1) + 1
    return cv2.GaussianBlur(x, (k, k), sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def to_float_hwc(crop: torch.Tensor) -> np.ndarray:
    """uint8 [3, S, S] -> float32 [S, S, 3] in [0, 1] (cv2.merge interleaves the planes 4x faster than numpy
    converts a strided view)."""
    x = np.empty((crop.shape[1], crop.shape[2], 3), np.float32)
    return np.divide(cv2.merge(list(crop.contiguous().numpy())), np.float32(255), out=x)


def photometric_cv2(crop: torch.Tensor, p: dict) -> torch.Tensor:
    """`photometric` for one crop in a loader worker: uint8 [3, S, S] and its parameters (`sample_params`) ->
    normalised float32 [3, S, S]."""
    x = to_float_hwc(crop)
    x = blur_cv2(colour_cv2(x, p), p["sigma"])
    if p["solarize"]:
        x = np.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)
    cv2.transform(x, NORMALISE, dst=x)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


_MALLOC_TUNED = _CV2_ONE_THREAD = False


def cv2_one_thread() -> None:
    """OpenCV on one thread in this process (once): a crop is too small to split, and the loader's parallelism
    is its worker processes (OpenCV would otherwise start a thread per core in each)."""
    global _CV2_ONE_THREAD
    if not _CV2_ONE_THREAD:
        _CV2_ONE_THREAD = True
        cv2.setNumThreads(1)


def keep_freed_memory() -> None:
    """Let glibc reuse freed tensor memory instead of returning it to the system (once per process).

    Each crop's ops allocate and free a few hundred kB buffers; above glibc's mmap threshold every one of them is a
    fresh mmap whose pages fault in again, which made the colour ops 3x slower in a loader worker. (PIL keeps its own
    block pool, so the PIL chain does not pay this.) A no-op where the C library is not glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 64 << 20)
        libc.mallopt(m_top_pad, 16 << 20)
    except (OSError, AttributeError):
        pass


class FastMultiCrop:
    """(image source, generator) -> list of 2 + local_crops crops, globals first: normalised float [3, S, S], or
    with `ship_uint8` a dict {crops: uint8 [3, S, S] each, params: param_tensors of each} for `finish_batch`."""

    def __init__(self, cfg: AugmentConfig, ship_uint8: bool = False):
        self.kinds, self.ship_uint8 = crop_kinds(cfg), ship_uint8

    def __call__(self, source, gen: torch.Generator):
        """`source`: a file path (decoded here, at reduced scale where the crops allow) or a PIL image."""
        keep_freed_memory()
        cv2_one_thread()
        if isinstance(source, Image.Image):
            width, height = source.size
            params = sample_params(gen, self.kinds, width, height)
            image, factor = pil_to_uint8(source), 1.0
        else:
            try:
                img = Image.open(source)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                read_image(source)  # raises the data module's one-line error naming the file
                raise
            width, height = img.size
            params = sample_params(gen, self.kinds, width, height)
            image, factor = decode(source, params, self.kinds, width, height, img)
        crops = [cut(image, p, k.size, factor) for p, k in zip(params, self.kinds)]
        if self.ship_uint8:
            return {"crops": crops, "params": [param_tensors(p) for p in params]}
        return self.finish(crops, params)

    def finish(self, crops: list[torch.Tensor], params: list[dict]) -> list[torch.Tensor]:
        """Photometric part in the worker: each crop through OpenCV (`photometric_cv2`)."""
        return [photometric_cv2(c, p) for c, p in zip(crops, params)]


def finish_batch(batch, device: torch.device) -> list[torch.Tensor]:
    """A collated batch of FastMultiCrop(ship_uint8=True) samples -> the crops on `device`, normalised float
    [B, 3, S, S] each: the photometric part for the whole batch at once, one call per crop position."""
    out = []
    for crops, p in zip(batch["crops"], batch["params"]):
        crops = crops.to(device, non_blocking=True)
        out.append(photometric(crops, {k: v.tolist() for k, v in p.items()}))  # collated [B], [B, 4] tensors
    return out


class FastSeededCrops(SeededCrops):
    """SeededCrops for the fast pipeline: item i of epoch e -> (crops, label), every draw from a generator seeded
    by (seed, e, i). Folder data are decoded here from their files (reduced-scale JPEG decode); in-memory sets
    arrive as PIL images."""

    def __init__(self, dataset, multicrop: FastMultiCrop, seed: int):
        super().__init__(dataset, multicrop, seed)
        self.from_files = getattr(dataset, "paths", None) is not None and dataset.transform is None

    def __getitem__(self, i: int):
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i) % (2**63))
        if self.from_files:
            return self.multicrop(self.dataset.paths[i], gen), self.dataset.targets[i]
        img, label = self.dataset[i]
        return self.multicrop(img, gen), label


def to_device(crops, device: torch.device) -> list[torch.Tensor]:
    """A loader batch's crops on `device`: a list of float crops is moved; a data.gpu_augment batch (a dict of
    uint8 crops and their parameters) gets its photometric part there."""
    if isinstance(crops, dict):
        return finish_batch(crops, device)
    return [c.to(device, non_blocking=True) for c in crops]
