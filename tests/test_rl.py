"""The masking defense's parts: actions, cached judging, the batched environment, the policy
artifact and the dataset transform (the reward table: ``test_reward.py``)."""

import json

import numpy as np
import pytest
from PIL import Image

from srd_hf.rl import MASK_COLOUR, MaskActionSpace, SRDPolicy, SRDPolicyConfig, mask_reward
from srd_hf.rl.judge import CaptionJudge


# ----------------------------------------------------------------------------- actions
def test_action_space_geometry_and_presets():
    space = MaskActionSpace(image_size=64)
    assert space.n == 400 and space.side_pixels == (6, 11, 17, 23)
    assert MaskActionSpace.from_preset("authors_code", 224).n == 500
    # squares are centred on grid cells (6.4 px at 64 px) and clipped at the border
    assert space.box(0) == (0, 0, 6, 6)
    assert space.box(155) == (30, 30, 41, 41)  # size 11 px on cell (5, 5), centre 35.2
    assert space.box(399) == (49, 49, 64, 64)  # 23 px centred at 60.8, clipped
    for a in range(space.n):
        x0, y0, x1, y1 = space.box(a)
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    size, row, col = space.decode(2 * 100 + 3 * 10 + 7)
    assert (size, row, col) == (2, 3, 7)
    with pytest.raises(ValueError, match="outside"):
        space.box(400)
    with pytest.raises(ValueError, match="do not fit"):
        MaskActionSpace(image_size=64, mask_sizes=(20, 300))  # sizes scale with the image: only > 224 px overflows


def test_masks_land_where_the_action_says_and_accumulate():
    space = MaskActionSpace(image_size=64)
    pixels = np.full((64, 64, 3), 50, dtype=np.uint8)
    once = space.apply(pixels, [0])
    assert (once[0:6, 0:6] == MASK_COLOUR).all() and (once[6:, :] == 50).all() and (once[:, 6:] == 50).all()
    twice = space.apply(once, [399])
    assert (twice[0:6, 0:6] == MASK_COLOUR).all() and (twice[49:, 49:] == MASK_COLOUR).all()
    red = (twice == MASK_COLOUR).all(axis=2).sum()
    assert red == 6 * 6 + 15 * 15
    assert (pixels == 50).all()  # the input is never modified
    # a non-square image: the mask scales with the shorter side and stays inside
    x0, y0, x1, y1 = space.box(155, 128, 64)
    assert x1 - x0 == y1 - y0 == 11 and (x0 + x1) / 2 == pytest.approx(5.5 * 12.8, abs=1)


# ----------------------------------------------------------------------------- judge
def test_local_mean_fill_paints_each_mask_in_the_mean_of_what_it_covers(tmp_path):
    space = MaskActionSpace(image_size=64, fill="local_mean")
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :3] = (200, 100, 0)  # the first mask (0..6 x 0..6) covers half coloured, half black
    masked = space.apply(pixels, [0])
    assert (masked[0:6, 0:6] == (100, 50, 0)).all()
    assert (masked[6:] == pixels[6:]).all() and (masked[:, 6:] == pixels[:, 6:]).all() and (pixels[0, 0] == (200, 100, 0)).all()
    assert not (masked == MASK_COLOUR).all(-1).any()  # nothing red
    checker = np.indices((64, 64)).sum(0) % 2 * 255  # a checkerboard trigger under the mask is erased, not kept
    flat = space.apply(np.repeat(checker[..., None], 3, -1).astype(np.uint8), [0])[0:6, 0:6]
    assert len(np.unique(flat)) == 1
    with pytest.raises(ValueError, match="fill"):
        MaskActionSpace(image_size=64, fill="blue")
    # a policy masks as it was trained; its config says so, round-trips, and a config written
    # before the option (no mask_fill) means red
    policy = SRDPolicy(SRDPolicyConfig(mask_fill="local_mean"))
    policy.save_pretrained(tmp_path / "p")
    loaded = SRDPolicy.from_pretrained(str(tmp_path / "p"))
    assert loaded.config.mask_fill == "local_mean" and loaded.space.fill == "local_mean"
    image = Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8))
    out, _ = loaded.mask_images([image])
    assert (np.asarray(out[0]) == 90).all()  # a uniform image stays itself under local-mean masks
    with pytest.raises(ValueError, match="fill red"):
        loaded.check_compatible(MaskActionSpace(image_size=64))
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    config.pop("mask_fill")
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    assert SRDPolicy.from_pretrained(str(tmp_path / "p")).space.fill == "red"
    with pytest.raises(ValueError, match="mask_fill"):
        SRDPolicyConfig(mask_fill="noise")


def test_cached_judging_equals_the_sfs_scorer(sfs_scorer):
    refs = ["a red circle in the top left corner", "a blue square", "a green ring on the right"]
    judge = CaptionJudge(sfs_scorer, refs)
    captions = ["a red circle in the corner", "a banana", "a green ring on the right"]
    sc, lf = judge.judge([0, 1, 2], captions)
    direct = sfs_scorer.score(captions, refs, return_per_sample=True)
    np.testing.assert_allclose(sc, direct["semantic_consistency_per_sample"], atol=1e-5)
    np.testing.assert_allclose(lf, direct["linguistic_fluency_per_sample"], rtol=1e-4)
    size = judge.cache_size
    sc2, lf2 = judge.judge([2, 1, 0], captions[::-1])  # nothing new to compute
    assert judge.cache_size == size
    np.testing.assert_allclose(sc2, sc[::-1])
    # empty generations are judged 0 and counted
    sc3, lf3 = judge.judge([0], [""])
    assert sc3[0] == 0 and lf3[0] == 0 and judge.n_empty == 1
    # a perplexity that is not finite (e.g. an overflow) gives LF 0, a defined reward, and is counted
    judge._perplexity["a banana"] = float("nan")
    sc4, lf4 = judge.judge([1], ["a banana"])
    assert lf4[0] == 0 and judge.n_nonfinite == 1
    assert mask_reward(sc4, lf4, sc4, [0.5])[0] == -1.0  # same SC, fluency lost
    with pytest.raises(ValueError, match="empty reference"):
        CaptionJudge(sfs_scorer, ["fine", "  "])


# ----------------------------------------------------------------------------- policy artifact
def test_policy_round_trip_gives_the_same_actions(tmp_path):
    policy = SRDPolicy(SRDPolicyConfig(seed=3, training={"note": "test"}))
    policy.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = SRDPolicy.from_pretrained(str(tmp_path / "p"))
    obs = np.random.default_rng(0).integers(0, 256, (8, 3, 64, 64), dtype=np.uint8)
    np.testing.assert_array_equal(policy.act(obs), loaded.act(obs))
    assert loaded.config.training == {"note": "test"}
    assert "400 actions" in (tmp_path / "p" / "README.md").read_text()


def test_mismatched_policy_is_refused(tmp_path):
    SRDPolicy(SRDPolicyConfig()).save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    config["mask_sizes"] = [20, 40, 60]  # config no longer matches the saved score map (4 sizes)
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match"):
        SRDPolicy.from_pretrained(str(tmp_path / "p"))
    policy = SRDPolicy(SRDPolicyConfig())
    with pytest.raises(ValueError, match="does not match the environment"):
        policy.check_compatible(MaskActionSpace(image_size=64, grid=5))
    with pytest.raises(ValueError, match="observations"):
        policy.check_compatible(MaskActionSpace(image_size=64), obs_size=32)
    (tmp_path / "p" / "config.json").write_text(json.dumps({"algorithm": "dqn", "evil": "x"}))
    with pytest.raises(ValueError, match="not an SRD policy config"):
        SRDPolicy.from_pretrained(str(tmp_path / "p"))


def test_linear_network_round_trip(tmp_path):
    policy = SRDPolicy(SRDPolicyConfig(network="linear", features_dim=32))
    policy.save_pretrained(tmp_path / "p")
    loaded = SRDPolicy.from_pretrained(str(tmp_path / "p"))
    obs = np.random.default_rng(1).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    np.testing.assert_array_equal(policy.act(obs), loaded.act(obs))
    with pytest.raises(ValueError, match="network"):
        SRDPolicyConfig(network="transformer")


def test_spatial_scores_follow_the_pattern():
    """The score map is translation-aware: the same patch at two places moves the best cell."""
    import torch

    policy = SRDPolicy(SRDPolicyConfig(seed=0))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0, 0.3)
    base = np.zeros((1, 3, 64, 64), dtype=np.uint8)
    a, b = base.copy(), base.copy()
    a[:, :, 4:12, 4:12] = 255
    b[:, :, 50:58, 50:58] = 255
    sa, sb = (policy(torch.as_tensor(x))[0].reshape(4, 10, 10).sum(0) for x in (a, b))
    diff = (sa - sb).detach().numpy()
    assert diff[:3, :3].mean() > diff[-3:, -3:].mean()


def test_policy_never_unpickles(tmp_path):
    import torch

    folder = tmp_path / "p"
    SRDPolicy(SRDPolicyConfig()).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SRDPolicy.from_pretrained(str(folder))


# ----------------------------------------------------------------------------- environment
def _env(tiny_flamingo, small_world_data, sfs_scorer, n=6, **kw):
    from srd_hf.rl.env import MaskingEnvConfig, MaskingVecEnv

    rows = small_world_data["train"].select(range(n))
    images = [img.convert("RGB") for img in rows["image"]]
    refs = [c[0] for c in rows["captions"]]
    config = MaskingEnvConfig(num_envs=3, max_masks=2, obs_size=32, max_new_tokens=6, **kw)
    return MaskingVecEnv(tiny_flamingo, images, refs, config, scorer=sfs_scorer), images


def test_env_steps_batched_and_accumulates_masks(tiny_flamingo, small_world_data, sfs_scorer):
    env, images = _env(tiny_flamingo, small_world_data, sfs_scorer, stop_at_best=False)
    obs = env.reset()
    assert obs.shape == (3, 3, 32, 32) and obs.dtype == np.uint8
    first = [int(i) for i in env.image_index]
    obs, rewards, dones, infos = env.step(np.array([0, 1, 2]))
    assert not dones.any() and rewards.shape == (3,)
    assert set(np.unique(rewards)) <= {-2.0, -1.0, 0.0, 1.0, 2.0, 3.0}
    # mask 0 of the 32 px image: a 6 px red square in the top-left corner (paper 20 px scaled)
    side = env.space.side_pixels[0]
    assert (env.current[0][:side, :side] == MASK_COLOUR).all()
    assert env.masks[0] == [0]
    obs, rewards, dones, infos = env.step(np.array([399, 399, 399]))
    assert dones.all()  # max_masks = 2
    for env_id, info in enumerate(infos):
        assert info["episode"]["masks"][-1] == 399 and info["episode"]["l"] == 2
        term = info["terminal_observation"]
        assert (term.transpose(1, 2, 0)[-1, -1] == MASK_COLOUR).all()  # both masks in the terminal state
        assert info["image_index"] == first[env_id]
    # auto-reset: fresh, unmasked images
    assert all(m == [] for m in env.masks)
    assert not (obs.transpose(0, 2, 3, 1)[:, -1, -1] == MASK_COLOUR).all(axis=-1).all()


def test_env_references_are_computed_once(tiny_flamingo, small_world_data, sfs_scorer):
    env, images = _env(tiny_flamingo, small_world_data, sfs_scorer)
    again = tiny_flamingo.generate_captions(images, max_new_tokens=6)
    assert env.unmasked_captions == again
    sc, lf = env.judge.judge(range(len(again)), again)
    np.testing.assert_allclose(env.sc0, sc)
    np.testing.assert_allclose(env.lf0, lf)
    np.testing.assert_allclose(env.sampling_weights.sum(), 1.0)


def test_env_bad_input(tiny_flamingo, small_world_data, sfs_scorer):
    from srd_hf.rl.env import MaskingEnvConfig, MaskingVecEnv

    config = MaskingEnvConfig(num_envs=1, max_new_tokens=4)
    big = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="smaller than the largest mask"):
        MaskingVecEnv(tiny_flamingo, [big, Image.new("RGB", (4, 4))], ["a", "b"], config, scorer=sfs_scorer)
    with pytest.raises(ValueError, match="reference captions"):
        MaskingVecEnv(tiny_flamingo, [big], ["a", "b"], config, scorer=sfs_scorer)
    with pytest.raises(TypeError, match="expected a PIL image"):
        MaskingVecEnv(tiny_flamingo, ["not an image"], ["a"], config, scorer=sfs_scorer)
    # grayscale images are converted to RGB (the mask is red)
    env = MaskingVecEnv(tiny_flamingo, [Image.new("L", (32, 32), 128)], ["a grey image"], config, scorer=sfs_scorer)
    assert env.pixels[0].shape == (32, 32, 3)
    with pytest.raises(ValueError, match="episode_sampling"):
        MaskingEnvConfig(episode_sampling="greedy")


# ----------------------------------------------------------------------------- masker
def test_masker_in_dataset_map(small_world_data, tmp_path):
    from srd_hf import SRDMasker

    SRDPolicy(SRDPolicyConfig(image_size=32, obs_size=32)).save_pretrained(tmp_path / "p")
    masker = SRDMasker.from_pretrained(tmp_path / "p")
    rows = small_world_data["train"].select(range(8))
    # two rows of the same image are masked independently (per sample, not per image id)
    rows = rows.add_column("row", list(range(8)))
    masked = rows.map(masker, batched=True, batch_size=3)
    assert masked.num_rows == 8 and "srd_masks" in masked.column_names
    for before, after, boxes in zip(rows["image"], masked["image"], masked["srd_masks"]):
        assert len(boxes) == 1
        x0, y0, x1, y1 = boxes[0]
        a = np.asarray(after.convert("RGB"))
        assert (a[y0:y1, x0:x1] == MASK_COLOUR).all()
        outside = np.ones(a.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert (a[outside] == np.asarray(before.convert("RGB"))[outside]).all()
    # single-row map and inference-time use
    one = rows.select(range(2)).map(masker)
    assert len(one["srd_masks"][0]) == 1
    images, boxes = masker.mask_images([Image.new("L", (32, 32))])
    assert images[0].mode == "RGB" and len(boxes[0]) == 1


def test_masker_bad_input(small_world_data):
    from srd_hf import SRDMasker

    masker = SRDMasker(SRDPolicy(SRDPolicyConfig(image_size=32, obs_size=32)))
    with pytest.raises(KeyError, match="no image column 'image'"):
        masker({"picture": [Image.new("RGB", (32, 32))]})
    tiny = [Image.new("RGB", (4, 4)), Image.new("RGB", (32, 32))]
    with pytest.raises(ValueError, match="smaller than the policy's largest mask"):
        masker({"image": tiny})
    skipping = SRDMasker(masker.policy, on_small_image="skip")
    out = skipping({"image": tiny})
    assert out["srd_masks"][0] is None and len(out["srd_masks"][1]) == 1 and skipping.n_skipped == 1
    with pytest.raises(TypeError, match="not a PIL image"):
        masker({"image": ["path.png"]})


@pytest.mark.parametrize("algorithm", ["dqn", "ppo", "sac", "random"])
def test_every_algorithm_trains_and_exports(algorithm, tiny_flamingo, small_world_data, sfs_scorer, tmp_path):
    from srd_hf.rl.training import PolicyTrainingConfig, train_masking_policy

    env, images = _env(tiny_flamingo, small_world_data, sfs_scorer)
    cfg = PolicyTrainingConfig(algorithm=algorithm, total_timesteps=24, learning_starts=6, batch_size=4, buffer_size=50,
                               n_steps=4, target_update_interval=6, save_steps=12)
    policy, summary = train_masking_policy(env, cfg, output_dir=tmp_path)
    assert policy.config.algorithm == algorithm and policy.space.n == env.space.n
    if algorithm != "random":
        assert summary["timesteps"] >= 24
    _, actions = policy.mask_images(images[:2])
    assert all(0 <= a[0] < env.space.n for a in actions)
    policy.save_pretrained(tmp_path / "saved")
    assert SRDPolicy.from_pretrained(str(tmp_path / "saved")).config.algorithm == algorithm


def test_dqn_resumes_from_its_checkpoint(tiny_flamingo, small_world_data, sfs_scorer, tmp_path):
    from srd_hf.rl.training import PolicyTrainingConfig, train_masking_policy

    env, _ = _env(tiny_flamingo, small_world_data, sfs_scorer)
    cfg = PolicyTrainingConfig(total_timesteps=18, learning_starts=6, batch_size=4, buffer_size=50, save_steps=6)
    train_masking_policy(env, cfg, output_dir=tmp_path)
    counters = json.loads((tmp_path / "resume" / "counters.json").read_text())
    assert counters["num_timesteps"] >= 12
    # a longer run continues from the checkpoint instead of starting over
    cfg.total_timesteps = counters["num_timesteps"] + 6
    _, summary = train_masking_policy(env, cfg, output_dir=tmp_path)
    assert summary["timesteps"] == cfg.total_timesteps and summary["episodes"] <= 3


def test_sac_resumes_with_its_buffer_and_networks(tiny_flamingo, small_world_data, sfs_scorer, tmp_path):
    import torch
    from safetensors.torch import load_file

    from srd_hf.rl.training import PolicyTrainingConfig, train_masking_policy

    env, _ = _env(tiny_flamingo, small_world_data, sfs_scorer)
    cfg = PolicyTrainingConfig(algorithm="sac", total_timesteps=12, learning_starts=4, batch_size=4, buffer_size=6, save_steps=4)
    first, _ = train_masking_policy(env, cfg, output_dir=tmp_path)
    resume = tmp_path / "resume"
    counters = json.loads((resume / "counters.json").read_text())
    assert counters["num_timesteps"] == 12 and counters["buffer_len"] == 6  # buffer full: 12 seen, 6 kept
    saved = load_file(str(resume / "loss.safetensors"))
    assert any("target" in k for k in saved) and any("alpha" in k for k in saved)
    # the checkpoint holds the last trained actor: resuming at the budget does no step and returns it
    again, summary = train_masking_policy(env, cfg, output_dir=tmp_path)
    assert summary["timesteps"] == 12
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # a longer budget continues from 12 transitions with the restored buffer
    cfg.total_timesteps = 18
    _, summary = train_masking_policy(env, cfg, output_dir=tmp_path)
    assert summary["timesteps"] == 18 and summary["episodes"] <= 2 * env.num_envs  # two vector steps, not six
    assert json.loads((resume / "counters.json").read_text())["num_timesteps"] == 18
