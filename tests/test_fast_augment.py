"""The fast multi-crop pipeline (mokd.fast_augment): DINO's parameter distributions, torchvision's op
definitions, a reduced-scale decode close to the full one, and the per-sample determinism SeededCrops has."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from mokd import fast_augment as fa
from mokd.config import AugmentConfig, load_config
from mokd.data import build_dataset, parse_data_spec
from mokd.errors import UserError
from tests.tiny import TINY_OVERRIDES

DRAWS = 3000  # images; each gives 2 global and 2 local crops
W, H = 500, 375


@pytest.fixture(scope="module")
def drawn():
    kinds = fa.crop_kinds(AugmentConfig(local_crops=2))
    return [fa.sample_params(torch.Generator().manual_seed(i), kinds, W, H) for i in range(DRAWS)]


def dino_boxes(scale: tuple[float, float], n: int) -> np.ndarray:
    """DINO's own draw: torchvision's RandomResizedCrop.get_params (its global RNG, seeded), [n, 4]."""
    torch.manual_seed(0)
    img = torch.empty(3, H, W)
    return np.array([T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])


def area_and_log_ratio(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = boxes[:, 2].astype(float), boxes[:, 3].astype(float)
    return h * w / (W * H), np.log(w / h)


def test_crop_boxes_follow_random_resized_crops_distribution(drawn):
    """Area fraction and log aspect ratio of our boxes against torchvision's get_params over 3,000 draws each:
    two-sample Kolmogorov-Smirnov p > 0.001 (the draws are seeded, so this cannot flake); every box inside the
    image; the box's place uniform (mean offset within 2% of the free room's middle)."""
    cfg = AugmentConfig()
    for crop, scale in ((0, cfg.global_scale), (1, cfg.global_scale), (2, cfg.local_scale), (3, cfg.local_scale)):
        ours = np.array([d[crop]["box"] for d in drawn])
        ref = dino_boxes(scale, DRAWS)
        for a, b in zip(area_and_log_ratio(ours), area_and_log_ratio(ref)):
            assert stats.ks_2samp(a, b).pvalue > 1e-3
        top, left, h, w = ours.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
        assert abs(np.mean(top / np.maximum(H - h, 1)) - 0.5) < 0.02
        assert abs(np.mean(left / np.maximum(W - w, 1)) - 0.5) < 0.02


def test_flip_jitter_grey_blur_and_solarise_rates_are_dinos(drawn):
    """Rates over 3,000 draws within 0.03 of DINO's probabilities (4 standard errors at p = 0.5)."""
    def rate(crop, key):
        return np.mean([bool(d[crop][key]) for d in drawn])

    dino = {  # DataAugmentationDINO: global 1, global 2, local
        "flip": (0.5, 0.5, 0.5), "jitter": (0.8, 0.8, 0.8), "gray": (0.2, 0.2, 0.2),
        "sigma": (1.0, 0.1, 0.5), "solarize": (0.0, 0.2, 0.0)}
    for key, (g1, g2, loc) in dino.items():
        for crop, p in ((0, g1), (1, g2), (2, loc), (3, loc)):
            assert abs(rate(crop, key) - p) < 0.03, (key, crop)


def test_jitter_factors_order_and_blur_sigma_are_dinos(drawn):
    """ColorJitter(0.4, 0.4, 0.2, 0.1): factors uniform in [0.6, 1.4], [0.6, 1.4], [0.8, 1.2], hue shift in
    [-0.1, 0.1] (KS p > 0.001 against the uniform); each op first a quarter of the time (within 0.03); blur
    sigma uniform in [0.1, 2] at 224 px (KS p > 0.001)."""
    factors = np.array([d[c]["factors"] for d in drawn for c in range(4)])
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert stats.kstest(factors[:, col], stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    orders = np.array([d[c]["order"] for d in drawn for c in range(4)])
    assert (np.sort(orders, 1) == np.arange(4)).all()  # permutations
    for op in range(4):
        assert abs(np.mean(orders[:, 0] == op) - 0.25) < 0.03
    sigma = np.array([d[c]["sigma"] for d in drawn for c in range(4) if d[c]["sigma"] > 0])
    assert stats.kstest(sigma, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3


def test_blur_sigma_scales_as_the_pil_chain():
    """blur_scale=global: every crop by 0.1-2 px x global/224 (DINO and the release); crop: by its own size."""
    kinds = fa.crop_kinds(AugmentConfig(global_size=224, local_size=96))
    assert kinds[2].sigma == pytest.approx((0.1, 2.0)) and kinds[0].sigma == pytest.approx((0.1, 2.0))
    kinds = fa.crop_kinds(AugmentConfig(global_size=224, local_size=96, blur_scale="crop"))
    assert kinds[2].sigma == pytest.approx((0.1 * 96 / 224, 2.0 * 96 / 224))


def test_batched_ops_equal_torchvisions_per_crop_ops():
    """Each op of `photometric`, with per-crop parameters on a batch, equals torchvision v2's functional op on each
    crop alone (within 2e-6 on [0, 1] values): brightness, contrast, saturation, hue, grayscale, blur (a kernel
    of +-ceil(3 sigma)), solarise at 128."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 20, 24), generator=g).float() / 255
    x[0, :, :4, :4] = 0.5  # grey pixels: no hue
    x[1, 0, :3], x[1, 1, :3] = 0.7, 0.7  # ties for the maximum channel
    factors = torch.tensor([0.6, 1.4, 1.0, 0.9, 1.2])
    for op, tv in ((fa.BRIGHTNESS, F.adjust_brightness), (fa.CONTRAST, F.adjust_contrast),
                   (fa.SATURATION, F.adjust_saturation)):
        ref = torch.stack([tv(x[i], factors[i].item()) for i in range(5)])
        assert (fa._bcs(x.clone(), [op] * 5, factors.tolist()) - ref).abs().max() < 2e-6
    mixed = [fa.BRIGHTNESS, fa.CONTRAST, None, fa.SATURATION, fa.CONTRAST]  # a batch mixing the ops: each its own
    tv = {fa.BRIGHTNESS: F.adjust_brightness, fa.CONTRAST: F.adjust_contrast, fa.SATURATION: F.adjust_saturation}
    ref = torch.stack([tv[op](x[i], factors[i].item()) if op is not None else x[i] for i, op in enumerate(mixed)])
    assert (fa._bcs(x.clone(), mixed, factors.tolist()) - ref).abs().max() < 2e-6
    shift = torch.tensor([-0.1, 0.05, 0.0, 0.5, -0.5])
    ref = torch.stack([F.adjust_hue(x[i], shift[i].item()) for i in range(5)])
    assert (fa._hue(x, shift) - ref).abs().max() < 2e-6
    p = {"jitter": [False] * 5, "order": [[0, 1, 2, 3]] * 5, "factors": [[1.0, 1.0, 1.0, 0.0]] * 5,
         "gray": [True, False, True, False, False]}
    grey = fa.colour(x, p)
    assert torch.allclose(grey[0], F.rgb_to_grayscale(x[0], 3), atol=2e-6) and torch.equal(grey[1], x[1])
    sigma = [0.1, 2.0, 0.0, 1.0, 0.5]
    ref = torch.stack([F.gaussian_blur(x[i], [2 * math.ceil(3 * s) + 1] * 2, [s, s]) if s else x[i]
                       for i, s in enumerate(sigma)])
    assert (fa.blur(x, sigma) - ref).abs().max() < 2e-6
    ref = torch.stack([F.solarize(x[i], 128 / 255) if s else x[i] for i, s in enumerate([1, 0, 1, 0, 1])])
    assert torch.equal(fa.solarize(x.clone(), [True, False, True, False, True]), ref)


def test_the_workers_opencv_ops_equal_torchvisions_ops():
    """The loader worker's OpenCV ops (photometric_cv2's parts, on float32 [H, W, 3]) equal torchvision v2's
    functional ops within 1e-5 on [0, 1] values (float32 rounding; OpenCV's own HSV conversion and Gaussian
    kernel): brightness, contrast, saturation (factors below and above 1, so with and without the clamp), hue
    (shifts of both signs, grey pixels and ties for the maximum), grayscale with torchvision's 0.2989 red weight,
    blur with the +-ceil(3 sigma) kernel and reflect border, and the whole chain against `photometric`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 20, 24), generator=g).float() / 255
    x[:, :4, :4] = 0.5  # grey pixels: no hue
    x[0, 4:6], x[1, 4:6] = 0.7, 0.7  # ties for the maximum channel

    def cv(fn, *args):
        out = fn(np.ascontiguousarray(x.permute(1, 2, 0).numpy()), *args)
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)

    tv = {fa.BRIGHTNESS: F.adjust_brightness, fa.CONTRAST: F.adjust_contrast, fa.SATURATION: F.adjust_saturation,
          fa.HUE: F.adjust_hue}
    for op, factors in ((fa.BRIGHTNESS, (0.6, 1.0, 1.4)), (fa.CONTRAST, (0.6, 1.4)), (fa.SATURATION, (0.8, 1.2)),
                        (fa.HUE, (-0.1, -0.02, 0.0, 0.05, 0.1, 0.5, -0.5))):
        for f in factors:
            assert (cv(fa.jitter_cv2, op, f) - tv[op](x, f)).abs().max() < 1e-5, (op, f)
    p = {"jitter": True, "order": [2, 3, 0, 1], "factors": [1.3, 0.7, 1.2, -0.08], "gray": True}
    ref = F.rgb_to_grayscale(F.adjust_contrast(F.adjust_brightness(F.adjust_hue(F.adjust_saturation(
        x, 1.2), -0.08), 1.3), 0.7), 3)
    assert (cv(fa.colour_cv2, p) - ref).abs().max() < 1e-5
    for s in (0.1, 0.5, 1.0, 2.0, 4.0):
        k = 2 * math.ceil(3 * s) + 1
        assert (cv(fa.blur_cv2, s) - F.gaussian_blur(x, [k, k], [s, s])).abs().max() < 1e-5, s
    assert torch.equal(cv(fa.blur_cv2, 0.0), x)


def test_the_workers_opencv_path_equals_the_batched_torch_path():
    """photometric_cv2 (loader workers) against photometric (data.gpu_augment's batched torch code) on 200 random
    crops with sample_params' parameters, normalised outputs: within 1e-4 everywhere except values the two put on
    either side of solarise's 128/255 threshold (float32 rounding apart), which differ by that step, 1/255 at most
    in [0, 1] (under 0.0175 normalised); fewer than 1 in 10,000 values are such."""
    kinds = fa.crop_kinds(AugmentConfig(global_size=32, local_size=16, local_crops=2))
    rng = np.random.default_rng(0)
    diffs = []
    for i in range(50):
        params = fa.sample_params(torch.Generator().manual_seed(i), kinds, W, H)
        crops = [torch.from_numpy(rng.integers(0, 256, (3, k.size, k.size), dtype=np.uint8)) for k in kinds]
        for c, p in zip(crops, params):
            ref = fa.photometric(c[None], fa.stack_params([p]))[0]
            diffs.append((fa.photometric_cv2(c, p) - ref).abs().flatten())
    d = torch.cat(diffs)
    assert d.max() < (1 / 255 + 1e-4) / min(fa.IMAGENET_STD)
    assert (d > 1e-4).float().mean() < 1e-4


def test_jitter_applies_the_ops_in_each_crops_own_order():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    p = {"jitter": [True, True], "order": [[0, 3, 1, 2], [2, 1, 3, 0]], "factors": [[1.3, 0.7, 1.2, 0.08]] * 2,
         "gray": [False, False]}
    out = fa.colour(x, p)
    for i, order in enumerate(p["order"]):
        y = x[i]
        for op in order:
            y = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue][op](y, p["factors"][i][op])
        assert torch.allclose(out[i], y, atol=1e-5)
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def write_jpeg(path, size=(800, 600)):
    import skimage

    img = Image.open(f"{skimage.__path__[0]}/data/astronaut.png").convert("RGB").resize(size, Image.BICUBIC)
    img.save(path, quality=90)
    return path


def test_a_reduced_scale_decode_gives_the_crop_within_stated_errors(tmp_path):
    """Crops whose source regions are at least 4x (8x) their output side are cut from a 1/4-scale (1/8-scale)
    JPEG decode (DCT scaling). Against the same box cut from the full decode of a detailed photograph: mean
    absolute error under 1 level of 255 from a 1/4 decode and under 3.5 from a 1/8 decode (8x8 block means, then
    hardly resized: the most a DCT-scaled decode departs from an antialiased resize), 99th percentile under 24.
    The box itself moves by at most half an output pixel (each edge rounded to the reduced grid)."""
    path = str(write_jpeg(tmp_path / "a.jpg"))
    kinds = [fa.CropKind(64, (0.5, 1.0), 0.0, 0.0, (0.1, 2.0)), fa.CropKind(32, (0.3, 0.5), 0.0, 0.0, (0.1, 2.0))]
    full = fa.pil_to_uint8(Image.open(path).convert("RGB"))
    checked, factors = 0, set()
    for seed in range(8):
        params = fa.sample_params(torch.Generator().manual_seed(seed), kinds, 800, 600)
        small, factor = fa.decode(path, params, kinds, 800, 600)
        if factor == 1.0:  # a box too small for a reduced decode
            continue
        factors.add(factor)
        assert factor <= 0.5 and tuple(small.shape[1:]) == (round(600 * factor), round(800 * factor))
        for p, k in zip(params, kinds):
            y, x, h, w = fa.scaled_box(p["box"], factor, *small.shape[1:])
            same = {**p, "box": tuple(round(v / factor) for v in (y, x, h, w))}  # that box on the full image
            edges = lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])  # noqa: E731
            assert all(abs(a - b) <= 0.5 / factor for a, b in zip(edges(same["box"]), edges(p["box"])))
            assert 0.5 / factor <= 0.5 * min(p["box"][2:]) / k.size  # half a reduced pixel <= half an output pixel
            err = (fa.cut(small, p, k.size, factor).float() - fa.cut(full, same, k.size).float()).abs()
            assert err.mean() < (1.0 if factor == 0.25 else 3.5) and err.flatten().quantile(0.99) < 24.0
            checked += 1
    assert checked == 16 and len(factors) == 2  # both scales were seen


def test_a_crop_smaller_than_twice_its_output_forces_a_full_decode(tmp_path):
    path = str(write_jpeg(tmp_path / "a.jpg", (200, 150)))
    kinds = fa.crop_kinds(AugmentConfig(global_size=96, local_size=48, local_crops=1))
    params = fa.sample_params(torch.Generator().manual_seed(0), kinds, 200, 150)
    image, factor = fa.decode(path, params, kinds, 200, 150)
    assert factor == 1.0 and tuple(image.shape) == (3, 150, 200)


def jpeg_folder(root, n=12):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(60, 120)), int(rng.integers(60, 120)))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return build_dataset(parse_data_spec(str(root)), "train")


SMALL = AugmentConfig(global_size=32, local_size=16, local_crops=3, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4))


def test_crops_do_not_depend_on_worker_count_and_leave_the_global_rng_alone(tmp_path):
    ds = fa.FastSeededCrops(jpeg_folder(tmp_path), fa.FastMultiCrop(SMALL), seed=3)
    assert ds.from_files
    crops, label = ds[5]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3 and crops[0].dtype == torch.float32
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert all(torch.equal(a, b) for a, b in zip(crops, ds[5][0]))
    assert torch.equal(state, torch.get_rng_state())
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers)
        batches[workers] = [c for crops, _ in loader for c in crops]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0][0], crops[0])


def test_shipped_uint8_crops_finished_on_the_device_equal_the_workers_crops(tmp_path):
    """data.gpu_augment: the batch's photometric part, done by finish_batch (on CPU tensors here; the same code
    runs on CUDA), gives the crops the worker gives without it (with OpenCV): within 1e-4, normalised, but for
    values solarised by one and not the other (at most the 1/255 step, see the test above)."""
    images = jpeg_folder(tmp_path)
    worker = fa.FastSeededCrops(images, fa.FastMultiCrop(SMALL), seed=0)
    shipped = fa.FastSeededCrops(images, fa.FastMultiCrop(SMALL, ship_uint8=True), seed=0)
    batch = next(iter(torch.utils.data.DataLoader(shipped, batch_size=6)))[0]
    assert batch["crops"][0].dtype == torch.uint8 and tuple(batch["params"][0]["order"].shape) == (6, 4)
    finished = fa.to_device(batch, torch.device("cpu"))
    expected = next(iter(torch.utils.data.DataLoader(worker, batch_size=6)))[0]
    for a, b in zip(finished, expected):
        assert a.shape == b.shape
        d = (a - b).abs()
        assert d.max() < (1 / 255 + 1e-4) / min(fa.IMAGENET_STD) and (d > 1e-4).float().mean() < 1e-3


def test_in_memory_sets_take_the_fast_pipeline_too():
    digits = build_dataset(parse_data_spec("digits"), "train")
    ds = fa.FastSeededCrops(digits, fa.FastMultiCrop(SMALL), seed=0)
    assert not ds.from_files
    crops, label = ds[0]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3 and 0 <= label < 10


def test_an_unreadable_file_is_the_one_line_error_naming_it(tmp_path):
    images = jpeg_folder(tmp_path, 3)
    with open(images.paths[1], "wb") as f:
        f.write(b"not a jpeg")
    ds = fa.FastSeededCrops(images, fa.FastMultiCrop(SMALL), seed=0)
    with pytest.raises(UserError, match=f"cannot read image {images.paths[1]}"):
        ds[1]


def test_pipeline_and_gpu_augment_keys_are_checked():
    assert load_config(None, TINY_OVERRIDES).augment.pipeline == "fast"
    with pytest.raises(UserError, match="augment.pipeline must be one of fast, pil, got 'dali'"):
        load_config(None, [*TINY_OVERRIDES, "augment.pipeline=dali"])
    with pytest.raises(UserError, match="data.gpu_augment needs augment.pipeline=fast"):
        load_config(None, [*TINY_OVERRIDES, "augment.pipeline=pil", "data.gpu_augment=true"])


def test_the_trainer_builds_the_configured_pipeline(tiny_cfg):
    from mokd import distributed
    from mokd.augment import SeededCrops
    from mokd.trainer import build_loader

    _, fast = build_loader(tiny_cfg(), distributed.DistInfo())
    _, pil = build_loader(tiny_cfg("augment.pipeline=pil"), distributed.DistInfo())
    loader, shipped = build_loader(tiny_cfg("data.gpu_augment=true"), distributed.DistInfo())
    assert isinstance(fast, fa.FastSeededCrops) and isinstance(pil, SeededCrops)
    assert shipped.multicrop.ship_uint8
    crops = fa.to_device(next(iter(loader))[0], torch.device("cpu"))
    assert [tuple(c.shape[1:]) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2


def test_resuming_a_run_from_before_the_fast_pipeline_keeps_the_pil_chain(tmp_path, monkeypatch):
    """A run's config.yaml without augment.pipeline was written when the PIL chain was the only one: --resume
    keeps it (the fast pipeline's crops differ for the same seed); a run that names its pipeline keeps that."""
    import yaml
    from click.testing import CliRunner

    import mokd.trainer
    from mokd.cli import cli
    from mokd.config import to_dict

    seen = []
    monkeypatch.setattr(mokd.trainer, "train", lambda cfg, **kw: seen.append(cfg.augment.pipeline))
    for name, pipeline in (("old", None), ("new", "fast")):
        run = tmp_path / name
        run.mkdir()
        tree = to_dict(load_config(None, TINY_OVERRIDES))
        if pipeline is None:
            del tree["augment"]["pipeline"]
        (run / "config.yaml").write_text(yaml.safe_dump(tree))
        res = CliRunner().invoke(cli, ["train", "--out", str(run), "--resume"])
        assert res.exit_code == 0, res.output
    assert seen == ["pil", "fast"]
    assert "pipeline" in to_dict(load_config(None, TINY_OVERRIDES))["augment"]  # what new runs write
