"""Encoders, policy distributions and the ActorCritic network."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from agents.base import ModelOptions
from agents.networks import (
    ActorCritic,
    Categorical,
    DiagGaussian,
    ImpalaCNN,
    MLPEncoder,
    NatureCNN,
    make_encoder,
)
from rlmem.errors import ConfigError

VECTOR = gym.spaces.Box(-1, 1, (5,), np.float32)
FRAMES = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
DISCRETE = gym.spaces.Discrete(3)
BOX = gym.spaces.Box(-2.0, 1.0, (2,), np.float32)
GRU = {"name": "gru", "hidden_size": 8}


def test_auto_encoder_picks_cnn_for_uint8_frames_and_mlp_otherwise():
    assert isinstance(make_encoder("auto", FRAMES, 64, 1)[1], NatureCNN)
    assert isinstance(make_encoder("auto", VECTOR, 64, 1)[1], MLPEncoder)
    # A float image is not a uint8 frame: auto treats it as a vector.
    float_frames = gym.spaces.Box(0, 1, (3, 8, 8), np.float32)
    assert isinstance(make_encoder("auto", float_frames, 64, 1)[1], MLPEncoder)


def test_nature_cnn_shapes_and_frames_scaled_on_device():
    encoder = make_encoder("nature_cnn", FRAMES, 512, 1)
    frames = torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8)
    assert encoder(frames).shape == (6, 512) and encoder.output_size == 512
    # Conv stack of Mnih et al. (2015): 32x8x8/4, 64x4x4/2, 64x3x3/1 -> 64·7·7 features.
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (8, 8), (4, 4)), (64, (4, 4), (2, 2)), (64, (3, 3), (1, 1))]
    assert encoder[1].head[0].in_features == 64 * 7 * 7
    # uint8 frames are divided by 255 before the first layer.
    identity = make_encoder("identity", FRAMES, 8, 0)
    torch.testing.assert_close(identity(frames), frames.flatten(1).float() / 255)


def test_impala_cnn_structure():
    space = gym.spaces.Box(0, 255, (3, 64, 64), np.uint8)
    encoder = make_encoder("impala", space, 256, 1)
    impala = encoder[1]
    assert isinstance(impala, ImpalaCNN)
    assert [stage.conv.out_channels for stage in impala.stem[:3]] == [16, 32, 32]
    # Each stage: conv, max-pool 3x3/2 and two residual blocks; 64 -> 32 -> 16 -> 8 pixels.
    assert all(isinstance(stage.pool, nn.MaxPool2d) and stage.pool.stride == 2 for stage in impala.stem[:3])
    assert impala.head[0].in_features == 32 * 8 * 8
    assert encoder(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 256)
    # A grey 2-D frame gets its channel axis.
    grey = make_encoder("impala", gym.spaces.Box(0, 255, (32, 32), np.uint8), 16, 1)
    assert grey(torch.zeros(5, 32, 32, dtype=torch.uint8)).shape == (5, 16)


@pytest.mark.parametrize("name", ["nature_cnn", "impala"])
def test_conv_encoders_give_the_values_and_gradients_of_the_plain_layout(name):
    torch.manual_seed(0)
    space = gym.spaces.Box(0, 255, (3, 64, 64), np.uint8)
    encoder = make_encoder(name, space, 32, 1)
    conv = encoder[1]
    weights = [p for p in conv.parameters() if p.dim() == 4]
    assert conv.channels_last == (name == "impala")  # the layout each ran faster in on a CPU
    assert all(w.is_contiguous(memory_format=torch.channels_last) == conv.channels_last for w in weights)
    # The same network in the plain layout: contiguous weights, stem and head called directly.
    plain = make_encoder(name, space, 32, 1)
    plain.load_state_dict(encoder.state_dict())
    for p in plain.parameters():
        p.data = p.data.contiguous()
    frames = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    for inputs in (frames, frames.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):  # either input layout
        out = encoder(inputs)
        expected = plain[1].head(plain[1].stem(plain[0](inputs).contiguous()))
        torch.testing.assert_close(out, expected)
        grads = torch.autograd.grad(out.square().sum(), list(encoder.parameters()))
        expected_grads = torch.autograd.grad(expected.square().sum(), list(plain.parameters()))
        for g, e in zip(grads, expected_grads, strict=True):
            # float32 sums over 10^4 terms in another order: agreement to 1e-4 relative
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_mlp_encoder_layers_and_discrete_one_hot():
    encoder = make_encoder("mlp", VECTOR, 32, 2)
    assert sum(isinstance(m, nn.Linear) for m in encoder.modules()) == 2 and encoder.output_size == 32
    assert make_encoder("mlp", VECTOR, 32, 0).output_size == 5
    onehot = make_encoder("identity", gym.spaces.Discrete(4, start=1), 8, 0)
    torch.testing.assert_close(onehot(torch.tensor([1, 4])), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))


def test_encoder_config_errors():
    with pytest.raises(ConfigError, match=r"nature_cnn.*valid choices"):
        make_encoder("nature_cnn", VECTOR, 32, 1)
    with pytest.raises(ConfigError, match="observation space"):
        make_encoder("mlp", gym.spaces.Dict({"a": VECTOR}), 32, 1)
    with pytest.raises(ConfigError, match="encoder"):
        make_encoder("resnet", VECTOR, 32, 1)


def test_categorical_matches_torch_and_samples_reproducibly():
    logits = torch.randn(3, 4, 5)
    ours, ref = Categorical(logits), torch.distributions.Categorical(logits=logits)
    actions = ref.sample()
    torch.testing.assert_close(ours.log_prob(actions), ref.log_prob(actions))
    torch.testing.assert_close(ours.entropy(), ref.entropy())
    assert torch.equal(ours.mode(), logits.argmax(-1))
    a = ours.sample(torch.Generator().manual_seed(3))
    b = ours.sample(torch.Generator().manual_seed(3))
    assert a.shape == (3, 4) and torch.equal(a, b)
    # Sampling frequencies follow the probabilities.
    probs = torch.tensor([0.1, 0.6, 0.3])
    samples = Categorical(probs.log().expand(20000, 3)).sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.bincount(samples, minlength=3).float() / 20000, probs, atol=0.02, rtol=0)


def test_diag_gaussian_matches_torch():
    mean, log_std = torch.randn(3, 4, 2), torch.tensor([0.3, -0.5])
    ours = DiagGaussian(mean, log_std)
    ref = torch.distributions.Normal(mean, log_std.exp())
    actions = ref.sample()
    torch.testing.assert_close(ours.log_prob(actions), ref.log_prob(actions).sum(-1))
    torch.testing.assert_close(ours.entropy(), ref.entropy().sum(-1))
    samples = DiagGaussian(torch.zeros(20000, 2), log_std).sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples.std(0), log_std.exp(), atol=0.02, rtol=0)


@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "box"])
@pytest.mark.parametrize("core", ["gru", "lstm", "none"])
def test_actor_critic_window_shapes(action_space, core):
    model = ModelOptions(encoder_size=16, prev_action=True, prev_reward=True)
    net = ActorCritic(VECTOR, action_space, {"name": core, "hidden_size": 8}, model)
    T, B = 4, 3
    obs, reset = torch.randn(T, B, 5), torch.zeros(T, B, dtype=torch.bool)
    prev_action = torch.zeros(T, B, dtype=torch.long) if net.discrete else torch.zeros(T, B, 2)
    out = net(obs, net.initial_state(B), reset, prev_action, torch.zeros(T, B))
    assert out.value.shape == (T, B)
    assert out.dist.sample().shape == (T, B, *net.action_shape)
    assert out.dist.log_prob(out.dist.sample()).shape == (T, B)
    # Core input: encoder features + previous action (one-hot for discrete) + previous reward.
    assert net.core.input_size == 16 + (3 if net.discrete else 2) + 1


def test_previous_action_and_reward_zeroed_at_episode_starts_and_reward_clipped():
    model = ModelOptions(encoder="identity", prev_action=True, prev_reward=True)
    net = ActorCritic(VECTOR, DISCRETE, GRU, model, reward_clip=1.0)
    obs = torch.zeros(2, 2, 5)
    reset = torch.tensor([[False, True], [True, False]])
    prev_action = torch.tensor([[2, 2], [1, 0]])
    prev_reward = torch.tensor([[5.0, 3.0], [-0.5, -4.0]])
    x = net.core_inputs(obs, reset, prev_action, prev_reward)
    torch.testing.assert_close(x[..., 5:8], torch.tensor([[[0.0, 0, 1], [0, 0, 0]], [[0, 0, 0], [1, 0, 0]]]))
    torch.testing.assert_close(x[..., 8], torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_env_action_clips_box_and_shifts_discrete_start():
    net = ActorCritic(VECTOR, BOX, GRU, ModelOptions())
    torch.testing.assert_close(net.env_action(torch.tensor([[-5.0, 0.5], [0.0, 7.0]])),
                               torch.tensor([[-2.0, 0.5], [0.0, 1.0]]))
    # The core sees the previous action as the env received it.
    with_prev = ActorCritic(VECTOR, BOX, GRU, ModelOptions(encoder="identity", prev_action=True))
    x = with_prev.core_inputs(torch.zeros(1, 1, 5), torch.zeros(1, 1, dtype=torch.bool),
                              torch.tensor([[[-5.0, 0.5]]]), None)
    torch.testing.assert_close(x[0, 0, 5:], torch.tensor([-2.0, 0.5]))
    shifted = ActorCritic(VECTOR, gym.spaces.Discrete(3, start=-1), GRU, ModelOptions())
    assert shifted.env_action(torch.tensor([0, 2])).tolist() == [-1, 1]


def test_orthogonal_init_of_heads():
    net = ActorCritic(VECTOR, DISCRETE, {"name": "gru", "hidden_size": 16}, ModelOptions())
    w = net.policy.logits.weight  # [3, 16]: orthonormal rows scaled by 0.01
    torch.testing.assert_close(w @ w.T, 1e-4 * torch.eye(3), atol=1e-8, rtol=0)
    assert torch.all(net.policy.logits.bias == 0) and torch.all(net.value.bias == 0)
    v = net.value.weight
    torch.testing.assert_close(v @ v.T, torch.ones(1, 1))


def test_unsupported_action_spaces_are_config_errors():
    with pytest.raises(ConfigError, match="prediction task"):
        ActorCritic(VECTOR, None, GRU, ModelOptions())
    with pytest.raises(ConfigError, match="valid choices: Discrete, 1-D float Box"):
        ActorCritic(VECTOR, gym.spaces.MultiDiscrete([2, 3]), GRU, ModelOptions())
