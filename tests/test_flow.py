import pytest
import torch

from selfforcing import flow


def test_shift_warp_of_the_self_forcing_list():
    got = flow.denoising_step_list([1000, 750, 500, 250], shift=5.0)
    torch.testing.assert_close(got, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0], dtype=torch.float64))
    # trailing zero dropped, identity when not warped, other shifts as in the reference table
    assert flow.denoising_step_list([1000, 750, 500, 250, 0], shift=5.0).tolist() == got.tolist()
    assert flow.denoising_step_list([1000, 750, 500, 250], shift=5.0, warp=False).tolist() == [1000, 750, 500, 250]
    torch.testing.assert_close(flow.shift_timesteps([1000, 750, 500, 250], 3.0),
                               torch.tensor([1000.0, 900.0, 750.0, 500.0], dtype=torch.float64))
    torch.testing.assert_close(flow.shift_timesteps([1000, 750, 500, 250], 8.0),
                               torch.tensor([1000.0, 960.0, 8000 / 9, 8000 / 11], dtype=torch.float64))


def test_shift_is_monotone_and_fixes_endpoints():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    w = flow.shift_sigma(s, 5.0)
    assert w[0] == 0 and w[-1] == 1 and bool((w[1:] > w[:-1]).all()) and bool((w >= s).all())
    torch.testing.assert_close(flow.shift_sigma(s, 1.0), s)


def test_noise_flow_x0_roundtrip():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 5, 6, generator=g)
    eps = torch.randn(2, 3, 4, 5, 6, generator=g)
    t = torch.tensor([[100.0, 500.0, 999.0], [1.0, 250.0, 1000.0]])
    xt = flow.add_noise(x0, eps, t)
    v = flow.flow_target(x0, eps)
    torch.testing.assert_close(flow.flow_to_x0(v, xt, t), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow.x0_to_flow(x0, xt, t), v, atol=1e-3, rtol=1e-4)
    # t = 0 is clean data, t = 1000 is pure noise
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.zeros(2)), x0)
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.full((2,), 1000.0)), eps)


def test_euler_step_follows_the_straight_path_exactly():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    v = flow.flow_target(x0, eps)
    x_800 = flow.add_noise(x0, eps, torch.full((4,), 800.0))
    x_300 = flow.euler_step(x_800, v, torch.full((4,), 800.0), torch.full((4,), 300.0))
    torch.testing.assert_close(x_300, flow.add_noise(x0, eps, torch.full((4,), 300.0)))


def test_training_grid_and_timestep_sampling():
    grid = flow.training_timestep_grid(1000, shift=5.0)
    assert grid.shape == (1000,) and grid[0] == 1000 and abs(float(grid[-1]) - 4.98) < 0.01
    g = torch.Generator().manual_seed(0)
    t_plain = flow.sample_timesteps((20000,), generator=g)
    t_shift = flow.sample_timesteps((20000,), shift=5.0, generator=torch.Generator().manual_seed(0))
    assert 0 <= float(t_plain.min()) and float(t_plain.max()) < 1000
    assert abs(float(t_plain.mean()) - 500) < 10  # uniform
    assert float(t_shift.mean()) > 700  # shift moves mass to high noise
    t_rng = flow.sample_timesteps((1000,), min_t=200, max_t=300, generator=g)
    assert 200 <= float(t_rng.min()) and float(t_rng.max()) < 300


def test_blockwise_timesteps_and_bad_input():
    t = flow.blockwise_timesteps(torch.tensor([[1.0, 2.0]]), [1, 3])
    assert t.tolist() == [[1.0, 2.0, 2.0, 2.0]]
    with pytest.raises(ValueError, match="per-block"):
        flow.blockwise_timesteps(torch.tensor([[1.0, 2.0]]), [3])
    with pytest.raises(ValueError, match="timestep of shape"):
        flow.add_noise(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="decreasing"):
        flow.denoising_step_list([250, 500])
    with pytest.raises(ValueError, match="sigma = 0"):
        flow.x0_to_flow(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1))


def test_logit_normal_timesteps_follow_sd3s_distribution():
    """sigma = sigmoid(m + s Phi^-1(u)): logit(sigma) of uniform draws is N(m, s^2); the median is sigmoid(m);
    the shift is applied after; 'uniform' is Wan's shifted sampling unchanged."""
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = flow.training_timesteps(u, distribution="logit_normal", mean=-0.5, std=0.8)
    logit = torch.logit(t.double() / 1000)
    assert abs(float(logit.mean()) + 0.5) < 0.01 and abs(float(logit.std()) - 0.8) < 0.01
    half = torch.tensor([0.5], dtype=torch.float64)
    assert float(flow.training_timesteps(half, distribution="logit_normal", mean=-0.5, std=0.8)) == \
        pytest.approx(1000 * torch.sigmoid(torch.tensor(-0.5)).item(), rel=1e-5)
    shifted = flow.training_timesteps(u[:100], distribution="logit_normal", shift=3.0)
    torch.testing.assert_close(shifted.double(), 1000 * flow.shift_sigma(
        flow.logit_normal_from_uniform(u[:100]), 3.0), rtol=1e-6, atol=1e-3)
    assert bool(((t > 0) & (t < 1000)).all())  # u = 0 and u -> 1 stay finite and inside (0, 1000)
    assert 0 < float(flow.training_timesteps(torch.zeros(1), distribution="logit_normal")) < 10
    torch.testing.assert_close(flow.training_timesteps(u[:50], shift=3.0), flow.timesteps_from_uniform(u[:50], shift=3.0))
    with pytest.raises(ValueError, match="unknown timestep distribution 'beta'"):
        flow.training_timesteps(u[:5], distribution="beta")
    with pytest.raises(ValueError, match="std must be > 0"):
        flow.logit_normal_from_uniform(u[:5], std=0.0)
