"""The DeepSSIM encoder: backbones and head, torchvision keys, freezing, TorchScript, embed, bad input."""
from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

from deepssim_fast import data
from deepssim_fast.model import (
    ModelFileError,
    build_model,
    cosine_pairs,
    embed,
    embed_volume,
    fit_size,
    load_model,
    preprocess,
)

FEAT = {"convnext_base": 1024, "convnext_tiny": 768, "resnet18": 512, "small": 64}


def _assert_close(a: np.ndarray, b: np.ndarray, atol: float, what: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    bad = np.argwhere(~np.isclose(a, b, atol=atol, rtol=0))
    assert bad.size == 0, (f"{what}: {len(bad)} mismatches, first at {tuple(bad[0])}: "
                           f"{a[tuple(bad[0])]} vs {b[tuple(bad[0])]}")


@pytest.fixture(scope="module")
def real_images() -> list[np.ndarray]:
    sl = data.load_slices("mni152", data.SlicePolicy(axis=2, step=9))
    return [s.array for s in sl]


@pytest.fixture(scope="module")
def small_model() -> nn.Module:
    torch.manual_seed(0)
    m = build_model("small", input_size=64)
    # give BatchNorm non-trivial running statistics so eval mode is exercised for real
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 1, 64, 64))
    return m.eval()


# ---------------------------------------------------------------------------------------------- layout
@pytest.fixture(scope="module")
def convnext_base() -> nn.Module:
    torch.manual_seed(0)
    return build_model("convnext_base", input_size=32).eval()


def test_small_local_descriptor_head() -> None:
    """``small``: 8 x 8 cells of unit descriptors scaled by 1/8, so an embedding has unit length and the cosine
    of two embeddings is the mean of the 64 per-cell cosines."""
    torch.manual_seed(0)
    m = build_model("small", input_size=64, emb_dim=256).eval()
    assert [type(h) for h in m.head] == [nn.Conv2d] and m.head[0].out_channels == 4 and m.feat_dim == 64
    assert isinstance(m.pool, nn.AdaptiveAvgPool2d) and m.pool.output_size == 8
    x, y = torch.randn(5, 1, 64, 64), torch.randn(5, 1, 64, 64)
    with torch.no_grad():
        ex, ey = m(x), m(y)
        cx = torch.nn.functional.normalize(m.head(m.pool(m.backbone(x))), dim=1)
        cy = torch.nn.functional.normalize(m.head(m.pool(m.backbone(y))), dim=1)
        e3 = m(x.repeat(1, 3, 1, 1))
    assert ex.shape == (5, 256)
    _assert_close(ex.norm(dim=1).numpy(), np.ones(5), 1e-6, "unit length")
    mean_local = (cx * cy).sum(dim=1).mean(dim=(1, 2))
    _assert_close(torch.nn.functional.cosine_similarity(ex, ey).numpy(), mean_local.numpy(), 1e-6,
                  "cosine = mean of local cosines")
    _assert_close(e3.numpy(), ex.numpy(), 1e-6, "3 equal channels = 1 channel")
    with torch.no_grad():  # a larger input gives the same 8 x 8 cells (adaptive pooling)
        assert build_model("small", input_size=128).eval()(torch.randn(2, 1, 128, 128)).shape == (2, 256)
    for emb_dim, grid in ((100, 5), (32, 4), (7, 1), (64, 4)):  # largest grid <= 8 whose square divides, 2+ ch
        mm = build_model("small", input_size=64, emb_dim=emb_dim).eval()
        assert mm.grid == grid and mm.pool.output_size == grid
        with torch.no_grad():
            e = mm(torch.randn(2, 1, 64, 64))
        assert e.shape == (2, emb_dim)
        _assert_close(e.norm(dim=1).numpy(), np.ones(2), 1e-6, f"unit length, emb_dim {emb_dim}")


@pytest.mark.parametrize("backbone", ["resnet18", "convnext_tiny", "convnext_base"])
def test_backbone_shapes_and_head_layout(backbone: str, request) -> None:
    torch.manual_seed(0)
    if backbone == "convnext_base":
        m = request.getfixturevalue("convnext_base")
    else:
        size = 32 if backbone.startswith("convnext") else 64
        m = build_model(backbone, input_size=size, emb_dim=256).eval()
    head = list(m.head)
    assert [type(h) for h in head] == [nn.BatchNorm1d, nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    assert head[0].num_features == FEAT[backbone] == m.feat_dim
    assert (head[1].in_features, head[1].out_features) == (FEAT[backbone], 512)
    assert head[3].p == pytest.approx(0.33)
    assert (head[4].in_features, head[4].out_features) == (512, 256)
    assert isinstance(m.pool, nn.AdaptiveAvgPool2d)
    s = m.config.input_size
    x1 = torch.randn(3, 1, s, s)
    with torch.no_grad():
        e1 = m(x1)
        e3 = m(x1.repeat(1, 3, 1, 1))
        feats = m.backbone(x1.repeat(1, 3, 1, 1))
    assert e1.shape == (3, 256) and e1.dtype == torch.float32
    assert feats.shape[:2] == (3, FEAT[backbone])
    # grayscale is repeated to 3 channels: identical to giving the 3 channels
    _assert_close(e1.numpy(), e3.numpy(), 1e-6, "1-channel vs repeated 3-channel")


def test_default_input_sizes_and_emb_dim() -> None:
    assert build_model("small").config.input_size == 128
    m = build_model("small", emb_dim=64, input_size=64).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 64, 64)).shape == (2, 64)


def _torchvision_convnext_keys(depths: tuple[int, ...], dims: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The key names and shapes of torchvision's convnext_* state_dict, written out from its layout."""
    k: dict[str, tuple[int, ...]] = {"features.0.0.weight": (dims[0], 3, 4, 4),
                                     "features.0.0.bias": (dims[0],),
                                     "features.0.1.weight": (dims[0],), "features.0.1.bias": (dims[0],)}
    for s, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
        idx = 1 + 2 * s
        for b in range(depth):
            p = f"features.{idx}.{b}."
            k[p + "layer_scale"] = (dim, 1, 1)
            k[p + "block.0.weight"] = (dim, 1, 7, 7)
            k[p + "block.0.bias"] = (dim,)
            k[p + "block.2.weight"] = (dim,)
            k[p + "block.2.bias"] = (dim,)
            k[p + "block.3.weight"] = (4 * dim, dim)
            k[p + "block.3.bias"] = (4 * dim,)
            k[p + "block.5.weight"] = (dim, 4 * dim)
            k[p + "block.5.bias"] = (dim,)
        if s < 3:
            k[f"features.{idx + 1}.0.weight"] = (dim,)
            k[f"features.{idx + 1}.0.bias"] = (dim,)
            k[f"features.{idx + 1}.1.weight"] = (dims[s + 1], dim, 2, 2)
            k[f"features.{idx + 1}.1.bias"] = (dims[s + 1],)
    k.update({"classifier.0.weight": (dims[3],), "classifier.0.bias": (dims[3],),
              "classifier.2.weight": (1000, dims[3]), "classifier.2.bias": (1000,)})
    return k


def _torchvision_resnet18_keys() -> dict[str, tuple[int, ...]]:
    def bn(p: str, c: int) -> dict[str, tuple[int, ...]]:
        return {p + ".weight": (c,), p + ".bias": (c,), p + ".running_mean": (c,), p + ".running_var": (c,),
                p + ".num_batches_tracked": ()}

    k: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    cin = 64
    for layer, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{layer}.{b}"
            k[p + ".conv1.weight"] = (c, cin if b == 0 else c, 3, 3)
            k.update(bn(p + ".bn1", c))
            k[p + ".conv2.weight"] = (c, c, 3, 3)
            k.update(bn(p + ".bn2", c))
            if b == 0 and layer > 1:
                k[p + ".downsample.0.weight"] = (c, cin, 1, 1)
                k.update(bn(p + ".downsample.1", c))
        cin = c
    k.update({"fc.weight": (1000, 512), "fc.bias": (1000,)})
    return k


def _fake_torchvision_file(tmp_path, keys: dict[str, tuple[int, ...]], name: str) -> tuple:
    g = torch.Generator().manual_seed(3)
    sd = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        else:
            sd[k] = torch.randn(shape, generator=g)
    path = tmp_path / f"{name}-fake.pth"
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("backbone", ["convnext_tiny", "resnet18"])
def test_torchvision_state_dict_loads_strictly(tmp_path, backbone: str) -> None:
    keys = _torchvision_convnext_keys((3, 3, 9, 3), (96, 192, 384, 768)) if backbone == "convnext_tiny" \
        else _torchvision_resnet18_keys()
    path, sd = _fake_torchvision_file(tmp_path, keys, backbone)
    m = build_model(backbone, pretrained=path, input_size=32)
    got = m.backbone.state_dict()
    cls = "classifier." if backbone.startswith("convnext") else "fc."
    assert set(got) == {k for k in keys if not k.startswith(cls)}
    for k, v in got.items():
        assert torch.equal(v, sd[k]), k
    # a file missing one key, or with a foreign key, is refused and the key is named
    broken = dict(sd)
    missing = next(iter(k for k in keys if not k.startswith(cls)))
    del broken[missing]
    broken["features.99.weight"] = torch.zeros(1)
    bad = tmp_path / "broken.pth"
    torch.save(broken, bad)
    with pytest.raises(ModelFileError, match="do not match") as ei:
        build_model(backbone, pretrained=bad)
    assert missing in str(ei.value) and "features.99.weight" in str(ei.value)


def test_convnext_base_key_layout_matches_torchvision(convnext_base) -> None:
    expected = _torchvision_convnext_keys((3, 3, 27, 3), (128, 256, 512, 1024))
    m = convnext_base
    got = {k: tuple(v.shape) for k, v in m.backbone.state_dict().items()}
    assert got == {k: v for k, v in expected.items() if not k.startswith("classifier.")}


def test_pretrained_is_never_downloaded(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model("resnet18", pretrained=tmp_path / "resnet18-f37072fd.pth")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("small", pretrained=tmp_path / "x.pth")
    # a folder, and a file of the right keys but other shapes (torch's size-mismatch error named no file)
    with pytest.raises(IsADirectoryError, match="a folder"):
        build_model("resnet18", pretrained=tmp_path)
    from deepssim_fast.model import ModelFileError

    sd = {k: v for k, v in build_model("resnet18", input_size=64).backbone.state_dict().items()}
    sd["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(ModelFileError, match=r"odd.pth: tensors do not fit torchvision's resnet18 layout .*conv1"):
        build_model("resnet18", pretrained=tmp_path / "odd.pth")
    np.save(tmp_path / "garbage.npy", np.zeros(3))  # (torch's 600 characters advised weights_only=False)
    with pytest.raises(ModelFileError, match=r"garbage.npy: not a readable state_dict file \((a safe weights-only|"
                                             r"\w+Error: )") as e:
        build_model("resnet18", pretrained=tmp_path / "garbage.npy")
    assert "weights_only=False" not in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("backbone,frozen,trainable", [
    ("convnext_tiny", ("features.0.", "features.1."), ("features.2.", "features.3.", "features.7.")),
    ("resnet18", ("conv1.", "bn1.", "layer1."), ("layer2.", "layer3.", "layer4.")),
    ("small", ("features.0.", "features.1."), ("features.2.", "features.3.")),
])
def test_freeze_rule_is_stages_0_and_1(backbone: str, frozen: tuple, trainable: tuple) -> None:
    m = build_model(backbone, input_size=32, freeze_stages=True)
    for n, p in m.backbone.named_parameters():
        if n.startswith(frozen):
            assert not p.requires_grad, n
        else:
            assert p.requires_grad, n
            assert not n.startswith(frozen)
    assert any(n.startswith(trainable) for n, p in m.backbone.named_parameters() if p.requires_grad)
    assert all(p.requires_grad for p in m.head.parameters())
    if backbone == "convnext_tiny":
        # the reference's rule ('0' in name or '1' in name) would also catch later stages
        names = [n for n, _ in m.backbone.named_parameters()]
        ref_rule = [n for n in names if "0" in n or "1" in n]
        ours = [n for n, p in m.backbone.named_parameters() if not p.requires_grad]
        assert any(n.startswith("features.5.") for n in ref_rule)
        assert len(ref_rule) > 2 * len(ours)


# ---------------------------------------------------------------------------------------------- export / load
def test_files_that_store_their_settings_refuse_other_ones(tmp_path, small_model) -> None:
    """input_size/size_policy are for foreign TorchScript files: a checkpoint refused other values, but a
    TorchScript file of ours silently took them (feeding the encoder what it was not trained on). Both now
    refuse values other than their own, and both take their own."""
    ck = small_model.save_checkpoint(tmp_path / "m.pt")
    ts = small_model.save_torchscript(tmp_path / "m_ts.pt")
    for path, kind in ((ck, "a checkpoint"), (ts, "a TorchScript file of ours")):
        with pytest.raises(ValueError, match=f"is {kind} that stores its own \\(input_size=64"):
            load_model(path, input_size=128)
        with pytest.raises(ValueError, match="overrides apply to foreign TorchScript files only"):
            load_model(path, size_policy="pad" if small_model.config.size_policy != "pad" else "fit")
        assert load_model(path, input_size=64, size_policy=small_model.config.size_policy).config.input_size == 64


def test_embeddings_do_not_depend_on_the_batch_an_image_is_in(small_model, real_images) -> None:
    """An image embedded alone (batch of one: a changed file re-embedded, a resume) differed in the last bits
    (1.4e-7 with the demo encoder) from the same image embedded in any larger batch; a batch of one now runs
    as two copies, so every batch size gives the same bits."""
    imgs = list(real_images[:5])
    want = embed(imgs, small_model, progress=False)
    for bs in (1, 2, 3, 4):
        assert np.array_equal(embed(imgs, small_model, batch_size=bs, progress=False), want), bs
    assert np.array_equal(embed(imgs[3:4], small_model, progress=False), want[3:4])


def test_torchscript_round_trip_identical_embeddings(tmp_path, small_model, real_images) -> None:
    path = small_model.save_torchscript(tmp_path / "enc.pt")
    ts = torch.jit.load(str(path))
    x = preprocess(real_images[:5], small_model.config)
    with torch.no_grad():
        ref = small_model(x)
        got = ts(x)
        got3 = ts(x.repeat(1, 3, 1, 1))
    assert got.shape == (5, 256)
    assert torch.equal(ref, got), (ref - got).abs().max()
    _assert_close(got3.numpy(), ref.numpy(), 1e-6, "torchscript 3-channel")
    loaded = load_model(path)
    assert loaded.config.input_size == 64 and loaded.config.backbone == "small"
    e_ts = embed(real_images, loaded, progress=False)
    e_m = embed(real_images, small_model, progress=False)
    np.testing.assert_array_equal(e_ts, e_m)
    # a path works as the model too
    np.testing.assert_array_equal(embed(real_images, str(path), progress=False), e_m)
    # re-export of a loaded TorchScript model keeps the behaviour
    again = load_model(loaded.save_torchscript(tmp_path / "again.pt"))
    np.testing.assert_array_equal(embed(real_images, again, progress=False), e_m)



def test_plain_jit_save_keeps_the_config(tmp_path, small_model, real_images) -> None:
    """torch.jit.save of a scripted model (no save_torchscript extra file) loads with the model's own input
    size and policy, so it embeds as the checkpoint does."""
    p = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(small_model.eval()), str(p))
    ck = load_model(small_model.save_checkpoint(tmp_path / "ck.pt"))
    loaded = load_model(p)
    assert loaded.config.input_size == ck.config.input_size and loaded.config.backbone == "small"
    _assert_close(embed(real_images, loaded, progress=False), embed(real_images, ck, progress=False), 1e-6,
                  "plain torch.jit.save vs checkpoint")

def test_foreign_torchscript_defaults(tmp_path, caplog) -> None:
    class Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0, :2, :4].flatten(1) + 10.0

    p = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.script(Plain()), str(p))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        m = load_model(p, input_size=48)
    assert m.config.input_size == 48 and m.config.size_policy == "resize"
    # the assumed settings are said (a traced copy of one of our encoders loses its config and was fed 224 x
    # 224 resized inputs without a word); the ones given are not
    assert "assuming the published DeepSSIM encoder's size policy resize;" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        load_model(p, input_size=48, size_policy="fit")
    assert caplog.text == ""
    e = embed([np.random.default_rng(0).random((50, 60), dtype=np.float32)], m, progress=False)
    assert e.shape == (1, 8)
    _assert_close(np.linalg.norm(e, axis=1), np.ones(1), 1e-6, "norm")


class _ThreeChannelStem(nn.Module):
    """Stands in for the published DeepSSIM encoder: a ConvNeXt whose stem takes 3 channels (the reference
    repeats each z-scored grayscale image to 3 channels before the network; its forward does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stem(x)).flatten(1)


def _foreign_file(tmp_path, net: nn.Module, name: str) -> tuple[nn.Module, Any]:
    """``net`` in eval mode, scripted and saved as ``name``, and that file loaded as a foreign encoder of
    64 x 64 inputs (size policy fit)."""
    net.eval()
    p = tmp_path / name
    torch.jit.save(torch.jit.script(net), str(p))
    return net, load_model(p, input_size=64, size_policy="fit")


def test_the_foreign_torchscript_warning_gives_a_command_that_stores_the_settings(tmp_path, caplog,
                                                                                 real_images) -> None:
    """The warning for a TorchScript file without stored settings advised load_model(path, input_size=...),
    which only the Python API can follow (``deepssim-fast embed`` has no --input-size): it now gives the
    export command that writes a copy storing them, and that command, run as given, does."""
    import shlex

    from deepssim_fast.cli import main

    net = _ThreeChannelStem().eval()
    p = tmp_path / "traced encoder.pt"  # (a space: the command quotes the path)
    torch.jit.save(torch.jit.script(net), str(p))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        load_model(p, input_size=64)
    said = re.search(r"`(deepssim-fast export [^`]*)`", caplog.text)
    assert said and "deepssim-fast embed" not in caplog.text, caplog.text
    # (the choices as argparse writes them: "fit|resize|pad", pasted into a shell, was a pipeline)
    assert "--input-size 64 --size-policy {fit,resize,pad} --out FILE" in said.group(1)
    out = tmp_path / "with settings.pt"
    argv = [str(out) if a == "FILE" else "fit" if a == "{fit,resize,pad}" else a for a in shlex.split(said.group(1))]
    assert argv[:2] == ["deepssim-fast", "export"] and main(argv[1:]) == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        stored = load_model(out)
    assert caplog.text == "" and (stored.config.input_size, stored.config.size_policy) == (64, "fit")
    np.testing.assert_array_equal(embed(real_images[:3], stored, progress=False),
                                  embed(real_images[:3], load_model(p, input_size=64, size_policy="fit"),
                                        progress=False))


def _zscored(imgs: list[np.ndarray]) -> np.ndarray:
    """The reference's per-image z-score (population std, float64), as float32 (N, S, S)."""
    return np.stack([(a - a.mean()) / a.std() for a in (i.astype(np.float64) for i in imgs)]).astype(np.float32)


def test_foreign_torchscript_with_a_three_channel_stem_embeds(tmp_path, real_images) -> None:
    """embed fed a foreign TorchScript file (the published DeepSSIM weights) (N, 1, S, S) input, which its
    3-channel stem rejected with a TorchScript RuntimeError: no embedding could be made with the published
    encoder. It now gets the z-scored image repeated to 3 channels, as the reference feeds it."""
    torch.manual_seed(0)
    net, m = _foreign_file(tmp_path, _ThreeChannelStem(), "published.pt")
    imgs = [fit_size(a, 64, "fit") for a in real_images[:3]]
    got = embed(imgs, m, progress=False)
    # the reference: per-image z-score (population std), the channel repeated 3 times, the network
    z = _zscored(imgs)
    with torch.no_grad():
        want = torch.nn.functional.normalize(net(torch.from_numpy(z)[:, None].repeat(1, 3, 1, 1)), dim=1)
    _assert_close(got, want.numpy(), 1e-5, "published-style encoder")
    # evaluate/predict_pairs call the loaded model directly: the same input convention
    with torch.no_grad():
        direct = m(torch.from_numpy(z)[:, None])
    _assert_close(torch.nn.functional.normalize(direct, dim=1).numpy(), want.numpy(), 1e-5, "model call")


def test_foreign_torchscript_with_a_one_channel_stem_gets_one_channel(tmp_path, real_images) -> None:
    """A foreign file whose first convolution takes one channel is fed the grayscale input as it is (the
    3-channel repeat is for 3-channel stems such as the published encoder's)."""
    torch.manual_seed(0)
    gray = _ThreeChannelStem()
    gray.stem = nn.Conv2d(1, 8, kernel_size=4, stride=4)
    net, m = _foreign_file(tmp_path, gray, "gray.pt")
    imgs = [fit_size(a, 64, "fit") for a in real_images[:2]]
    got = embed(imgs, m, progress=False)
    z = _zscored(imgs)
    with torch.no_grad():
        want = torch.nn.functional.normalize(net(torch.from_numpy(z)[:, None]), dim=1)
    _assert_close(got, want.numpy(), 1e-5, "one-channel foreign encoder")


def test_a_foreign_encoders_width_is_known_at_load_and_its_hash_stays(tmp_path, real_images) -> None:
    """A foreign TorchScript file loaded with a placeholder emb_dim of 256, which embed corrected at its first
    call: the model's hash (over its config) changed under an audit, and evaluate refused the very object the
    audit used ("is not the encoder this audit used"); embed([]) gave (0, 256) and describe() 256. The width
    is found at load now, from one blank batch, and embed leaves the config as it is."""
    import importlib

    audit = importlib.import_module("deepssim_fast.audit")
    torch.manual_seed(0)
    _, m = _foreign_file(tmp_path, _ThreeChannelStem(), "published.pt")  # emits 8 x 2 x 2 = 32 values
    assert m.config.emb_dim == 32
    assert embed([], m, progress=False).shape == (0, 32)
    h = audit._module_hash(m)
    got = embed([fit_size(a, 64, "fit") for a in real_images[:2]], m, progress=False)
    assert got.shape == (2, 32) and audit._module_hash(m) == h and m.config.emb_dim == 32


def test_embed_of_tensors_holding_no_readable_data_names_them(small_model) -> None:
    """A stack on the meta device failed deep in torch ("Cannot copy out of meta tensor; no data!"), a sparse
    one as oddly; embed names the image and says which tensors it reads, as ssim and all_pairs do."""
    with pytest.raises(ValueError, match=r"images\[0\]: a tensor on device 'meta', which embed cannot read"):
        embed(torch.empty(2, 40, 40, device="meta"), small_model, progress=False)
    with pytest.raises(ValueError, match=r"volume 0: a tensor on device 'meta', which embed cannot read"):
        embed_volume(torch.empty(20, 40, 40, device="meta"), small_model, progress=False)
    with pytest.raises(TypeError, match=r"images\[0\]: torch.sparse_coo tensors are not supported"):
        embed(torch.ones(2, 40, 40).to_sparse(), small_model, progress=False)


def test_embed_on_the_meta_device_is_refused_and_leaves_the_model_usable(small_model, real_images) -> None:
    """embed(device="meta") moved the model there (its weights lost: "Cannot copy out of meta tensor") and,
    failing to move it back, left its lock held: the next embed of the model waited forever. It is refused
    first now; and a failed move back still releases the lock."""
    import threading

    want = embed(real_images[:2], small_model, progress=False)
    with pytest.raises(ValueError, match="device 'meta' holds no data"):
        embed(real_images[:2], small_model, device="meta", progress=False)
    assert all(p.device.type == "cpu" for p in small_model.parameters())
    np.testing.assert_array_equal(embed(real_images[:2], small_model, progress=False), want)
    # a move back that fails (as a CUDA out-of-memory would): the error comes out, the lock is released
    small_model.train()
    real_to = small_model.to
    calls = []

    def failing_back(*a, **k):  # (the first call, the move to the device asked for, is let through)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("no memory to move back")
        return real_to(*a, **k)

    try:
        small_model.to = failing_back
        with pytest.raises(RuntimeError, match="no memory to move back"):
            embed(real_images[:2], small_model, device="cpu:0",
                  progress=False)
    finally:
        del small_model.to
        small_model.eval()
    done = []
    t = threading.Thread(target=lambda: done.append(embed(real_images[:1], small_model, progress=False)))
    t.start()
    t.join(30)
    assert done, "the model's lock was left held"


def test_an_all_zero_embedding_is_refused(tmp_path, real_images) -> None:
    """A foreign model emitting an all-zero row gave a zero 'unit' embedding (F.normalize's eps), whose cosine
    with itself is 0: an exact copy could never be found. It is an error naming the image."""
    class Zero(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 4) * x.mean()

    torch.jit.save(torch.jit.script(Zero()), str(tmp_path / "zero.pt"))
    m = load_model(tmp_path / "zero.pt", input_size=32, size_policy="fit")
    with pytest.raises(ValueError, match=r"all-zero embedding for image 0: it has no direction"):
        embed(real_images[:2], m, progress=False)


def test_checkpoint_round_trip(tmp_path, small_model, real_images) -> None:
    p = small_model.save_checkpoint(tmp_path / "m.pt", step=3)
    raw = torch.load(p, weights_only=True)
    assert raw["step"] == 3 and raw["config"]["backbone"] == "small"
    loaded = load_model(p)
    assert not loaded.training
    np.testing.assert_array_equal(embed(real_images, loaded, progress=False),
                                  embed(real_images, small_model, progress=False))


def test_a_durable_write_syncs_the_folder_that_holds_its_rename(tmp_path, small_model, monkeypatch) -> None:
    """Checkpoints (and every durable atomic write) fsynced the file, then renamed it over the old one, but never
    fsynced the folder, which holds the rename: after a power loss the old file (or none) could be back. The
    folder is now synced after the rename; where a folder cannot be synced (Windows) the write still succeeds."""
    import os
    import stat

    from deepssim_fast import _atomic

    real_fsync, synced = os.fsync, []

    def recording(fd: int) -> None:
        st = os.fstat(fd)
        synced.append(("folder" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    run = tmp_path / "run"
    small_model.save_checkpoint(run / "last.pt", step=1)
    assert synced == [("file", os.stat(run / "last.pt").st_ino), ("folder", os.stat(run).st_ino)]
    synced.clear()
    _atomic.atomic_write_bytes(run / "cache.bin", b"x", durable=False)  # (a cache: no fsync at all)
    assert synced == []

    def refusing(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", refusing)
    small_model.save_checkpoint(run / "last.pt", step=2)
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2


def test_damaged_checkpoint_entries_are_named_with_the_file(tmp_path, small_model) -> None:
    """A checkpoint with the right format marker but no weights or settings, or with settings that are not
    valid, failed with a bare KeyError or a ValueError that named no file."""
    good = torch.load(small_model.save_checkpoint(tmp_path / "m.pt"), weights_only=True)
    for name, change, match in (
        ("no_model.pt", lambda c: c.pop("model"), "no model entry"),
        ("no_config.pt", lambda c: c.pop("config"), "no config entry"),
        ("bad_size.pt", lambda c: c["config"].update(input_size=16), "model settings stored in it are not valid"),
        ("bad_key.pt", lambda c: c["config"].update(backbone="vgg"), "model settings stored in it are not valid"),
    ):
        ck = {k: (dict(v) if isinstance(v, dict) and k == "config" else v) for k, v in good.items()}
        change(ck)
        torch.save(ck, tmp_path / name)
        with pytest.raises(ModelFileError, match=match) as ei:
            load_model(tmp_path / name)
        assert name in str(ei.value)


def test_a_truncated_model_file_is_said_to_be_incomplete(tmp_path, small_model, real_images, capsys) -> None:
    """A checkpoint or TorchScript file cut short (an interrupted copy or download) was called "not a
    deepssim_fast checkpoint or TorchScript file", with torch's text cut mid-sentence ("... If you are seeing
    this error, there is a high"); it is now said to be incomplete, by load_model, train(resume=) and the
    CLI's --resume alike."""
    from deepssim_fast.cli import main
    from deepssim_fast.training import read_checkpoint, train

    good = [small_model.save_checkpoint(tmp_path / "ck.pt", step=1), small_model.save_torchscript(tmp_path / "ts.pt")]
    for f in good:
        raw = f.read_bytes()
        for cut in (len(raw) // 2, len(raw) - 1, 100):
            t = tmp_path / f"cut_{cut}_{f.name}"
            t.write_bytes(raw[:cut])
            for load in (load_model, read_checkpoint):
                with pytest.raises(ModelFileError, match=re.escape(f"{t}: incomplete model file")) as ei:
                    load(t)
                assert "copy it again" in str(ei.value) and "PytorchStreamReader" not in str(ei.value)
    t = tmp_path / "last.pt"
    t.write_bytes(good[0].read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="last.pt: incomplete model file"):
        train(real_images, resume=t, max_steps=2, out=tmp_path / "run", progress=False)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, a in enumerate(real_images[:4]):
        np.save(folder / f"{k}.npy", a)
    capsys.readouterr()
    assert main(["train", "--images", str(folder), "--out", str(tmp_path / "cli"), "--resume", str(t)]) == 2
    err = capsys.readouterr().err
    assert "last.pt: incomplete model file" in err and "copy it again" in err, err
    # torchvision weights cut short, given as pretrained=
    sd = tmp_path / "resnet18-cut.pth"
    torch.save(build_model("resnet18", input_size=64).backbone.state_dict(), sd)
    sd.write_bytes(sd.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="resnet18-cut.pth: incomplete model file"):
        build_model("resnet18", pretrained=sd)


def test_torchs_text_is_never_cut_in_the_middle_of_a_sentence() -> None:
    from deepssim_fast.model import _torch_text

    miniz = ("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
             "internal miniz error. If you are seeing this error, there is a high likelihood that your "
             "checkpoint file is corrupted. Please try to redownload the checkpoint file.")
    assert _torch_text(miniz, 160) == ("PytorchStreamReader failed reading zip archive: failed finding central "
                                       "directory. This is an internal miniz error.")
    assert _torch_text(miniz, 1000) == miniz
    long = "word " * 60 + "end"  # no sentence ends within the limit: whole, not cut
    assert _torch_text(long, 100) == long.strip()
    assert _torch_text("two\n  lines", 100) == "two lines"
    # an abbreviation's full stop ends no sentence ("e.g. this yyy..." was cut to "e.g.")
    for abbr in ("e.g.", "i.e.", "etc.", "(e.g.", "E.g."):
        text = f"{abbr} this " + "y" * 300
        assert _torch_text(text) == text, abbr
    text = "It failed. Use a file, e.g. this one " + "y" * 300
    assert _torch_text(text) == "It failed."


def test_a_text_file_starting_with_pk_is_no_model_file_and_a_damaged_zip_is_not_truncated(tmp_path,
                                                                                          small_model) -> None:
    """A file that merely starts with "PK" (b"PK this is a text file") was called an "incomplete model file
    ... truncated": only a zip archive's start (a local file header, PK\\x03\\x04) whose end-of-central-directory
    record is missing is; one whose record is there but whose directory cannot be read is damaged."""
    from deepssim_fast.training import read_checkpoint

    text = tmp_path / "pk.pt"
    text.write_bytes(b"PK this is a text file" * 10)
    for load in (load_model, read_checkpoint):
        with pytest.raises(ModelFileError, match="not a deepssim_fast checkpoint or TorchScript file") as ei:
            load(text)
        assert "incomplete" not in str(ei.value) and "truncated" not in str(ei.value), ei.value
        assert "not a torch file at all" in str(ei.value), ei.value
    with pytest.raises(ModelFileError, match="not a readable state_dict file") as ei:
        build_model("resnet18", pretrained=text)
    assert "incomplete" not in str(ei.value), ei.value
    # a whole archive whose central directory is overwritten: damaged, not truncated
    raw = bytearray(small_model.save_checkpoint(tmp_path / "ck.pt").read_bytes())
    at = raw.rfind(b"PK\x01\x02")  # (the last central directory entry)
    raw[at:at + 4] = b"XXXX"
    bad = tmp_path / "bad_dir.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"bad_dir\.pt: damaged model file: it is a zip archive") as ei:
        load_model(bad)
    assert "truncated" not in str(ei.value) and "copy it again" in str(ei.value), ei.value


def test_model_file_that_is_neither(tmp_path) -> None:
    txt = tmp_path / "notes.pt"
    txt.write_text("not a model")
    with pytest.raises(ModelFileError, match="expected a deepssim_fast checkpoint"):
        load_model(txt)
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(ModelFileError, match="expected a deepssim_fast checkpoint"):
        load_model(other)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(tmp_path / "missing.pt")



def test_bare_state_dict_file_says_how_to_load_it(tmp_path, small_model, real_images) -> None:
    sd_file = tmp_path / "sd.pt"
    torch.save(small_model.state_dict(), sd_file)  # an OrderedDict of tensors, no config
    with pytest.raises(ModelFileError, match="bare state_dict") as ei:
        load_model(sd_file)
    msg = str(ei.value)
    assert "build_model" in msg and "load_state_dict" in msg and "save_checkpoint" in msg
    assert "OrderedDict" not in msg and "pretrained=" not in msg  # our own keys: no backbone-file hint
    # the advice works: rebuild with the matching settings, load, save a checkpoint that load_model reads
    m = build_model("small", input_size=64)
    m.load_state_dict(torch.load(sd_file, weights_only=True))
    loaded = load_model(m.save_checkpoint(tmp_path / "m.pt"))
    np.testing.assert_array_equal(embed(real_images[:3], loaded, progress=False),
                                  embed(real_images[:3], small_model, progress=False))
    # a backbone-only file (torchvision's key names) is pointed at pretrained=
    bb = tmp_path / "bb.pt"
    torch.save(small_model.backbone.state_dict(), bb)
    with pytest.raises(ModelFileError, match=r"bare state_dict.*pretrained=path"):
        load_model(bb)

# ---------------------------------------------------------------------------------------------- embed
def test_embed_conventions(small_model, real_images) -> None:
    e = embed(real_images, small_model, batch_size=4, progress=False)
    assert e.dtype == np.float32 and e.shape == (len(real_images), 256)
    _assert_close(np.linalg.norm(e, axis=1), np.ones(len(real_images)), 1e-5, "row norms")
    # batch size does not change the result; neither does the model's train/eval state before the call
    small_model.train()
    e1 = embed(real_images, small_model, batch_size=1, progress=False)
    assert small_model.training, "embed must restore the caller's train/eval mode"
    small_model.eval()
    _assert_close(e1, e, 1e-5, "batch 1 vs batch 4")
    # the same as running the network on the documented preprocessing by hand
    with torch.no_grad():
        x = preprocess(real_images, small_model.config)
        manual = torch.nn.functional.normalize(small_model(x), dim=1)
    _assert_close(e, manual.numpy(), 1e-5, "embed vs manual preprocessing")
    # a stacked array, torch tensors, Slices and (1, H, W) give the same rows
    fitted = [fit_size(a, 64, "fit") for a in real_images[:3]]
    _assert_close(embed(np.stack(fitted), small_model, progress=False), e[:3], 1e-5, "stack")
    as_tensors = [torch.from_numpy(a)[None] for a in fitted]
    _assert_close(embed(as_tensors, small_model, progress=False), e[:3], 1e-5, "(1,H,W) tensors")
    assert embed([], small_model, progress=False).shape == (0, 256)


def test_embed_is_invariant_to_intensity_scale(small_model, real_images) -> None:
    # per-image z-score: an affine change of intensities gives the same embedding
    e = embed(real_images[:4], small_model, progress=False)
    e2 = embed([3.0 * a + 100.0 for a in real_images[:4]], small_model, progress=False)
    _assert_close(e, e2, 2e-4, "affine intensity change")


def test_wide_dtype_images_keep_their_structure(small_model, real_images) -> None:
    """float64 / int64 images were cast straight to float32: finite values beyond float32's range were
    reported as 'contains NaN or Inf values', values below its normal range became a zero image, and a large
    integer offset rounded the anatomy away. They now embed as the image itself (z-score invariance)."""
    imgs = [a.astype(np.float64) for a in real_images[:3]]
    e = embed(imgs, small_model, progress=False)
    for what, f in (("x 1e39 (float64)", lambda a: a * 1e39), ("x 1e-300 (float64)", lambda a: a * 1e-300),
                    ("int64 + 2**40", lambda a: (a * 1000).astype(np.int64) + 2**40)):
        _assert_close(embed([f(a) for a in imgs], small_model, progress=False), e, 2e-4, what)
    # a constant float64 image beyond float32's range is a constant image, and NaN is still an error
    const = embed([np.full((64, 64), 1e39)], small_model, progress=False)
    _assert_close(const, embed([np.zeros((64, 64))], small_model, progress=False), 1e-6, "constant 1e39")
    with pytest.raises(ValueError, match=r"images\[0\]: contains NaN"):
        embed([np.where(imgs[0] > 0, np.nan, 1e39)], small_model, progress=False)


def test_size_policies() -> None:
    rng = np.random.default_rng(1)
    img = rng.random((70, 90), dtype=np.float32)
    f = fit_size(img, 64, "fit")
    np.testing.assert_array_equal(f, img[3:67, 13:77])
    small = rng.random((20, 30), dtype=np.float32)
    fp = fit_size(small, 32, "fit")
    np.testing.assert_array_equal(fp[6:26, 1:31], small)
    assert (fp[:6] == small.min()).all()
    r = fit_size(img, 32, "resize")
    assert r.shape == (32, 32) and r.dtype == np.float32
    assert abs(float(r.mean()) - float(img.mean())) < 0.02
    # pad: letterbox with the minimum to a centred square, then resize; the whole image is kept
    tall = np.zeros((40, 20), np.float32) + 5.0
    tall[10:30, 5:15] = 9.0
    pd = fit_size(tall, 40, "pad")
    assert pd.shape == (40, 40) and pd.dtype == np.float32
    assert (pd[:, :10] == 5.0).all() and (pd[:, 30:] == 5.0).all()  # padding = the image's minimum
    np.testing.assert_array_equal(pd[:, 10:30], tall)  # square side already 40: no resampling
    pr = fit_size(tall, 20, "pad")
    assert pr.shape == (20, 20) and abs(float(pr[10, 10]) - 9.0) < 1e-5 and pr[10, 2] == pytest.approx(5.0)
    np.testing.assert_array_equal(fit_size(img[:64, :64], 64, "pad"), img[:64, :64])
    with pytest.raises(ValueError, match="size_policy"):
        build_model("small", size_policy="stretch")


def _size_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "model's input size" in r.getMessage()]


def test_a_fit_that_keeps_less_than_half_an_image_is_said_once_per_call(caplog) -> None:
    """The fit policy centre-cropped images larger than the model's input without a word: a 64 x 64 image at
    input 32 was embedded as its central quarter alone, so a pair that differed outside it (SSIM 0.45) scored
    cosine 1, a duplicate. It is said once per call, not per batch, naming an image's size, the input size,
    how many images and the way out; the embeddings are what they were."""
    torch.manual_seed(0)
    m = build_model("small", input_size=32).eval()
    rng = np.random.default_rng(2)
    big = [rng.random((64, 72), dtype=np.float32) for _ in range(3)]
    imgs = big + [big[0][16:48, 20:52]]  # the last: the first one's centre crop, which fits as it is
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        e = embed(imgs, m, batch_size=1, progress=False)
    (msg,) = _size_warnings(caplog)
    assert "3 of 4 images" in msg and "64 x 72" in msg and "32 x 32" in msg, msg
    assert "--size-policy pad" in msg and "--input-size" in msg, msg
    np.testing.assert_array_equal(e[0], e[3])  # (only the centre reaches the encoder)
    # the embeddings are the network's on the preprocessed batch, as before
    with torch.no_grad():
        want = torch.nn.functional.normalize(m(preprocess(imgs, m.config)), dim=1).numpy()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        again = embed(imgs, m, batch_size=4, progress=False)
    np.testing.assert_array_equal(again, want)
    # said once per model and image size: an audit embeds its items in many calls of a batch each
    assert _size_warnings(caplog) == []
    torch.manual_seed(0)
    other = build_model("small", input_size=32).eval()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        embed(big, other, batch_size=2, progress=False)
    (msg,) = _size_warnings(caplog)
    assert "3 of 3 images" in msg, msg


def test_a_mild_fit_is_not_said_and_more_than_half_padding_is(caplog) -> None:
    rng = np.random.default_rng(3)
    torch.manual_seed(0)
    fit = build_model("small", input_size=32).eval()
    pad = build_model("small", input_size=32, size_policy="pad").eval()
    resize = build_model("small", input_size=32, size_policy="resize").eval()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        embed([rng.random((34, 34)), rng.random((24, 40)), rng.random((32, 32))], fit, progress=False)
        embed([rng.random((48, 64)), rng.random((200, 20))], resize, progress=False)
    assert _size_warnings(caplog) == []
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        embed([rng.random((20, 20)), rng.random((24, 24))], fit, progress=False)  # 400 of 1024 pixels: padding
    (msg,) = _size_warnings(caplog)
    assert "1 of 2 images" in msg and "20 x 20" in msg and "more than half padding" in msg, msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        embed([rng.random((48, 64)), rng.random((20, 64))], pad, progress=False)  # letterboxed to 64 x 64
    (msg,) = _size_warnings(caplog)
    assert "1 of 2 images" in msg and "20 x 64" in msg and "size policy 'pad'" in msg, msg


def test_embed_volume_says_a_lossy_fit_once(caplog) -> None:
    torch.manual_seed(0)
    m = build_model("small", input_size=32).eval()
    vols = [np.random.default_rng(k).random((70, 70, 3), dtype=np.float32) for k in range(2)]
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        embed_volume(vols, m, policy=data.SlicePolicy(axis=2, min_foreground=0.0), progress=False)
    (msg,) = _size_warnings(caplog)
    assert "6 of 6 slices" in msg and "70 x 70" in msg, msg


def test_constant_images_z_score_to_zeros_alone_or_in_a_batch(small_model) -> None:
    """The z-score of an exactly constant image of 0.1 (whose rounded mean is not 0.1, so its std came out
    tiny but > 0) was a uniform -1 image when embedded alone and zeros when batched with others: the trained
    demo encoder put cosine 0.61 between the two. A constant image z-scores to zeros, whatever its value or
    batch."""
    cfg = small_model.config
    blanks = [np.full((64, 64), v, np.float32) for v in (0.0, 5.0, 0.1, 0.3, 1000.1)]
    for b in blanks:
        assert (preprocess([b], cfg) == 0).all() and (preprocess([b, blanks[0]], cfg) == 0).all()
    e = embed(blanks, small_model, progress=False)
    alone = np.concatenate([embed([b], small_model, progress=False) for b in blanks])
    _assert_close(alone, e, 1e-6, "blank images embedded one per batch")
    _assert_close(e, np.repeat(e[:1], len(blanks), axis=0), 1e-6, "blank images of other values")


def test_constant_images_stay_constant_under_every_size_policy(small_model) -> None:
    """A constant image resampled in float32 ("resize", "pad") picked up ~1e-7 rounding noise that the
    per-image z-score blew up to a unit-variance pattern: blank slices of different values (5 and 0) embedded
    with cosine 0.49 by the trained demo encoder (their SSIM is 1). A constant image stays exactly constant
    under every size policy."""
    for policy in ("fit", "resize", "pad"):
        for value in (5.0, -1.0, 1000.0):
            for shape in ((197, 233), (70, 90), (64, 64)):
                f = fit_size(np.full(shape, value, np.float32), 64, policy)
                assert f.shape == (64, 64) and (f == np.float32(value)).all(), (policy, value, shape)
    model = build_model("small", input_size=64, size_policy="resize")
    model.load_state_dict(small_model.state_dict())
    e = embed([np.full((197, 233), v, np.float32) for v in (0.0, 5.0, -1.0)], model.eval(), progress=False)
    _assert_close(e[1:], np.repeat(e[:1], 2, axis=0), 1e-6, "blank slices of other values")


def test_embed_volume_aggregation(small_model) -> None:
    vol = data.load_volume("aniso_vox").array
    pol = data.SlicePolicy(axis=2)
    agg, per = embed_volume([vol, vol[::-1]], small_model, policy=pol, progress=False)
    assert agg.shape == (2, 256) and len(per) == 2
    slices = [s.array for s in data.volume_slices(vol, pol)]
    direct = embed(slices, small_model, progress=False)
    _assert_close(per[0], direct, 1e-6, "per-slice embeddings")
    m = direct.mean(axis=0)
    _assert_close(agg[0], m / np.linalg.norm(m), 1e-6, "mean of slice embeddings, renormalised")
    single, _ = embed_volume(vol, small_model, policy=pol, progress=False)
    _assert_close(single[0], agg[0], 1e-6, "one volume")
    assert cosine_pairs(agg[:1], agg[:1])[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"volume 0: contains NaN"):
        bad = vol.copy()
        bad[3, 3, 3] = np.nan
        embed_volume([bad], small_model, progress=False)
    with pytest.raises(ValueError, match=r"expected a 3D array, got shape \(5, 5\)"):
        embed_volume([np.ones((5, 5))], small_model, progress=False)
    # one 2D array was iterated row by row ("got shape (25,)"), a path character by character ("shape ()"), and
    # a volume of slices under 7 pixels was named "images[0]"
    with pytest.raises(ValueError, match=r"takes 3D volumes .*got one array of shape \(25, 30\)"):
        embed_volume(np.ones((25, 30)), small_model, progress=False)
    with pytest.raises(TypeError, match="embed_volume takes arrays, not a path"):
        embed_volume("scan.nii.gz", small_model, progress=False)
    with pytest.raises(ValueError, match=r"volume 0 of shape \(3, 33, 41\): its slices along axis 2 are 3 x 33"):
        embed_volume(np.random.default_rng(0).random((3, 33, 41)), small_model, policy=data.SlicePolicy(
            axis=2, min_foreground=0.0), progress=False)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_images_are_named(small_model, real_images) -> None:
    imgs = [a.copy() for a in real_images[:3]]
    imgs[1][10, 10] = np.nan
    with pytest.raises(ValueError, match=r"images\[1\]: contains NaN"):
        embed(imgs, small_model, progress=False)
    with pytest.raises(ValueError, match=r"images\[0\].*shape \(2, 64, 64\)"):
        embed([np.zeros((2, 64, 64), np.float32)], small_model, progress=False)
    with pytest.raises(ValueError, match=r"shape \(4, 3, 64, 64\)"):
        embed([np.zeros((4, 3, 64, 64), np.float32)], small_model, progress=False)
    with pytest.raises(ValueError, match=r"3-channel image of shape \(3, 16, 16\) with different channels"):
        embed([np.random.default_rng(0).random((3, 16, 16))], small_model, progress=False)
    with pytest.raises(ValueError, match=r"got shape \(2, 2, 8, 8, 8\)"):
        embed(np.zeros((2, 2, 8, 8, 8)), small_model, progress=False)
    with pytest.raises(ValueError, match=r"got \[2, 2, 64, 64\]"):
        small_model(torch.zeros(2, 2, 64, 64))
    with pytest.raises(ValueError, match="batch_size"):
        embed(real_images, small_model, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="model"):
        embed(real_images, object(), progress=False)


def test_model_file_that_is_an_image_or_a_directory(tmp_path) -> None:
    from PIL import Image

    png = tmp_path / "scan.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    with pytest.raises(ModelFileError, match="not a deepssim_fast checkpoint or TorchScript file") as ei:
        load_model(png)
    assert "scan.png" in str(ei.value) and "weights_only=False" not in str(ei.value)
    assert "not a torch file at all" in str(ei.value)
    with pytest.raises(ModelFileError, match="is a directory"):
        load_model(tmp_path)
    # a CSV given as --model said "IndexError: pop from empty list", an empty file "EOFError"
    (tmp_path / "labels.csv").write_text("synth_id,label\na,duplicate\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, why in (("labels.csv", "it is not a torch file at all (neither a zip archive nor a pickle)"),
                      ("empty.pt", "the file is empty")):
        with pytest.raises(ModelFileError, match=re.escape(f"{name}: not a deepssim_fast checkpoint")) as ei:
            load_model(tmp_path / name)
        assert str(ei.value).endswith(f"; {why})") and "Error" not in str(ei.value).split(";")[-1], str(ei.value)


def test_embed_rejects_complex_images(small_model, real_images) -> None:
    z = real_images[0].astype(np.complex64) * (1 + 1j)
    with pytest.raises(TypeError, match="complex"):
        embed([real_images[1], z], small_model, progress=False)
    with pytest.raises(TypeError, match="complex"):
        embed([torch.from_numpy(z)], small_model, progress=False)


def test_bfloat16_tensors_embed_as_their_float32_values(small_model, real_images) -> None:
    """A bfloat16 torch tensor (an image, a stack, a volume) crashed with torch's bare 'Got unsupported
    ScalarType BFloat16' (numpy has no bfloat16); it now embeds as its (exact) float32 widening."""
    stack = torch.from_numpy(np.stack([fit_size(a, 64, "fit") for a in real_images[:3]])).bfloat16()
    want = embed(stack.float(), small_model, progress=False)
    _assert_close(embed(stack, small_model, progress=False), want, 1e-6, "bf16 stack")
    _assert_close(embed(list(stack), small_model, progress=False), want, 1e-6, "bf16 images")
    vol = torch.from_numpy(data.load_volume("aniso_vox").array.astype(np.float32)).bfloat16()
    pol = data.SlicePolicy(axis=2)
    got, _ = embed_volume(vol, small_model, policy=pol, progress=False)
    ref, _ = embed_volume(vol.float(), small_model, policy=pol, progress=False)
    _assert_close(got, ref, 1e-6, "bf16 volume")


def test_models_of_other_dtypes_embed(tmp_path, small_model, real_images) -> None:
    """A .half(), .bfloat16() or float64 model (and an fp16 TorchScript file) failed in embed with torch's
    'Input type (torch.FloatTensor) and weight type (...) should be the same': the input is now cast to the
    model's dtype, the embeddings come back float32, within that dtype's rounding of the float32 model's."""
    import copy

    want = embed(real_images[:4], small_model, progress=False)
    for dtype, tol in ((torch.float64, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        m = copy.deepcopy(small_model).to(dtype)
        got = embed(real_images[:4], m, progress=False)
        assert got.dtype == np.float32
        _assert_close(got, want, tol, str(dtype))
        assert next(m.parameters()).dtype == dtype  # the model is left as it was
    half = copy.deepcopy(small_model).half()
    half.save_torchscript(tmp_path / "half.ts")
    _assert_close(embed(real_images[:4], tmp_path / "half.ts", progress=False), want, 2e-3, "fp16 TorchScript")


def test_threads_sharing_a_model_in_train_mode_get_eval_embeddings(real_images) -> None:
    """embed switches a train-mode model to eval and back: threads sharing one (build_model returns it in train
    mode) ran forwards in train mode under each other, BatchNorm on the batch's own statistics (embeddings
    off by up to 0.19) and its running averages overwritten. A call that changes the model now holds the
    model's lock."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    model = build_model("small", input_size=32)
    assert model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imgs = np.stack([fit_size(a, 32, "fit") for a in real_images[:12]])
    ref = embed(imgs, model, batch_size=4, progress=False)
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: embed(imgs, model, batch_size=4, progress=False), range(12)))
    for o in outs:
        np.testing.assert_array_equal(o, ref)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_model_that_returns_a_tuple_is_named(tmp_path, real_images) -> None:
    """A foreign TorchScript whose forward returns (embedding, features) failed in embed with
    "AttributeError: 'tuple' object has no attribute 'float'"."""
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = self.conv(x)
            return f.mean(dim=(2, 3)), f

    torch.jit.script(Two().eval()).save(str(tmp_path / "two.ts"))
    model = load_model(tmp_path / "two.ts", input_size=32)
    with pytest.raises(ValueError, match="model returned a tuple, not a tensor of embeddings"):
        embed(real_images[:2], model, progress=False)


def test_paper_head_embeddings_do_not_depend_on_the_batch(tmp_path, real_images) -> None:
    """resnet18 embedded the same image 1.5e-7 apart in batches of 1, 2, 3, 5 and 8: the head's Linear layers
    round a row by its batch. In eval mode the head now runs a row at a time; the TorchScript file too."""
    torch.manual_seed(0)
    m = build_model("resnet18", input_size=32)
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 1, 32, 32))  # BatchNorm statistics that are not the defaults
    m.eval()
    imgs = list(real_images[:8])
    want = embed(imgs, m, progress=False)
    for bs in (1, 2, 3, 5):
        assert np.array_equal(embed(imgs, m, batch_size=bs, progress=False), want), bs
    assert np.array_equal(embed(imgs[5:6], m, progress=False), want[5:6])
    ts = load_model(m.save_torchscript(tmp_path / "r18.pt"))
    assert np.array_equal(embed(imgs, ts, batch_size=3, progress=False), want)
    # training still runs the head on the whole batch (BatchNorm1d needs it)
    m.train()
    assert m(torch.randn(4, 1, 32, 32)).shape == (4, 256)


@pytest.mark.parametrize("emb_dim, grid", [(256, 8), (128, 8), (64, 4), (16, 2), (4, 1), (32, 4), (2, 1)])
def test_small_head_keeps_two_channels_per_cell(emb_dim: int, grid: int, real_images) -> None:
    """emb_dim 64 (or 16, 4, 1) put one channel in each cell of the 8 x 8 grid: normalised to unit length a
    cell is its sign, so every image had the same embedding (all 0.125) and training had no gradient."""
    from deepssim_fast.model import local_grid
    assert local_grid(emb_dim) == grid
    torch.manual_seed(0)
    m = build_model("small", emb_dim=emb_dim, input_size=64).eval()
    e = embed(list(real_images[:6]), m, progress=False)
    assert e.shape == (6, emb_dim)
    assert len({row.tobytes() for row in e}) == 6  # images are told apart (they were all equal)
    assert len(np.unique(e)) > 2 * emb_dim  # not a sign pattern of +-1/grid
    with pytest.raises(ValueError, match="emb_dim 1 is too small"):
        build_model("small", emb_dim=1)


def test_damaged_model_files_and_a_missing_cuda_device_are_named(tmp_path, small_model) -> None:
    """8 KB overwritten in the middle of a TorchScript file or a checkpoint loaded without a word (torch does
    not check the zip CRCs) and moved embeddings by up to 0.012; device='cuda' on a CPU-only machine failed with
    torch's 'Torch not compiled with CUDA enabled', naming nothing, or blamed a good TorchScript file."""
    from deepssim_fast.model import ModelFileError, read_checkpoint
    files = {"ck": small_model.save_checkpoint(tmp_path / "m.pt"),
             "ts": small_model.save_torchscript(tmp_path / "m_ts.pt")}
    for kind, path in files.items():
        load_model(path)  # intact: loads
        raw = bytearray(path.read_bytes())
        mid = len(raw) // 2
        raw[mid:mid + 8192] = bytes(8192)
        bad = tmp_path / f"bad_{kind}.pt"
        bad.write_bytes(bytes(raw))
        with pytest.raises(ModelFileError, match=r"bad_\w+\.pt: damaged model file: its entry '.*' fails its CRC"):
            load_model(bad)
    with pytest.raises(ModelFileError, match="damaged model file"):
        read_checkpoint(tmp_path / "bad_ck.pt")
    if not torch.cuda.is_available():
        for path in files.values():
            with pytest.raises(ValueError, match="device 'cuda': CUDA is not available here"):
                load_model(path, device="cuda")
        with pytest.raises(ValueError, match="device 'cuda:0': CUDA is not available here"):
            embed([np.zeros((64, 64), np.float32)], small_model, device="cuda:0", progress=False)


def test_embed_of_a_list_of_files_keeps_its_order_and_repeats(tmp_path, small_model, real_images) -> None:
    """embed([a2, a0]) returned a0's row first and embed([a2, a2, a0]) two rows: the list went through
    discover, which sorts and drops repeats, though the docstring says row i for image i and no keys come
    back to line the rows up with."""
    files = []
    for i, a in enumerate(real_images[:3]):
        files.append(tmp_path / f"a{i}.npy")
        np.save(files[-1], a)
    base = embed(real_images[:3], small_model, progress=False)
    got = embed([str(files[2]), files[0], files[2]], small_model, progress=False)
    np.testing.assert_array_equal(got, base[[2, 0, 2]])
    np.testing.assert_array_equal(embed(str(tmp_path), small_model, progress=False), base)  # a folder: sorted


def test_a_frozen_checkpoint_reloads_frozen(tmp_path) -> None:
    """A checkpoint of a model built with freeze_stages=True reloaded with every stage trainable (its config
    still said frozen; its TorchScript copy kept the freeze), so fine-tuning it by hand moved the stem's
    weights and BatchNorm statistics."""
    m = build_model("small", input_size=32, freeze_stages=True)
    frozen = sorted(n for n, p in m.named_parameters() if not p.requires_grad)
    assert frozen
    p = m.save_checkpoint(tmp_path / "f.pt")
    back = load_model(p)
    assert back.config.freeze_stages
    assert sorted(n for n, q in back.named_parameters() if not q.requires_grad) == frozen


def test_a_training_pool_from_a_list_of_files_is_sorted_and_unique(tmp_path, real_images) -> None:
    """embed keeps a list's order and repeats (its rows); a training pool does not: a folder and a file in it
    given together held that file twice (a pairs CSV key then named two images, and the split could put one
    copy in validation and the other in training)."""
    from deepssim_fast.model import collect_images

    for i, a in enumerate(real_images[:3]):
        np.save(tmp_path / f"a{i}.npy", a)
    arrays, metas = collect_images([tmp_path / "a2.npy", str(tmp_path), tmp_path / "a0.npy"])
    assert [m.source for m in metas] == [str(tmp_path / f"a{i}.npy") for i in range(3)]
    arrays, metas = collect_images([tmp_path / "a2.npy", tmp_path / "a0.npy", tmp_path / "a2.npy"], keep_order=True)
    assert [m.source for m in metas] == [str(tmp_path / n) for n in ("a2.npy", "a0.npy", "a2.npy")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a device this machine lacks")
def test_embed_checks_the_device_before_reading_the_images(tmp_path) -> None:
    """embed(..., device="cuda") on a machine without CUDA read and decoded every image before saying so."""
    from deepssim_fast.model import build_model, embed

    m = build_model("small", input_size=32)
    with pytest.raises(Exception, match="(?i)cuda") as e:
        embed([str(tmp_path / "not_read.npy")], m, device="cuda")
    assert "not_read" not in str(e.value)


def test_foreign_outputs_of_no_real_float_dtype_are_refused_and_errors_name_the_file(tmp_path, real_images,
                                                                                     capsys) -> None:
    """A foreign TorchScript returning bool, integer or complex embeddings was accepted through e.float() (bool:
    every row alike, every pair cosine 1). Errors about a model's output or forward never named the model file,
    and a scripted forward that raised gave a 600-character TorchScript traceback."""
    from deepssim_fast.cli import main
    from deepssim_fast.training import evaluate

    class Out(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).mean(dim=(2, 3))
            if self.kind == "bool":
                return y > 0
            if self.kind == "int":
                return (y * 100).to(torch.int64)
            if self.kind == "complex":
                return torch.complex(y, y)
            if self.kind == "nan":
                return y * float("nan")
            return y

    class Raises(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(7, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.flatten(1))

    for kind, dtype in (("bool", "torch.bool"), ("int", "torch.int64"), ("complex", "torch.complex64")):
        f = tmp_path / f"{kind}.pt"
        torch.jit.script(Out(kind)).save(str(f))
        m = load_model(f, input_size=32, size_policy="fit")
        with pytest.raises(ValueError, match=f"^{re.escape(str(f))}: model returned embeddings of dtype "
                                             f"{re.escape(dtype)}; expected a real floating-point"):
            embed(real_images[:3], m, progress=False)
    f = tmp_path / "nan.pt"
    torch.jit.script(Out("nan")).save(str(f))
    with pytest.raises(ValueError, match=f"^{re.escape(str(f))}: model produced NaN/Inf embeddings"):
        embed(real_images[:3], load_model(f, input_size=32, size_policy="fit"), progress=False)
    with pytest.raises(ValueError, match=f"^{re.escape(str(f))}: model produced NaN/Inf"):  # (evaluate too)
        evaluate(load_model(f, input_size=32, size_policy="fit"), real_images[:4], n_pairs=4)
    f = tmp_path / "raises.pt"
    torch.jit.script(Raises()).save(str(f))
    with pytest.raises(RuntimeError) as info:
        embed(real_images[:3], load_model(f, input_size=32, size_policy="fit"), progress=False)
    text = str(info.value)
    assert text.startswith(f"{f}: its forward failed on images 0..2") and "\n" not in text, text
    assert re.search(r"\): RuntimeError: mat1 and mat2 shapes cannot be multiplied \(3x\d+ and 7x4\)$", text), text
    assert len(text) < 300, text
    np.save(tmp_path / "a.npy", real_images[0])  # (the command: one line naming the file)
    assert main(["embed", "--model", str(f), "--images", str(tmp_path / "a.npy"), "--out",
                 str(tmp_path / "e.npy"), "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(f) in err and "mat1 and mat2" in err, err
