"""optimize_for_inference: parity with the plain model and the official outputs, folded
BatchNorm, precomputed position biases, cut windows, and no graph breaks under compile."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import torch
import torch.nn.functional as F

import moat
from moat.export.fused import InferenceAttention, is_optimized
from moat.models import MoatConfig, MoatNet
from moat.models.layers import relative_position_bias, window_attention, window_partition, \
    window_reverse

MICRO = MoatConfig(stem_size=(16, 16), num_blocks=(1, 1, 2, 1), hidden_size=(16, 32, 64, 64))


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so that folding mistakes show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(m.num_features, generator=g))
    return model


@pytest.mark.parametrize("case_name,channels_last", [("case_224_global", True),
                                                      ("case_320_window", False)])
def test_fused_matches_official_outputs(reference_dir, ref_weights, case_name,
                                        channels_last):
    case = np.load(reference_dir / f"{case_name}.npz")
    config = json.loads(str(case["config_json"]))
    plain = moat.create_model("tiny_moat_0", window_size=config["window_size"],
                              pool_size=config["pool_size"]).eval()
    moat.load_official_weights(plain, ref_weights)
    fused = moat.optimize_for_inference(plain, channels_last=channels_last)
    x = torch.from_numpy(case["input"]).permute(0, 3, 1, 2)
    with torch.inference_mode():
        logits, expected = fused(x), plain(x)
    torch.testing.assert_close(logits, torch.from_numpy(case["logits"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("options,size", [
    (dict(window_size=[None, None, (4, 5), (3, 3)]), (97, 131)),      # windows cut at edges
    (dict(position_embedding=False, window_size=[None, None, 6, None]), (75, 75)),
    (dict(window_size=[None, None, (14, 14), None], pool_size=3,       # detection setting
          global_attention_at_end=True), (130, 161)),
    (dict(), (33, 47)),                                                # global, odd sizes
])
def test_fused_matches_plain_model(options, size):
    torch.manual_seed(0)
    plain = _randomize_bn(MoatNet(MICRO, num_classes=10, **options)).eval()
    for m in plain.modules():  # position tables and weights far from their tiny init
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.weight.data.mul_(10)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = plain(x)
        for fused in (moat.optimize_for_inference(plain),
                      moat.optimize_for_inference(plain, channels_last=False, img_size=size)):
            torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=1e-5)
    assert expected.abs().max() > 1  # the comparison is not between near-zeros


def test_fused_model_structure_and_original_untouched():
    plain = _randomize_bn(moat.create_model("tiny_moat_0",
                                            window_size=[None, None, (4, 4), None]))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    fused = moat.optimize_for_inference(plain, img_size=(64, 64))
    assert is_optimized(fused) and not is_optimized(plain) and not fused.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    assert plain.training and all(torch.equal(v, plain.state_dict()[k])
                                  for k, v in before.items())
    # Window biases are one [1, heads, T, T] buffer per window size (never per window);
    # global attention gets its bias for the img_size given.
    attention = fused.stages[2][0].attention
    assert isinstance(attention, InferenceAttention)
    assert attention.position_bias_4x4.shape == (4, 16, 16)
    assert fused.stages[3][0].attention.position_bias_2x2.shape == (8, 4, 4)
    assert attention.attention_bias((4, 4)).is_contiguous()  # also after channels-last
    with pytest.raises(ValueError, match="already"):
        moat.optimize_for_inference(fused)


def test_features_only_model_is_optimized_too():
    plain = _randomize_bn(moat.create_model("tiny_moat_0", features_only=True)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(moat.optimize_for_inference(plain)(x), plain(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_large_batches_run_in_parts_with_the_same_results(monkeypatch):
    from moat.export import cpu_ops

    fused = moat.optimize_for_inference(_randomize_bn(MoatNet(MICRO, num_classes=10)).eval())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        whole = fused(x)
        monkeypatch.setattr(cpu_ops, "CHUNK_BYTES", 1)  # every block: one sample at a time
        monkeypatch.setattr(cpu_ops, "freed_memory_kept", lambda: True)
        assert cpu_ops.batch_chunks(x, 16) == 1  # the allocator reuses large blocks: whole
        monkeypatch.setattr(cpu_ops, "freed_memory_kept", lambda: False)
        assert cpu_ops.batch_chunks(x, 16) == 3
        torch.testing.assert_close(fused(x), whole, atol=1e-6, rtol=0)


def test_packed_weights_give_the_same_outputs_and_follow_new_weights():
    from moat.export import cpu_ops

    fused = moat.optimize_for_inference(_randomize_bn(MoatNet(MICRO, num_classes=10)).eval())
    block = fused.stages[0][0]
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    unpacked = dataclasses.replace(cpu_ops.current_cpu_choices(), prepack_weights=False)

    def both(inputs):
        with cpu_ops.using_cpu_choices(unpacked):
            expected = fused(inputs)
        return fused(inputs), expected

    with torch.no_grad():
        got, expected = both(x)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert len(cpu_ops._KEPT[block.shrink_conv]) == 1  # packed once, for this shape
        got, expected = both(x)
        assert len(cpu_ops._KEPT[block.shrink_conv]) == 1  # and reused
        got, expected = both(x[:1])  # another shape: packed for it too
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert len(cpu_ops._KEPT[block.shrink_conv]) == 2
        before = expected
        block.shrink_conv.weight.mul_(-3.0)  # changed in place: packed again, not reused
        got, expected = both(x[:1])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(expected, before, atol=1e-3)


def test_cut_windows_equal_padded_windows_with_masked_keys():
    # The model cuts windows at the map's edge; the reference pads and masks padded keys.
    torch.manual_seed(0)
    attention = moat.models.layers.Attention(32, 2, position_embedding_size=7).eval()
    torch.nn.init.normal_(attention.relative_position_embedding, std=1.0)
    x, window = torch.randn(2, 11, 13, 32), (4, 5)
    with torch.no_grad():
        got = window_attention(attention, x, window)
        windows = window_partition(x, window)                       # zero-padded to 12 x 15
        valid = window_partition(torch.ones(1, 11, 13, 1), window)[0, :, :, 0]  # [nW, T]
        bias = relative_position_bias(attention.relative_position_embedding, *window)
        bias = bias + torch.zeros_like(valid).masked_fill(valid == 0, float("-inf"))[:, None,
                                                                                     None]
        b, n, t, _ = windows.shape
        qkv = attention.qkv(windows).view(b, n, t, 3, 2, 32).permute(3, 0, 1, 4, 2, 5)
        out = F.scaled_dot_product_attention(*qkv, attn_mask=bias, scale=32 ** -0.5)
        out = attention.proj(out.transpose(2, 3).reshape(b, n, t, -1))
        expected = window_reverse(out, window, 11, 13)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window_size", [None, [None, None, (3, 3), None]])
def test_optimized_model_compiles_without_graph_breaks(window_size):
    model = _randomize_bn(MoatNet(MICRO, num_classes=10, window_size=window_size)).eval()
    fused = moat.optimize_for_inference(model)
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(fused)(torch.randn(2, 3, 80, 80))
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_made_and_run_under_inference_mode():
    # Weights copied under torch.inference_mode are inference tensors, which have no version
    # counter: the caches keyed on it (packed weights, position biases) must still work.
    model = _randomize_bn(MoatNet(MICRO, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        fused = moat.optimize_for_inference(model)
        assert next(fused.parameters()).is_inference()
        torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=0)  # from the caches
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
