"""Weight-only quantization: error bounds, exact packing, sizes, kept tensors, safetensors round trip,
and the logits of a real model (DigitsCNN) through int8/int4-dequantized weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.models import DigitsCNN
from pipeline.quantize import (
    FORMAT,
    METADATA_KEY,
    dequantize_state_dict,
    dequantize_tensor,
    metadata_for_safetensors,
    pack_int4,
    parse_metadata,
    quantize_state_dict,
    unpack_int4,
)

# Relative slack on the half-step bound for float32 rounding of w/scale and q*scale.
FP_SLACK = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(out: int, *rest: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights whose output channels span five orders of magnitude, one channel all zero."""
    g = _gen(seed)
    w = torch.randn(out, *rest, generator=g)
    mag = 10.0 ** (torch.rand(out, generator=g) * 5 - 3)
    w = w * mag.view(-1, *([1] * len(rest)))
    w[1] = 0.0
    return w


def _group_scale(scale: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    return scale.repeat_interleave(group_size, dim=1)[:, :n]


# ------------------------------------------------------------------------------ round-trip bounds


@pytest.mark.parametrize("shape", [(64, 300), (16, 8, 3, 3), (5, 2)])
def test_int8_error_within_half_step_per_channel(shape):
    w = _weights(*shape)
    qs = quantize_state_dict({"w": w}, "int8", min_numel=0)
    q, scale = qs.tensors["w"], qs.tensors["w.scale"]
    assert q.dtype == torch.int8 and tuple(q.shape) == shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (shape[0],)
    rows = w.reshape(shape[0], -1)
    assert torch.equal(scale, rows.abs().amax(1) / 127)
    qr = q.reshape(shape[0], -1)
    assert qr.min() >= -127 and qr.max() <= 127
    nonzero = scale > 0
    assert torch.equal(qr.abs().amax(1)[nonzero], torch.full((int(nonzero.sum()),), 127, dtype=torch.int8))
    assert scale[1] == 0 and not qr[1].any()  # all-zero channel

    deq = dequantize_state_dict(qs.tensors, qs.metadata)["w"]
    assert deq.dtype == w.dtype and deq.shape == w.shape
    err = (w - deq).reshape(shape[0], -1).abs()
    assert (err <= scale[:, None] / 2 * (1 + FP_SLACK)).all()
    assert torch.equal(deq[1], torch.zeros_like(deq[1]))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("shape", "group_size"),
    [((32, 512), 128), ((24, 300), 128), ((16, 8, 3, 3), 32), ((8, 75), 6), ((4, 7), 128), ((64, 256), 2)],
)
def test_int4_error_within_half_step_per_group(shape, group_size, symmetric):
    w = _weights(*shape, seed=group_size)
    qs = quantize_state_dict({"w": w}, "int4", group_size=group_size, symmetric=symmetric, min_numel=0)
    out, n = shape[0], math.prod(shape[1:])
    n_groups = -(-n // group_size)
    info = qs.metadata["tensors"]["w"]
    assert info == {
        "orig_dtype": "float32", "orig_shape": list(shape), "kind": "int4",
        "in_features": n, "group_size": group_size, "n_groups": n_groups, "symmetric": symmetric,
    }
    packed, scale = qs.tensors["w"], qs.tensors["w.scale"]
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (out, (n + 1) // 2)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (out, n_groups)
    u = unpack_int4(packed, n)
    if symmetric:
        assert "w.zero" not in qs.tensors
        assert u.min() >= 1 and u.max() <= 15  # q = u - 8 in [-7, 7]
    else:
        zero = qs.tensors["w.zero"]
        assert zero.dtype == torch.uint8 and tuple(zero.shape) == (out, n_groups) and zero.max() <= 15

    deq = dequantize_state_dict(qs.tensors, qs.metadata)["w"]
    assert deq.dtype == w.dtype and deq.shape == w.shape
    err = (w - deq).reshape(out, n).abs()
    assert (err <= _group_scale(scale, group_size, n) / 2 * (1 + FP_SLACK)).all()
    assert not deq[1].any()  # all-zero channel → exact zeros


def test_int4_short_last_group_uses_only_real_values():
    # in_features 130 with group 128: last group has 2 values; its scale is theirs, not padding's.
    w = torch.zeros(2, 130)
    w[:, :128] = 100.0
    w[:, 128:] = torch.tensor([[0.5, -0.25], [0.01, 0.02]])
    for symmetric in (True, False):
        qs = quantize_state_dict({"w": w}, "int4", symmetric=symmetric, min_numel=0)
        scale = qs.tensors["w.scale"]
        tail = w[:, 128:]
        expected = tail.abs().amax(1) / 7 if symmetric else (tail.amax(1).clamp(min=0) - tail.amin(1).clamp(max=0)) / 15
        assert torch.allclose(scale[:, 1], expected)
        deq = dequantize_state_dict(qs.tensors, qs.metadata)["w"]
        assert ((w - deq).abs()[:, 128:] <= scale[:, 1:] / 2 * (1 + FP_SLACK)).all()


def test_int4_asymmetric_one_sided_groups():
    g = _gen(3)
    pos = torch.rand(8, 256, generator=g) + 1.0  # all in [1, 2]
    neg = -(torch.rand(8, 256, generator=g) * 3 + 0.5)
    for w, zero_at in ((pos, 0), (neg, 15)):
        qs = quantize_state_dict({"w": w}, "int4", symmetric=False, min_numel=0)
        scale, zero = qs.tensors["w.scale"], qs.tensors["w.zero"]
        assert (zero == zero_at).all()  # range widened to include 0: zero point sits at the edge
        deq = dequantize_state_dict(qs.tensors, qs.metadata)["w"]
        assert ((w - deq).abs() <= _group_scale(scale, 128, 256) / 2 * (1 + FP_SLACK)).all()


def test_int4_asymmetric_beats_symmetric_on_skewed_groups():
    w = torch.rand(16, 512, generator=_gen(4)) * 3 - 0.5  # range [-0.5, 2.5]
    errs = {}
    for symmetric in (True, False):
        qs = quantize_state_dict({"w": w}, "int4", symmetric=symmetric, min_numel=0)
        errs[symmetric] = (w - dequantize_state_dict(qs.tensors, qs.metadata)["w"]).pow(2).mean().sqrt()
    # step (max-min)/15 = 3/15 vs 2*max/14 = 5/14 → RMS error ratio ≈ 0.56
    assert errs[False] < 0.7 * errs[True]


# ------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("n", [1, 2, 7, 128, 300, 301])
def test_pack_unpack_identity(n):
    u = torch.randint(0, 16, (5, n), generator=_gen(n), dtype=torch.uint8)
    packed = pack_int4(u)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (5, (n + 1) // 2)
    assert torch.equal(unpack_int4(packed, n), u)


def test_pack_nibble_order_low_first():
    packed = pack_int4(torch.tensor([[1, 2, 3], [15, 0, 9]]))
    assert packed.tolist() == [[0x21, 0x03], [0x0F, 0x09]]
    with pytest.raises(ValueError):
        unpack_int4(packed, 5)  # 5 values need 3 bytes per row


# -------------------------------------------------------------------------------------- sizes


def test_size_ratios_linear_1024():
    g = _gen(5)
    state = {"fc.weight": torch.randn(1024, 1024, generator=g), "fc.bias": torch.randn(1024, generator=g)}
    orig = 1024 * 1024 * 4 + 1024 * 4
    expected = {
        ("int8", True): 1024 * 1024 + 1024 * 4 + 1024 * 4,  # int8 + fp32 scale per row + fp32 bias
        ("int4", True): 1024 * 512 + 1024 * 8 * 4 + 1024 * 4,  # nibbles + fp32 scale per 128-group + bias
        ("int4", False): 1024 * 512 + 1024 * 8 * 5 + 1024 * 4,  # ... + uint8 zero point per group
    }
    for (scheme, symmetric), size in expected.items():
        qs = quantize_state_dict(state, scheme, symmetric=symmetric)
        assert qs.orig_size_bytes == orig
        assert qs.size_bytes == size
        assert qs.ratio == pytest.approx(size / orig, rel=1e-12)
    assert 0.25 < quantize_state_dict(state, "int8").ratio < 0.2518  # ¼ + 1/1024 (scales) + bias
    assert 0.125 < quantize_state_dict(state, "int4").ratio < 0.1337  # ⅛ + 1/128 (scales) + bias


# -------------------------------------------------------------------------------- kept tensors


def test_ineligible_tensors_kept_with_reasons():
    g = _gen(6)
    state = {
        "lin.weight": torch.randn(64, 64, generator=g),
        "lin.bias": torch.randn(64, generator=g),
        "norm.weight": torch.ones(64),
        "bn.num_batches_tracked": torch.tensor(7),
        "ids": torch.arange(4096).reshape(64, 64),
        "mask": torch.ones(64, 64, dtype=torch.bool),
        "double": torch.randn(64, 64, dtype=torch.float64, generator=g),
        "tiny": torch.randn(10, 64, generator=g),
        "temp": torch.tensor(0.5),
        "empty": torch.zeros(0, 64),
    }
    for scheme in ("int8", "int4"):
        qs = quantize_state_dict(state, scheme)
        tensors = qs.metadata["tensors"]
        assert tensors["lin.weight"]["kind"] == scheme
        assert qs.skipped == {n: i["reason"] for n, i in tensors.items() if i["kind"] == "kept"}
        assert set(qs.skipped) == set(state) - {"lin.weight"}
        assert len(qs.tensor_seconds) == 1 and qs.tensor_seconds[0] > 0  # one per quantized tensor
        assert qs.skipped["lin.bias"] == qs.skipped["norm.weight"] == "1-d tensor (bias/norm) kept in full precision"
        assert qs.skipped["bn.num_batches_tracked"] == "integer dtype int64 not quantizable"
        assert qs.skipped["ids"] == "integer dtype int64 not quantizable"
        assert qs.skipped["mask"] == "dtype bool not quantizable"
        assert "float64 not supported" in qs.skipped["double"]
        assert qs.skipped["tiny"].startswith("640 elements < min_numel 1024")
        assert "0-d" in qs.skipped["temp"] and "empty" in qs.skipped["empty"]
        for name in qs.skipped:
            assert qs.tensors[name].dtype == state[name].dtype and torch.equal(qs.tensors[name], state[name])
            assert name + ".scale" not in qs.tensors
        back = dequantize_state_dict(qs.tensors, qs.metadata)
        assert list(back) == list(state)
        for name in qs.skipped:
            assert torch.equal(back[name], state[name]) and back[name].dtype == state[name].dtype
        # a dtype override casts floating-point tensors, never integer/bool ones
        half = dequantize_state_dict(qs.tensors, qs.metadata, dtype=torch.float16)
        assert half["lin.weight"].dtype == half["lin.bias"].dtype == half["double"].dtype == torch.float16
        assert half["ids"].dtype == torch.int64 and half["mask"].dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_half_precision_inputs(dtype, scheme):
    w = torch.randn(48, 200, generator=_gen(7)).to(dtype)
    qs = quantize_state_dict({"w": w, "b": torch.zeros(48, dtype=dtype)}, scheme, group_size=64)
    assert qs.metadata["tensors"]["w"]["orig_dtype"] == str(dtype).removeprefix("torch.")
    assert qs.tensors["w.scale"].dtype == torch.float32
    back = dequantize_state_dict(qs.tensors, qs.metadata)
    assert back["w"].dtype == dtype and back["b"].dtype == dtype
    exact = dequantize_state_dict(qs.tensors, qs.metadata, dtype=torch.float32)["w"]
    scale = qs.tensors["w.scale"]
    step = scale[:, None] if scheme == "int8" else _group_scale(scale, 64, 200)
    assert ((w.float() - exact).abs() <= step / 2 * (1 + FP_SLACK)).all()
    assert torch.equal(back["w"], exact.to(dtype))
    # vs 2-byte originals: int8 halves, int4 quarters; fp32 scales weigh twice as much relative to them
    weight = 48 * 200 if scheme == "int8" else 48 * 100 + 48 * 4 * 4  # int4: 4 groups of 64 per row
    assert qs.size_bytes == weight + 48 * 4 * (scheme == "int8") + 48 * 2
    assert qs.orig_size_bytes == 48 * 200 * 2 + 48 * 2


# --------------------------------------------------------------------- safetensors round trip


@pytest.mark.parametrize(("scheme", "symmetric"), [("int8", True), ("int4", True), ("int4", False)])
def test_safetensors_round_trip_bit_exact(tmp_path, scheme, symmetric):
    torch.manual_seed(0)
    state = DigitsCNN().state_dict()
    state["extra.bf16"] = torch.randn(40, 77, generator=_gen(8)).to(torch.bfloat16)
    qs = quantize_state_dict(state, scheme, symmetric=symmetric, group_size=32)
    json.dumps(qs.metadata)  # JSON-serializable as is
    path = tmp_path / "model.safetensors"
    save_file(qs.tensors, str(path), metadata=metadata_for_safetensors(qs))
    assert path.stat().st_size < sum(t.numel() * t.element_size() for t in state.values())

    memory = dequantize_state_dict(qs.tensors, qs.metadata)
    with safe_open(str(path), "pt") as f:
        raw = f.metadata()
        assert set(raw) == {METADATA_KEY}
        md = parse_metadata(raw)
        assert md == qs.metadata
        assert md["format"] == FORMAT and md["scheme"] == scheme and md["symmetric"] == symmetric
        assert set(f.keys()) == set(qs.tensors)
        loaded = {k: f.get_tensor(k) for k in f.keys()}
        # streaming: one tensor at a time straight from the file handle
        streamed = {n: dequantize_tensor(n, f.get_tensor, md) for n in md["tensors"]}
    from_file = dequantize_state_dict(loaded, raw)
    for result in (from_file, streamed):
        assert list(result) == list(state)
        for name, t in state.items():
            assert result[name].dtype == t.dtype and result[name].shape == t.shape
            assert torch.equal(result[name], memory[name])


def _int4_qs():
    qs = quantize_state_dict({"w": torch.randn(8, 256, generator=_gen(10))}, "int4", min_numel=0)
    return qs.tensors, qs.metadata


# -------------------------------------------------------------------------- accuracy smoke test


def test_digits_cnn_logits_stay_close():
    """Seeded, untrained DigitsCNN; fixed random batch; float vs int8/int4-dequantized weights.

    Bounds: the conv weights are uniform on [-a, a] (kaiming-uniform init), so the weights' RMS is
    ``a/√3`` and a rounding error uniform within half a step has RMS ``step/√12``. Per layer, the
    relative weight error is therefore ``1/254 ≈ 0.39 %`` for int8 (step a/127), ``1/14 ≈ 7.1 %``
    for symmetric int4 (step a/7) and ``1/15 ≈ 6.7 %`` for asymmetric int4 (step ≈ 2a/15); the test
    checks each quantized layer lands within 20 % below / 5 % above that (a group's max is a bit
    under ``a``). Three conv layers are quantized (the 288-element first conv and the 640-element
    head are under min_numel); independent errors add in quadrature, so the logits' relative error
    must stay under √3 × the per-layer figure: 0.68 % (int8) and 12.4 % (int4). Measured: ≈ 0.25 %,
    3.5 % and 4.7 % (ReLU and pooling average errors out). int8 must also be ≥ 4× tighter than int4
    (its step is 18× finer).
    """
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(64, 1, 28, 28, generator=_gen(11))
    with torch.no_grad():
        ref = model(x)
    state = model.state_dict()
    quantized = {"features.0.3.weight", "features.1.0.weight", "features.1.3.weight"}

    def logits_rel_err(scheme: str, per_layer: float, **kw) -> tuple[float, float]:
        qs = quantize_state_dict(state, scheme, **kw)
        assert {n for n, i in qs.metadata["tensors"].items() if i["kind"] == scheme} == quantized
        deq = dequantize_state_dict(qs.tensors, qs.metadata)
        for name in quantized:
            rel = ((deq[name] - state[name]).norm() / state[name].norm()).item()
            assert 0.8 * per_layer < rel < 1.05 * per_layer, (scheme, kw, name, rel)
        copy = DigitsCNN().eval()
        copy.load_state_dict(deq)
        with torch.no_grad():
            out = copy(x)
        agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
        return ((out - ref).norm() / ref.norm()).item(), agree

    e8, agree8 = logits_rel_err("int8", 1 / 254)
    e4, _ = logits_rel_err("int4", 1 / 14)
    e4a, _ = logits_rel_err("int4", 1 / 15, symmetric=False)
    assert e8 < math.sqrt(3) / 254
    assert e4 < math.sqrt(3) / 14
    assert e4a < math.sqrt(3) / 15
    assert e8 < e4 / 4
    assert agree8 >= 0.9


# ------------------------------------------------------------------------------------- errors


def test_parameter_errors():
    state = {"w": torch.randn(8, 256, generator=_gen(12))}
    with pytest.raises(ValueError, match="unknown quantization scheme 'fp8'"):
        quantize_state_dict(state, "fp8")
    for gs in (0, 1, 3, 127, -2):
        with pytest.raises(ValueError, match="even integer >= 2"):
            quantize_state_dict(state, "int4", group_size=gs)
    with pytest.raises(ValueError, match="symmetric"):
        quantize_state_dict(state, "int8", symmetric=False)
    with pytest.raises(ValueError, match="min_numel"):
        quantize_state_dict(state, "int8", min_numel=-1)
    with pytest.raises(ValueError, match="'w'.*non-finite"):
        quantize_state_dict({"w": torch.full((8, 256), float("nan"))}, "int8")
    with pytest.raises(ValueError, match="'w'.*'w.scale'"):
        quantize_state_dict({"w": state["w"], "w.scale": torch.ones(8)}, "int8")


def test_malformed_metadata_names_the_tensor():
    tensors, md = _int4_qs()

    def broken(**change):
        bad = json.loads(json.dumps(md))
        bad["tensors"]["w"].update(change)
        return bad

    with pytest.raises(ValueError, match="not forgeline.quant/1"):
        dequantize_state_dict(tensors, {"format": "pt"})
    with pytest.raises(ValueError, match="malformed quantization metadata"):
        dequantize_state_dict(tensors, {METADATA_KEY: "{not json"})
    for change in ({"kind": "int3"}, {"orig_dtype": "float99"}, {"orig_shape": [8, 255]},
                   {"n_groups": 3}, {"in_features": "256"}, {"symmetric": None}):
        with pytest.raises(ValueError, match="tensor 'w': malformed metadata"):
            dequantize_state_dict(tensors, broken(**change))
    with pytest.raises(ValueError, match="tensor 'w': missing 'w.scale'"):
        dequantize_state_dict({"w": tensors["w"]}, md)
    with pytest.raises(ValueError, match="tensor 'w': scale is"):
        dequantize_state_dict({"w": tensors["w"], "w.scale": tensors["w.scale"][:, :1]}, md)
    with pytest.raises(ValueError, match="tensor 'w': packed int4 weight is"):
        dequantize_state_dict({"w": tensors["w"].to(torch.int8), "w.scale": tensors["w.scale"]}, md)
    with pytest.raises(ValueError, match="tensor 'w': missing"):
        dequantize_state_dict({}, md)
    assert dequantize_state_dict({}, md, strict=False) == {}
    with pytest.raises(ValueError, match="tensor 'other': not described"):
        dequantize_state_dict({**tensors, "other": torch.zeros(1)}, md)
    asym = quantize_state_dict({"w": torch.randn(8, 256, generator=_gen(13))}, "int4", symmetric=False, min_numel=0)
    with pytest.raises(ValueError, match="tensor 'w': missing 'w.zero'"):
        dequantize_state_dict({k: v for k, v in asym.tensors.items() if k != "w.zero"}, asym.metadata)
