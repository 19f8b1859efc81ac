"""Attention maps and layer capture on hand-made attention with known answers, and on a timm ViT with register
tokens and fused attention, and on an EVA-02-like ViT with rotary embeddings, against timm's own weights; an
attention class with no recomputation is refused."""

import pytest
import torch

from mokd.errors import UserError
from mokd.models.backbones import create_backbone, set_fused_attention
from mokd_analysis.attention import (attention_rollout, capture_vit_attention, cls_patch_attention, feature_norm_map,
                                     rollout_cls_map, vit_attention_maps)
from mokd_analysis.layers import capture_layers, model_cka, representation_layers
from tests.attention_reference import timm_attention_weights

REG_VIT = {"img_size": 32, "patch_size": 8, "reg_tokens": 4}  # 1 CLS + 4 registers + 4x4 patches


def test_cls_map_leaves_out_cls_and_register_tokens():
    prefix, grid = 5, (4, 4)
    n = prefix + 16
    attn = torch.zeros(2, 3, n, n)
    attn[:, :, 0, 1:prefix] = 0.5  # the CLS query parks half its attention on the registers
    attn[:, :, 0, prefix + 6] = 0.5  # and half on patch (1, 2)
    maps = cls_patch_attention(attn, prefix, grid)
    assert maps.shape == (2, 3, 4, 4)
    assert maps[0, 0, 1, 2] == 0.5 and maps.sum() == 2 * 3 * 0.5


def test_rollout_of_uniform_attention_has_the_closed_form():
    n, prefix = 1 + 9, 1
    uniform = torch.full((1, 2, n, n), 1.0 / n)
    # one block: 0.5 I + 0.5 U; two: (0.5 I + 0.5 U)^2 = 0.25 I + 0.75 U (U^2 = U)
    one = rollout_cls_map([uniform], prefix, (3, 3))
    two = rollout_cls_map([uniform, uniform], prefix, (3, 3))
    assert torch.allclose(one, torch.full((1, 3, 3), 0.5 / n))
    assert torch.allclose(two, torch.full((1, 3, 3), 0.75 / n))
    assert torch.allclose(attention_rollout([uniform] * 3).sum(-1), torch.ones(1, n))  # rows stay distributions


def test_rollout_multiplies_later_blocks_on_the_left():
    n = 3
    shift = torch.zeros(1, 1, n, n)
    shift[0, 0, torch.arange(n), (torch.arange(n) + 1) % n] = 1.0  # token i attends to token i+1
    stay = torch.eye(n)[None, None]
    r = attention_rollout([shift, stay], residual=0.0)
    assert torch.equal(r, attention_rollout([shift], residual=0.0))
    r2 = attention_rollout([shift, shift], residual=0.0)  # i -> i+1 -> i+2
    assert r2[0, 0, 2] == 1.0
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(1, 2, n, n, generator=g).softmax(-1) for _ in range(2))
    assert torch.allclose(attention_rollout([a, b], residual=0.0), b.mean(1) @ a.mean(1))  # block 2 after block 1


def test_feature_norm_map_is_the_channel_norm():
    fmap = torch.zeros(1, 2, 2, 2)
    fmap[0, :, 1, 0] = torch.tensor([3.0, 4.0])
    assert feature_norm_map(fmap).tolist() == [[[0.0, 0.0], [5.0, 0.0]]]


@pytest.mark.parametrize("fused", [True, False])
def test_register_vit_maps_equal_timms_own_attention(fused):
    torch.manual_seed(0)
    vit = create_backbone("test_vit", REG_VIT).eval()
    assert vit.num_prefix_tokens == 5
    x = torch.randn(2, 3, 32, 32)
    reference = timm_attention_weights(vit, x)
    set_fused_attention(vit, fused)
    maps = vit_attention_maps(vit, x)
    last = reference[len(vit.blocks) - 1]
    assert maps["heads"].shape == (2, last.shape[1], 4, 4)
    assert torch.allclose(maps["heads"], last[:, :, 0, 5:].reshape(2, -1, 4, 4), atol=1e-5)
    expected = rollout_cls_map([reference[i] for i in sorted(reference)], 5, (4, 4))
    assert torch.allclose(maps["rollout"], expected, atol=1e-5)


def test_layers_of_a_register_vit_pool_patch_tokens_only_and_of_a_cnn_its_stages():
    torch.manual_seed(0)
    vit = create_backbone("test_vit", REG_VIT).eval()
    layers = representation_layers(vit)
    assert [l.name for l in layers[:2]] == ["block1.mean", "block1.cls"] and len(layers) == 2 * len(vit.blocks)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), capture_layers(layers) as out:
        tokens = vit.forward_intermediates(x, indices=[0], norm=False, return_prefix_tokens=True,
                                           intermediates_only=True, output_fmt="NLC")
    patches, prefix = tokens[0]
    assert torch.allclose(out[0], patches.mean(1), atol=1e-6) and torch.allclose(out[1], prefix[:, 0], atol=1e-6)
    cnn = create_backbone("test_resnet", {})
    assert [l.name for l in representation_layers(cnn)] == ["layer1", "layer2", "layer3", "layer4"]


def test_model_cka_self_similarity_and_cross_model_in_one_pass():
    torch.manual_seed(0)
    vit, cnn = create_backbone("test_vit", REG_VIT), create_backbone("test_resnet", {})
    batches = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    cka, names_a, names_b = model_cka(vit, None, batches, torch.device("cpu"))
    m = cka.compute()
    assert names_a == names_b and m.shape == (len(names_a), len(names_a))
    assert torch.equal(m.diagonal(), torch.ones(len(names_a), dtype=torch.float64))
    cka, names_a, names_b = model_cka(vit, cnn, [(x, x) for x in batches], torch.device("cpu"))
    m = cka.compute()
    assert m.shape == (len(names_a), 4) and torch.isfinite(m).all() and cka.examples == 24


def _tiny_eva(**kw):
    """A 2-block EVA-02-like ViT at 32 px (rotary embeddings, separate q/v biases), random weights; the biases
    made non-zero (timm initialises them to zero, which would hide a recomputation that left them out)."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    eva = Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, use_rot_pos_emb=True,
              ref_feat_shape=(4, 4), **kw).eval()
    with torch.no_grad():
        for blk in eva.blocks:
            for p in (blk.attn.q_bias, blk.attn.v_bias, getattr(blk.attn.q_proj, "bias", None)):
                if p is not None:
                    p.normal_()
    return eva


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qkv_fused", [True, False])
def test_eva_attention_with_rope_and_separate_biases_equals_timms_own(fused, qkv_fused):
    eva = _tiny_eva(qkv_fused=qkv_fused)
    assert eva.rope is not None
    x = torch.randn(2, 3, 32, 32)
    reference = timm_attention_weights(eva, x)
    set_fused_attention(eva, fused)
    got = {}
    with capture_vit_attention(eva, lambda layer, a: got.__setitem__(layer, a)), torch.no_grad():
        eva(x)
    assert sorted(got) == sorted(reference)
    for i in reference:
        assert torch.allclose(got[i], reference[i], atol=1e-5), i
    maps = vit_attention_maps(eva, x)
    assert torch.allclose(maps["heads"], reference[1][:, :, 0, 1:].reshape(2, -1, 4, 4), atol=1e-5)


def test_an_attention_class_without_a_recomputation_is_refused_by_name():
    """BEiT's attention has a qkv Linear too, but adds q/v biases and a relative position bias: it is refused
    rather than drawn from qkv alone."""
    from timm.models.beit import Beit

    beit = Beit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                use_rel_pos_bias=True).eval()
    with pytest.raises(UserError, match=r"attention class timm\.models\.beit\.Attention is not supported"):
        vit_attention_maps(beit, torch.randn(1, 3, 32, 32))
