"""The reference HMMN: released names and shapes, checkpoint loading, shapes, switches, training
forward, readout dropout, the top-k mapping, DMN-AOA's layers."""
import ast
import math
import os

import pytest
import torch
import torch.nn.functional as F

from hmmn_ops.models import HMMN, HMMNConfig, ResNet, BackboneConfig, load_model, save_checkpoint
from hmmn_ops.models import AdaptiveObjectAlignment, TemplateDecoder
from hmmn_ops.models.hmmn import Memory, expand_query, pad_to_multiple, soft_aggregate, stack_memory, unpad

# A copy of the released checkpoint's key list: the released names and shapes.
TSV = os.path.join(os.path.dirname(__file__), "data", "hmmn_state_dict_keys.tsv")
TINY = dict(backbone="tiny", key_dims=(16, 16, 8), value_dims=(32, 16, 8), decoder_dim=32)


def released_shapes():
    with open(TSV) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]
    return {name: tuple(ast.literal_eval(shape)) for name, shape in rows}


@pytest.fixture(scope="module")
def released():
    return HMMN().eval()


def test_default_model_has_the_released_names_and_shapes(released):
    ours = {k: tuple(v.shape) for k, v in released.state_dict().items()}
    assert ours == released_shapes()


@pytest.fixture(scope="module")
def official_state():
    """The released names with the module. prefix; cheap distinct values (a fill per name)."""
    state = {}
    for i, (name, shape) in enumerate(released_shapes().items()):
        value = 7 if name.endswith("num_batches_tracked") else 0.5 + (i % 97) / 97
        state["module." + name] = torch.full(shape, value, dtype=torch.int64 if name.endswith("tracked") else torch.float32)
    return state


def test_from_official_loads_every_tensor_strictly(tmp_path, official_state):
    path = tmp_path / "HMMN_weights.pth"
    torch.save(official_state, path)
    unprefixed = {k[len("module."):]: v for k, v in official_state.items()}
    loaded = HMMN.from_official(path).state_dict()
    assert loaded.keys() == unprefixed.keys()
    assert all(torch.equal(loaded[k], v) for k, v in unprefixed.items())
    # a state dict in memory, without the prefix, recognised by its names; copied, not shared
    model = load_model(unprefixed, kernel="kmn")
    assert model.config.kernel == "kmn"
    bias = model.Decoder.pred2.bias
    assert torch.equal(bias, unprefixed["Decoder.pred2.bias"]) and bias.data_ptr() != unprefixed["Decoder.pred2.bias"].data_ptr()


def test_from_official_lists_what_does_not_match(official_state):
    state = dict(official_state)
    del state["module.Decoder.pred2.bias"]
    state["module.Decoder.extra.weight"] = torch.zeros(1)
    state["module.KV_M_r4.Key.weight"] = torch.zeros(64, 1024, 3, 3)
    with pytest.raises(ValueError) as e:
        HMMN.from_official(state)
    msg = str(e.value)
    assert "1 missing: Decoder.pred2.bias" in msg
    assert "1 unexpected: Decoder.extra.weight" in msg
    assert "KV_M_r4.Key.weight: checkpoint (64, 1024, 3, 3) vs model (128, 1024, 3, 3)" in msg
    with pytest.raises(ValueError, match="state dict"):
        HMMN.from_official({"model": "not tensors"})


def test_resnet_has_torchvision_names():
    with torch.device("meta"):  # names and shapes only
        sd = ResNet(BackboneConfig(layers=(3, 4, 6, 3)), num_classes=1000).state_dict()
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)
    assert tuple(sd["layer4.0.downsample.0.weight"].shape) == (2048, 1024, 1, 1)
    # the released encoder is torchvision's ResNet-50 up to layer3, renamed res2..res4
    renamed = {k.replace("layer1.", "res2.").replace("layer2.", "res3.").replace("layer3.", "res4."): tuple(v.shape)
               for k, v in sd.items() if not k.startswith(("layer4.", "fc."))}
    expected = {k[len("Encoder_Q."):]: s for k, s in released_shapes().items()
                if k.startswith("Encoder_Q.") and k not in ("Encoder_Q.mean", "Encoder_Q.std")}
    assert renamed == expected
    small = ResNet(BackboneConfig("basic", (1, 1, 1, 1), 4))
    shapes = [tuple(o.shape) for o in small(torch.rand(1, 3, 64, 64))]
    assert shapes == [(1, 4, 16, 16), (1, 8, 8, 8), (1, 16, 4, 4), (1, 32, 2, 2)]


def test_load_backbone_from_a_torchvision_state_dict():
    net = ResNet(BackboneConfig("bottleneck", (1, 1, 1, 1), 8), num_classes=10)
    model = HMMN(**TINY)
    before = model.Encoder_M.conv1_m.weight.clone()
    model.load_backbone(net.state_dict())
    for enc in (model.Encoder_M, model.Encoder_Q):
        assert torch.equal(enc.res3[0].conv2.weight, net.layer2[0].conv2.weight)
        assert torch.equal(enc.bn1.running_var, net.bn1.running_var)
    assert torch.equal(model.Encoder_M.conv1_m.weight, before)
    with pytest.raises(ValueError, match="missing"):
        model.load_backbone({k: v for k, v in net.state_dict().items() if not k.startswith("layer2.")})


def test_released_architecture_forward_shape(released):
    # The released model at a small input that is not a multiple of 16.
    H, W = 100, 120
    frame, mask = torch.rand(1, 3, H, W), torch.zeros(1, 1, H, W)
    mask[..., 30:70, 40:90] = 1
    with torch.no_grad():
        fp, pad = pad_to_multiple(frame)
        mem = released.encode_memory(fp, pad_to_multiple(mask)[0])
        assert tuple(mem.k4.shape) == (1, 128, 7, 8) and tuple(mem.v4.shape) == (1, 512, 7, 8)
        assert tuple(mem.k3.shape) == (1, 128, 14, 16) and tuple(mem.v2.shape) == (1, 128, 28, 32)
        bank = Memory(*(x.unsqueeze(2) for x in mem))
        p = released.segment(expand_query(released.encode_query(fp), 1), bank)
    assert p.shape == (1, 112, 128) and unpad(p, pad).shape == (1, H, W)
    assert ((p >= 0) & (p <= 1)).all()


@pytest.mark.parametrize("size,kernel,topk_read", [((37, 50), "none", True), ((64, 80), "none", False),
                                                    ((81, 33), "kmn", True), ((50, 50), "hmmn", False)])
def test_training_forward_shapes_and_gradients(size, kernel, topk_read):
    model = HMMN(**TINY, kernel=kernel, topk_read=topk_read).train()
    H, W = size
    frames = torch.rand(2, 3, 3, H, W)
    masks = torch.zeros(2, 2, H, W)
    masks[:, 0, : H // 2, : W // 2] = 1
    masks[0, 1, H // 2:, W // 2:] = 1  # clip 1 has one object only: channel 1 is padding
    logits = model(frames, masks)
    assert logits.shape == (2, 2, 3, H, W)
    labels = torch.zeros(2, 2, H, W, dtype=torch.int64)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))
    loss.backward()
    for p in (model.Encoder_M.conv1_m.weight, model.KV_M_r2.Value.weight, model.KV_Q_r3.Key.weight, model.Decoder.pred2.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the padded object has (almost) no probability
    assert F.softmax(logits[1], 1)[:, 2].max() < 1e-5


def test_read_switches_with_kernels():
    model = HMMN(**TINY).eval()
    q = expand_query(model.encode_query(torch.rand(1, 3, 64, 96)), 2)
    mems = [model.encode_memory(torch.rand(1, 3, 64, 96), torch.rand(1, 2, 64, 96)) for _ in range(3)]
    bank = stack_memory(mems, (0, 2))
    plain = model.read(q, bank)
    centers, _ = model.kmn_centers(q.k4, bank.k4)
    # A narrow Gaussian leaves only the pixels next to each centre: random weights can make the
    # plain read almost uniform, and a wide kernel would change it by less than allclose sees.
    kmn = model.read(q, bank, centers, 0.5)
    assert [x.shape for x in plain] == [(2, 64, 4, 6), (2, 16, 8, 12), (2, 8, 16, 24)]
    assert (plain[0] - kmn[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="fine_frames"):
        model.read(q, bank, fine_frames=(0, 1, 2))


def test_topk_indices_map_onto_the_fine_bank():
    # res4 holds frames A, B, C; the fine bank holds A and C. The top-k over (0, 2) of the
    # three-frame bank must pick the same fine pixels as the top-k of an A, C-only bank.
    model = HMMN(**TINY).eval()
    q = expand_query(model.encode_query(torch.rand(1, 3, 96, 96)), 1)
    a, b, c = (model.encode_memory(torch.rand(1, 3, 96, 96), torch.rand(1, 1, 96, 96)) for _ in range(3))
    three = model.read(q, stack_memory([a, b, c], (0, 2)), fine_frames=(0, 2))
    two = model.read(q, stack_memory([a, c], (0, 1)))
    assert not torch.allclose(three[0], two[0])  # res4 reads B too
    torch.testing.assert_close(three[1], two[1])
    torch.testing.assert_close(three[2], two[2])


def test_readout_dropout_drops_whole_samples():
    model = HMMN(**TINY)
    B = 16
    q = expand_query(model.encode_query(torch.rand(1, 3, 32, 32)), B)
    bank = Memory(*(x.unsqueeze(2) for x in model.encode_memory(torch.rand(1, 3, 32, 32), torch.rand(1, B, 32, 32))))
    m4, full3, full2 = model.read(q, bank)
    seen = {}  # the readouts the refinement stages get
    for name in ("RF3", "RF2"):
        getattr(model.Decoder, name).register_forward_pre_hook(lambda module, args, name=name: seen.update({name: args[2]}))

    def decoded(p, training):
        model.train(training)
        model.readout_dropout = p
        model.Decoder(m4, q.r3, q.r2, full3, full2)
        return seen["RF3"], seen["RF2"]

    for got, full in zip(decoded(1.0, training=False), (full3, full2)):
        assert got is full  # eval: never dropped
    model.train()
    torch.testing.assert_close(model.read(q, bank)[1], full3)  # the read itself never drops
    assert all(r.abs().sum() == 0 for r in decoded(1.0, training=True))
    for got, full in zip(decoded(0.5, training=True), (full3, full2)):
        dropped = got.flatten(1).abs().sum(1) == 0
        assert 0 < int(dropped.sum()) < B  # 16 coin flips (all equal: 2 in 65536)
        torch.testing.assert_close(got[~dropped], full[~dropped])  # the others are untouched


@pytest.mark.parametrize("res4", [False, True])
def test_prior_dropout_drops_whole_samples(res4):
    # A dropped sample's decoder sees no previous mask at any level (as if it were all zero);
    # the others see theirs untouched; eval never drops.
    torch.manual_seed(5)
    model = HMMN(HMMNConfig(**TINY, prev_mask=True, prev_mask_res4=res4)).double()
    with torch.no_grad():
        for conv in (model.Decoder.convPrev, model.Decoder.RF3.convPrev, model.Decoder.RF2.convPrev):
            if conv is not None:
                conv.weight.normal_()
    B = 16
    frame, _ = pad_to_multiple(torch.rand(1, 3, 37, 50, dtype=torch.float64))
    memory = stack_memory([model.encode_memory(frame, torch.rand(1, B, *frame.shape[2:], dtype=torch.float64))], (0,))
    query = expand_query(model.encode_query(frame), B)
    prev = torch.rand(B, *frame.shape[2:], dtype=torch.float64)

    def segment(p, training):
        model.train(training)
        model.prior_dropout = p
        with torch.no_grad():
            return model.segment(query, memory, prev=prev)

    full = segment(0.0, training=True)
    with torch.no_grad():
        empty = model.segment(query, memory, prev=torch.zeros_like(prev))
    assert not torch.allclose(full, empty)
    torch.testing.assert_close(segment(1.0, training=False), segment(0.0, training=False))
    torch.testing.assert_close(segment(1.0, training=True), empty)
    got = segment(0.5, training=True)
    dropped = (got - empty).flatten(1).abs().amax(1) == 0
    assert 0 < int(dropped.sum()) < B  # 16 coin flips (all equal: 2 in 65536)
    torch.testing.assert_close(got[~dropped], full[~dropped])
    assert not torch.allclose(full[dropped], empty[dropped])  # the dropped ones did change


@pytest.mark.parametrize("prev_mask", [False, True])
def test_lose_objects_hides_predictions_from_later_frames(prev_mask):
    # Training with lose_objects = 1: frame 1 is segmented from the given mask as always, but
    # frame 2 then sees frame 1 memorised (and, with prev_mask, as its prior) with no object,
    # which is what the same model computes from a clip whose frame-1 masks are all zero. Eval
    # never drops.
    torch.manual_seed(11)
    model = HMMN(HMMNConfig(**TINY, prev_mask=prev_mask)).double()
    with torch.no_grad():
        for conv in (model.Decoder.RF3.convPrev, model.Decoder.RF2.convPrev):
            if conv is not None:
                conv.weight.normal_()
    frames = torch.rand(2, 3, 3, 37, 50, dtype=torch.float64)
    masks = (torch.rand(2, 2, 37, 50) > 0.6).double()

    def run(p, training):
        model.train(training)
        model.lose_objects = p
        with torch.no_grad():
            return model(frames, masks)

    kept, lost = run(0.0, True), run(1.0, True)
    torch.testing.assert_close(lost[:, 0], kept[:, 0], rtol=0, atol=0)
    assert not torch.allclose(lost[:, 1], kept[:, 1])
    # the same frame 2 by hand: memory = frame 0 with its masks + frame 1 with none
    model.lose_objects = 0.0
    frame, pad = pad_to_multiple(frames.flatten(0, 1))
    frame = frame.view(2, 3, 3, *frame.shape[-2:])
    given, _ = pad_to_multiple(masks)
    with torch.no_grad():
        bank = [model.encode_memory(frame[:, 0], given), model.encode_memory(frame[:, 1], torch.zeros_like(given))]
        prev = torch.zeros(4, *frame.shape[-2:], dtype=torch.float64) if prev_mask else None
        p = model.segment(expand_query(model.encode_query(frame[:, 2]), 2), stack_memory(bank, (0, 1)), fine_frames=(0, 1),
                          prev=prev)
    want = soft_aggregate(p.view(2, 2, *p.shape[1:]), masks.flatten(2).amax(2) > 0)
    torch.testing.assert_close(lost[:, 1], unpad(want, pad))
    torch.testing.assert_close(run(1.0, training=False), run(0.0, training=False), rtol=0, atol=0)


def test_soft_aggregate():
    p = torch.tensor([[[[0.9]], [[0.2]]]])
    probs = F.softmax(soft_aggregate(p), 1)[0, :, 0, 0]
    e = torch.tensor([0.1 * 0.8, 0.9, 0.2])
    odds = e / (1 - e)
    torch.testing.assert_close(probs, odds / odds.sum())
    assert soft_aggregate(torch.ones(1, 1, 2, 2)).isfinite().all()


def test_padding_is_centred_and_undone():
    x = torch.rand(1, 1, 37, 50)
    y, pad = pad_to_multiple(x)
    assert y.shape[-2:] == (48, 64) and pad == (7, 7, 5, 6)
    assert torch.equal(unpad(y, pad), x)


def test_config_and_checkpoint_round_trip(tmp_path):
    cfg = HMMNConfig(**TINY, kernel="kmn", topk=16, fine_topk=4, memory_masks="hard", input_scale=2, prev_mask=True,
                     prev_mask_res4=True)
    assert HMMNConfig.from_dict(cfg.to_dict()) == cfg
    model = HMMN(cfg)
    path = tmp_path / "w.pt"
    save_checkpoint(path, model, step=3)
    again = load_model(path)
    assert again.config == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="kernel"):
        HMMNConfig(kernel="gauss")
    with pytest.raises(ValueError, match="memory_masks"):
        HMMNConfig(memory_masks="binary")
    for bad in (0, -1.0, 9, True, "2"):
        with pytest.raises(ValueError, match="input_scale"):
            HMMNConfig(input_scale=bad)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="prev_mask"):
            HMMNConfig(prev_mask=bad)
        with pytest.raises(ValueError, match="prev_mask_res4: expected a bool"):
            HMMNConfig(prev_mask=True, prev_mask_res4=bad)
    with pytest.raises(ValueError, match="prev_mask_res4: expected False without prev_mask"):
        HMMNConfig(prev_mask_res4=True)
    with pytest.raises(ValueError, match="3 stages"):
        HMMNConfig(backbone=BackboneConfig(layers=(1, 1)))
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "none.pt")


@pytest.mark.parametrize("scale,size", [(2, (21, 30)), (1.5, (20, 33))])
def test_input_scale_is_resizing_around_the_network(scale, size):
    # A model with input_scale = s on a clip == the same weights at scale 1 on the clip resized
    # by s (frames bilinear, masks nearest), logits resized back: odd sizes, padding included.
    torch.manual_seed(0)
    scaled = HMMN(HMMNConfig(**TINY, input_scale=scale)).double().eval()
    plain = HMMN(HMMNConfig(**TINY)).double().eval()
    plain.load_state_dict(scaled.state_dict())
    H, W = size
    frames = torch.rand(2, 3, 3, H, W, dtype=torch.float64)
    masks = (torch.rand(2, 2, H, W) > 0.6).double()
    big = tuple(round(n * scale) for n in size)
    with torch.no_grad():
        got = scaled(frames, masks)
        up = plain(F.interpolate(frames.flatten(0, 1), size=big, mode="bilinear", align_corners=False).view(2, 3, 3, *big),
                   F.interpolate(masks, size=big, mode="nearest"))
    assert got.shape == (2, 2, 3, H, W)
    want = F.interpolate(up.flatten(0, 1), size=(H, W), mode="bilinear", align_corners=False).view(2, 2, 3, H, W)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("res4", [False, True])
def test_prev_mask_prior_starts_as_the_model_without_it(res4):
    # Zero-initialised convPrev: a prev_mask model computes what the same weights without the
    # prior compute; once convPrev is not zero, the previous mask changes the output and the
    # training forward feeds it (the given mask, then the predicted one) with gradients.
    torch.manual_seed(3)
    prior = HMMN(HMMNConfig(**TINY, prev_mask=True, prev_mask_res4=res4)).double()
    plain = HMMN(HMMNConfig(**TINY)).double()
    state = prior.state_dict()
    convs = {"Decoder.RF3.convPrev.weight", "Decoder.RF2.convPrev.weight"} | ({"Decoder.convPrev.weight"} if res4 else set())
    assert {k for k in state if "convPrev" in k} == convs
    tested = prior.Decoder.convPrev if res4 else prior.Decoder.RF2.convPrev  # the level under test
    plain.load_state_dict({k: v for k, v in state.items() if "convPrev" not in k})
    frames = torch.rand(2, 3, 3, 37, 50, dtype=torch.float64)
    masks = (torch.rand(2, 2, 37, 50) > 0.6).double()
    torch.testing.assert_close(prior(frames, masks), plain(frames, masks), rtol=0, atol=0)

    prior(frames, masks).logsumexp(2).sum().backward()
    assert tested.weight.grad.abs().sum() > 0
    with torch.no_grad():
        tested.weight.normal_()
    assert not torch.allclose(prior(frames, masks), plain(frames, masks))

    prior.eval()
    frame, _ = pad_to_multiple(frames[:1, 0])
    memory = stack_memory([prior.encode_memory(frame, pad_to_multiple(masks[:1])[0])], (0,))
    query = expand_query(prior.encode_query(frame), 2)
    prev = torch.rand(2, *frame.shape[2:], dtype=torch.float64)
    with torch.no_grad():
        a, b = prior.segment(query, memory, prev=prev), prior.segment(query, memory, prev=prev.flip(1))
    assert a.shape == (2, *frame.shape[2:]) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"prev: expected the objects' previous masks \(B, H, W\) = \(2, 48, 64\)"):
        prior.segment(query, memory)
    with pytest.raises(ValueError, match="prev: expected the objects' previous masks"):
        prior.segment(query, memory, prev=prev[:, :-1])
    with pytest.raises(ValueError, match="prev: expected None"):
        plain.eval().segment(query, memory, prev=prev)


# ---------------------------------------------------------------- DMN-AOA


def dense_read(q, k, v, scale):
    B, C, T, H, W = k.shape
    logits = torch.einsum("bcm,bcq->bmq", k.flatten(2), q.flatten(2)) * scale
    return torch.einsum("bvm,bmq->bvq", v.flatten(2), logits.softmax(1)).view(B, -1, H, W)


def test_template_decoder_is_a_dense_read():
    dec = TemplateDecoder(in_dim=12, key_dim=8, value_dim=6, hidden=5)
    query, memory = torch.rand(3, 12, 7, 7), torch.rand(3, 12, 2, 7, 7)
    mem_frames = memory.transpose(1, 2).flatten(0, 1)
    k = dec.memory_key(mem_frames).view(3, 2, 8, 7, 7).transpose(1, 2)
    v = dec.memory_value(mem_frames).view(3, 2, 6, 7, 7).transpose(1, 2)
    torch.testing.assert_close(dec.read(query, memory), dense_read(dec.query_key(query), k, v, 1 / math.sqrt(8)))
    out = dec(query, memory)
    assert out.shape == (3, 1, 7, 7)
    out.sum().backward()
    assert dec.memory_key.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="must agree"):
        dec(query, torch.rand(3, 12, 2, 6, 7))


def test_adaptive_object_alignment():
    aoa = AdaptiveObjectAlignment(alpha=5.0)
    q, k, v = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 3, 6, 6), torch.rand(2, 1, 3, 6, 6)
    expected = dense_read(F.normalize(q, dim=1), F.normalize(k, dim=1), v, 5.0)
    torch.testing.assert_close(aoa(q, k, v), expected)
    # a crop aligned to itself with a sharp alpha: the mask comes back unchanged
    mask = (torch.rand(2, 1, 1, 6, 6) > 0.5).float()
    torch.testing.assert_close(AdaptiveObjectAlignment(alpha=200.0)(q, q.unsqueeze(2), mask), mask[:, :, 0], atol=1e-3, rtol=0)
    learnt = AdaptiveObjectAlignment(alpha=5.0, learn_alpha=True)
    learnt(q, k, v).sum().backward()
    assert learnt.log_alpha.grad is not None and abs(learnt.alpha - 5.0) < 1e-5
    with pytest.raises(ValueError, match="alpha"):
        AdaptiveObjectAlignment(alpha=0)
