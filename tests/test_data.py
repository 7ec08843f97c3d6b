"""Palette masks, DAVIS / YouTube-VOS readers, the synthetic generator, augmentations and the
training clip samplers. Small sizes only: the whole file runs in a few seconds."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hmmn_ops.data import (
    DAVIS, ImageClips, SyntheticConfig, SyntheticImages, SyntheticVideo, SyntheticVideos, VideoClips, YouTubeVOS,
    davis_palette, hide_and_seek, occlusion_frame_ids, load_mask, overlay, save_mask, synthetic_video, warp, write_davis,
)
from hmmn_ops.data.augment import affine

SMALL = SyntheticConfig(height=48, width=64, num_frames=6)


# ----------------------------------------------------------------------------- palette


def test_davis_palette_values():
    p = davis_palette()
    assert p.shape == (256, 3) and p.dtype == np.uint8
    np.testing.assert_array_equal(p[:5], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]])
    assert tuple(p[255]) == (224, 224, 192)


def test_mask_round_trip(tmp_path):
    labels = np.random.default_rng(0).integers(0, 6, (7, 9))
    labels[0, 0] = 255
    save_mask(tmp_path / "a.png", labels)
    back, palette = load_mask(tmp_path / "a.png")
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_array_equal(palette, davis_palette())
    custom = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    save_mask(tmp_path / "b.png", labels % 2, palette=custom)
    back, palette = load_mask(tmp_path / "b.png")
    np.testing.assert_array_equal(back, labels % 2)
    np.testing.assert_array_equal(palette[:2], custom)
    assert Image.open(tmp_path / "b.png").mode == "P"
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]  # no temporary file left


def test_save_mask_rejects_bad_labels(tmp_path):
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 255\]"):
        save_mask(tmp_path / "x.png", np.full((3, 3), 300))
    with pytest.raises(ValueError, match="integer or bool"):
        save_mask(tmp_path / "x.png", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        save_mask(tmp_path / "x.png", np.zeros((3, 3, 3), np.uint8))
    assert not os.listdir(tmp_path)


def test_load_mask_refuses_rgb_and_accepts_grey(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(ValueError) as e:
        load_mask(path)
    assert str(path) in str(e.value) and "'RGB'" in str(e.value) and "save_mask" in str(e.value)
    Image.fromarray(np.full((4, 4), 2, np.uint8)).save(tmp_path / "grey.png")
    labels, palette = load_mask(tmp_path / "grey.png")
    assert palette is None and (labels == 2).all()


def test_overlay():
    image = np.full((6, 8, 3), 100, np.uint8)
    labels = np.zeros((6, 8), np.int64)
    labels[2:5, 2:6] = 1
    out = overlay(image, labels, alpha=0.5)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert (out[labels == 0] == 100).all()  # background untouched
    assert tuple(out[3, 3]) == (114, 50, 50)  # inside: half image, half red (128, 0, 0)
    assert tuple(out[2, 2]) == (128, 0, 0)  # outline in full colour
    with pytest.raises(ValueError, match="labels"):
        overlay(image, labels[:5])


# ----------------------------------------------------------------------------- synthetic videos


def test_synthetic_is_deterministic_and_order_free():
    f1, m1 = synthetic_video(7, SMALL)
    f2, m2 = synthetic_video(7, SMALL)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(m1, m2)
    assert f1.shape == (6, 48, 64, 3) and f1.dtype == np.uint8 and m1.shape == (6, 48, 64)
    f3, _ = synthetic_video(8, SMALL)
    assert not np.array_equal(f1, f3)
    video = SyntheticVideo(7, SMALL)
    late = video.render(4)  # frames render independently of the order they are asked in
    np.testing.assert_array_equal(late[0], f1[4])
    np.testing.assert_array_equal(video.render(0)[1], m1[0])


def test_synthetic_first_frame_shows_every_target():
    for seed in range(10):
        video = SyntheticVideo(seed, SMALL.replace(objects=(2, 3), occluders=(1, 1)))
        labels = video.mask(0)
        assert set(video.objects) == set(range(1, video.num_objects + 1))
        for k in video.objects:
            assert (labels == k).sum() >= 16


def test_synthetic_distractor_is_a_look_alike():
    cfg = SMALL.replace(height=96, width=96, objects=(1, 1), distractors=(1, 1), occluders=(0, 0))
    for seed in range(3):
        video = SyntheticVideo(seed, cfg)
        roles = {o["role"]: (i, o) for i, o in enumerate(video.layout)}
        d, target = roles["distractor"][1], roles["target"][1]
        assert d["twin"] == target["label"] == 1
        assert (d["shape"], d["texture"]) == (target["shape"], target["texture"])
        i = roles["distractor"][0]
        seen = [video.render(t, instances=True) for t in range(len(video))]
        shown = [(inst == i + 1) for _, _, inst in seen]
        assert any(s.sum() > 0 for s in shown)  # it is in the picture ...
        assert all((lab[s] == 0).all() for (_, lab, _), s in zip(seen, shown))  # ... and never labelled


def test_synthetic_objects_leave_the_frame():
    cfg = SMALL.replace(num_frames=12, objects=(2, 2), p_leave=1.0, distractors=(0, 0))
    for seed in range(3):
        video = SyntheticVideo(seed, cfg)
        assert all(o["leaves"] for o in video.layout if o["role"] == "target")
        frames, masks = video.arrays()
        assert set(np.unique(masks[0])) == {0, 1, 2}
        assert set(np.unique(masks[-1])) == {0}


def test_synthetic_config_validation():
    with pytest.raises(ValueError, match="objects"):
        SyntheticConfig(objects=(0, 2))
    with pytest.raises(ValueError, match="p_leave"):
        SyntheticConfig(p_leave=2)


# ----------------------------------------------------------------------------- DAVIS folders


@pytest.fixture()
def davis_root(tmp_path):
    names = write_davis(tmp_path / "DAVIS", [1, 2], SMALL, set_name="train")
    assert names == ["synth00001", "synth00002"]
    return tmp_path / "DAVIS"


def test_davis_round_trip(davis_root):
    ds = DAVIS(davis_root, "2017/train.txt")
    assert len(ds) == 2 and ds.names == ["synth00001", "synth00002"] and ds.set_name == "train"
    assert (davis_root / "ImageSets" / "2017" / "train.txt").read_text() == "synth00001\nsynth00002\n"
    seq = ds["synth00002"]
    frames, masks = synthetic_video(2, SMALL)
    assert len(seq) == 6 and seq.size == (48, 64)
    np.testing.assert_array_equal(seq.masks(), masks)  # PNG: exact
    assert np.abs(seq.frames().astype(int) - frames).mean() < 4  # JPEG: close
    assert seq.objects == {k: 0 for k in range(1, int(masks[0].max()) + 1)}
    assert ds[0].name == "synth00001" and [s.name for s in ds] == ds.names
    with pytest.raises(KeyError, match="'bear' is not in .*train.txt"):
        ds["bear"]
    assert DAVIS(davis_root, "2017/train", sequences=["synth00001"]).names == ["synth00001"]
    leftovers = [n for _, _, files in os.walk(davis_root) for n in files if n.endswith(".tmp")]
    assert not leftovers


def test_davis_broken_folders(davis_root):
    with pytest.raises(FileNotFoundError, match="image set"):
        DAVIS(davis_root, "2017/val.txt")
    ann = davis_root / "Annotations" / "480p" / "synth00001"
    os.remove(ann / "00003.png")
    with pytest.raises(ValueError, match="5 annotations for 6 frames"):
        DAVIS(davis_root, "2017/train.txt")
    save_mask(ann / "00003.png", np.zeros((48, 64), np.uint8))
    save_mask(ann / "00009.png", np.zeros((48, 64), np.uint8))
    with pytest.raises(ValueError, match="without a frame"):
        DAVIS(davis_root, "2017/train.txt")
    os.remove(ann / "00009.png")
    Image.new("RGB", (32, 48)).save(davis_root / "JPEGImages" / "480p" / "synth00001" / "00004.jpg")
    seq = DAVIS(davis_root, "2017/train.txt")["synth00001"]  # lazy: found on access
    with pytest.raises(ValueError, match="size 32x48 differs"):
        seq.frame(4)
    shutil.rmtree(davis_root / "JPEGImages")
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        DAVIS(davis_root, "2017/train.txt")


def test_davis_first_frame_only_is_accepted(davis_root):
    ann = davis_root / "Annotations" / "480p" / "synth00001"
    for name in os.listdir(ann):
        if name != "00000.png":
            os.remove(ann / name)
    seq = DAVIS(davis_root, "2017/train.txt")["synth00001"]
    assert seq.annotated == [0] and seq.mask(3) is None and seq.mask(0) is not None


# ----------------------------------------------------------------------------- YouTube-VOS folders


def make_youtube(root, with_meta):
    """One video, 6 frames; object 2 appears in frame 3; frames 0 and 3 annotated (sparse)."""
    frames, masks = synthetic_video(5, SMALL.replace(objects=(2, 2), p_leave=0.0))
    video = "abc123"
    for t, f in enumerate(frames):
        (root / "JPEGImages" / video).mkdir(parents=True, exist_ok=True)
        Image.fromarray(f).save(root / "JPEGImages" / video / f"{t * 5:05d}.jpg")
    save_mask(root / "Annotations" / video / "00000.png", np.where(masks[0] == 2, 0, masks[0]))
    save_mask(root / "Annotations" / video / "00015.png", masks[3])
    if with_meta:
        meta = {"videos": {video: {"objects": {"1": {"category": "a", "frames": ["00000", "00015"]},
                                               "2": {"category": "b", "frames": ["00015"]}}}}}
        (root / "meta.json").write_text(json.dumps(meta))
    return video


@pytest.mark.parametrize("with_meta", [False, True])
def test_youtube_sparse_annotations(tmp_path, with_meta):
    video = make_youtube(tmp_path, with_meta)
    ds = YouTubeVOS(tmp_path)
    seq = ds[video]
    assert len(ds) == 1 and len(seq) == 6
    assert seq.annotated == [0, 3]
    assert seq.mask(1) is None and seq.mask(3).shape == (48, 64)
    assert seq.objects == {1: 0, 2: 3}


def test_youtube_errors(tmp_path):
    (tmp_path / "train" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="pass one split folder"):
        YouTubeVOS(tmp_path)
    (tmp_path / "x" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="annotations folder"):
        YouTubeVOS(tmp_path / "x")


# ----------------------------------------------------------------------------- augmentations


def test_warp_identity_and_flip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (10, 14))
    same = warp(image, labels, affine((10, 14), (10, 14)), (10, 14))
    np.testing.assert_array_equal(same[0], image)
    np.testing.assert_array_equal(same[1], labels)
    flipped = warp(image, labels, affine((10, 14), (10, 14), flip=True), (10, 14))
    np.testing.assert_array_equal(flipped[0], image[:, ::-1])
    np.testing.assert_array_equal(flipped[1], labels[:, ::-1])


def test_hide_and_seek_hides_whole_grid_cells():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    labels = np.ones((40, 56), np.int64)
    img, lab = hide_and_seek(image, labels, 0.5, rng, patch=16)
    cells = [lab[y : y + 16, x : x + 16] for y in range(0, 40, 16) for x in range(0, 56, 16)]
    assert all(c.min() == c.max() for c in cells)  # each cell wholly hidden or wholly kept
    assert 0 < sum(c[0, 0] == 0 for c in cells) < len(cells)
    kept = lab == 1
    np.testing.assert_array_equal(img[kept], image[kept])
    assert len(np.unique(img[~kept].reshape(-1, 3), axis=0)) == 1  # one fill colour
    assert hide_and_seek(image, labels, 0.0, rng)[1] is labels
    assert (hide_and_seek(image, labels, 1.0, rng)[1] == 0).all()
    with pytest.raises(ValueError, match="p"):
        hide_and_seek(image, labels, 1.5, rng)


# ----------------------------------------------------------------------------- clip samplers


def check_clip(clip, size, max_objects=3):
    t = clip["frames"].shape[0]
    assert clip["frames"].shape == (t, 3, size, size) and clip["frames"].dtype == torch.float32
    assert 0 <= clip["frames"].min() and clip["frames"].max() <= 1
    assert clip["labels"].shape == (t, size, size) and clip["labels"].dtype == torch.int64
    assert clip["masks"].shape == (t, max_objects + 1, size, size)
    k = int(clip["num_objects"])
    assert 1 <= k <= max_objects
    assert int(clip["labels"].max()) <= k
    torch.testing.assert_close(clip["masks"].argmax(1), clip["labels"])
    assert (clip["masks"].sum(1) == 1).all()
    assert set(torch.unique(clip["labels"][0]).tolist()) == set(range(k + 1))  # all in frame 0


def test_video_clips_on_synthetic_videos():
    videos = SyntheticVideos(range(4), SMALL.replace(num_frames=20, objects=(1, 3)))
    ds = VideoClips(videos, size=32, max_skip=0, samples_per_epoch=8, seed=3)
    assert len(ds) == 8
    for i in range(4):
        clip = ds[i]
        check_clip(clip, 32)
        ids = clip["frame_ids"].tolist()
        assert np.diff(ids).tolist() == [1, 1]  # max_skip 0: neighbours
        assert clip["name"] == f"synth{i:05d}"
    ds.max_skip = 5
    gaps = np.concatenate([np.diff(ds[i]["frame_ids"].numpy()) for i in range(8)])
    assert gaps.min() >= 1 and gaps.max() <= 6 and gaps.max() > 1
    torch.testing.assert_close(ds[2]["frames"], ds[2]["frames"])  # deterministic by index
    again = ds[2]
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["frames"], again["frames"])  # a new epoch, new clips
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["frames"].shape == (2, 3, 3, 32, 32) and batch["num_objects"].shape == (2,)


def _hidden_then_back():
    """10 frames of 8x8: object 1 in full on 0-2, a quarter of it on 3-6, in full again on 7-9;
    object 2 always in full."""
    masks = np.zeros((10, 8, 8), np.int64)
    masks[:, :4, :4] = 1
    masks[3:7, :4, :4] = 0
    masks[3:7, :2, :2] = 1  # 4 of 16 pixels left: hidden
    masks[:, 5:, 5:] = 2
    return masks


def test_occlusion_frame_ids_span_a_whole_occlusion():
    masks = _hidden_then_back()
    for seed in range(20):
        for t in (3, 5, 8):
            positions, label = occlusion_frame_ids(masks, t, np.random.default_rng(seed), max_gap=2)
            assert label == 1 and len(positions) == t and positions == sorted(set(positions))
            first, *rest = positions
            assert first in (1, 2)  # in full, at most max_gap before the spell
            assert 7 in rest  # the first frame it is back
            hidden = [p for p in rest if 3 <= p <= 6]
            assert 1 <= len(hidden) <= t - 2 and len(hidden) == t - 2 - sum(p > 7 for p in rest)
            assert not hidden or max(hidden) < 7
    never_hidden = masks.copy()
    never_hidden[never_hidden == 1] = 0
    never_hidden[:, :4, :4] = 1
    assert occlusion_frame_ids(never_hidden, 5, np.random.default_rng(0)) is None
    gone_for_good = masks[:7]  # hidden to the end: nothing to find again
    assert occlusion_frame_ids(gone_for_good, 5, np.random.default_rng(0)) is None


def test_video_clips_around_occlusions():
    videos = SyntheticVideos(range(12), SMALL.replace(num_frames=20, objects=(1, 3), occluders=(1, 1)))
    plain = VideoClips(videos, size=48, num_frames=5, max_skip=1, samples_per_epoch=12, seed=3)
    occl = VideoClips(videos, size=48, num_frames=5, max_skip=1, samples_per_epoch=12, seed=3, occlusions=1.0)
    around = 0
    for i in range(12):
        clip = occl[i]
        check_clip(clip, 48)
        ids = clip["frame_ids"].tolist()
        assert ids == sorted(set(ids))
        masks = np.stack([videos[i].mask(p) for p in range(20)])
        picked = occlusion_frame_ids(masks, 5, np.random.default_rng(0), max_gap=2)
        if picked is None:  # no occlusion in this video: an ordinary clip
            continue
        around += 1
        # some object of the clip is hidden on a frame of it and in full on a later one
        area = lambda p, k: int((masks[p] == k).sum())
        labels = [k for k in np.unique(masks) if 0 < k < 255]
        assert any(any(area(a, k) < 0.5 * max(area(p, k) for p in range(20)) <= area(b, k)
                       for a in ids for b in ids if b > a) for k in labels)
    assert around >= 3
    torch.testing.assert_close(plain[0]["frames"], VideoClips(
        videos, size=48, num_frames=5, max_skip=1, samples_per_epoch=12, seed=3, occlusions=0.0)[0]["frames"])
    with pytest.raises(ValueError, match="occlusions"):
        VideoClips(videos, size=48, occlusions=1.5)


@pytest.mark.parametrize("occlusions", [0.0, 1.0])
def test_video_clips_on_davis(davis_root, occlusions):
    ds = VideoClips(DAVIS(davis_root, "2017/train.txt"), size=24, max_skip=25, max_objects=2, occlusions=occlusions)
    for i in range(len(ds)):
        clip = ds[i]
        check_clip(clip, 24, max_objects=2)
        ids = clip["frame_ids"].tolist()
        assert ids == sorted(ids) and ids[-1] < 6


def test_image_clips_pretraining():
    images = SyntheticImages(range(3), SMALL.replace(objects=(2, 3)))
    image, labels = images[0]
    assert image.shape == (48, 64, 3) and labels.dtype == np.int64
    ds = ImageClips(images, size=32, seed=1)
    clip = ds[1]
    check_clip(clip, 32)
    assert not torch.equal(clip["frames"][0], clip["frames"][1])  # each frame its own warp
    ds.p_hide = 1.0  # everything hidden: no object can be picked
    hidden = ds[1]
    assert int(hidden["num_objects"]) == 0 and (hidden["labels"] == 0).all()
