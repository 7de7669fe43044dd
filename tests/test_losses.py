"""Unit tests of the losses on toy inputs (acceptance f of the training issue)."""

import torch

from selfforcing import flow
from selfforcing.training import losses

G = torch.Generator().manual_seed(0)


def _t(*shape):
    return torch.randn(*shape, generator=G)


def test_dmd_gradient_is_the_normalised_score_difference():
    x = _t(2, 3, 4, 2, 2).requires_grad_()
    real, fake = _t(2, 3, 4, 2, 2), _t(2, 3, 4, 2, 2)
    loss, g = losses.dmd_generator_loss(x, real, fake)
    expected = (fake - real).double() / (x.detach() - real).double().abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(g, expected)
    loss.backward()
    torch.testing.assert_close(x.grad.double(), g / x.numel(), rtol=1e-5, atol=1e-9)  # dL/dx = g / N
    torch.testing.assert_close(loss.double(), 0.5 * g.square().mean(), rtol=1e-5, atol=0)


def test_dmd_step_moves_samples_towards_the_real_prediction():
    """With a perfect critic (fake = x), -g points from x to p_real: a small step reduces |x - p_real|."""
    x = _t(4, 2, 3, 4, 4)
    real = _t(4, 2, 3, 4, 4)
    g = losses.dmd_gradient(x, real, fake_x0=x)
    before = (x - real).abs().mean()
    after = (x - 0.1 * g.float() - real).abs().mean()
    assert after < before
    # per-sample normalisation: scaling one sample's error scales its normaliser, not its direction's size
    x2 = x.clone()
    x2[0] = real[0] + 10 * (x[0] - real[0])
    g2 = losses.dmd_gradient(x2, real, fake_x0=x2)
    torch.testing.assert_close(g2[0].abs().mean(), g[0].abs().mean())
    torch.testing.assert_close(g2[1:], g[1:])


def test_dmd_frame_mask_restricts_the_loss():
    x = _t(1, 4, 2, 2, 2).requires_grad_()
    real, fake = _t(1, 4, 2, 2, 2), _t(1, 4, 2, 2, 2)
    loss, _ = losses.dmd_generator_loss(x, real, fake, frame_mask=torch.tensor([[False, False, True, True]]))
    loss.backward()
    assert float(x.grad[:, :2].abs().sum()) == 0 and float(x.grad[:, 2:].abs().sum()) > 0


def test_sid_formula_and_alpha_one_simplification():
    x = _t(2, 2, 3, 2, 2)
    real, fake = _t(2, 2, 3, 2, 2), _t(2, 2, 3, 2, 2)
    n = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    for alpha in (0.5, 1.0, 1.2):
        got = losses.sid_generator_loss(x, real, fake, alpha=alpha)
        want = ((real - fake) * ((real - x) - alpha * (real - fake)) / n).mean()
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.sid_generator_loss(x, real, fake, 1.0),
                               ((real - fake) * (fake - x) / n).mean(), rtol=1e-5, atol=1e-6)
    # gradients flow through x and through both predictions; the normaliser is a constant
    xs, rs, fs = (v.clone().requires_grad_() for v in (x, real, fake))
    losses.sid_generator_loss(xs, rs, fs).backward()
    torch.testing.assert_close(xs.grad, (-(real - fake) / n / x.numel()), rtol=1e-4, atol=1e-7)
    assert fs.grad is not None and rs.grad is not None


def test_gan_losses_and_finite_difference_r1():
    real, fake = torch.tensor([3.0, 2.0]), torch.tensor([-3.0, -2.0])
    # a confident, correct discriminator has a small loss; the generator's loss is then large
    assert losses.gan_discriminator_loss(real, fake) < losses.gan_discriminator_loss(fake, real)
    assert losses.gan_generator_loss(fake) > losses.gan_generator_loss(real)
    # R1 by finite differences of a linear D(x) = w.x estimates E (w.eps)^2 = ||w||^2
    w = _t(16)
    x = _t(20000, 16)
    eps = torch.randn(20000, 16, generator=G)
    r1 = losses.r1_penalty(x @ w, (x + 1e-2 * eps) @ w, 1e-2)
    assert abs(float(r1) - float(w.square().sum())) / float(w.square().sum()) < 0.05


def test_flow_matching_and_ode_regression():
    x0, eps = _t(2, 3, 4, 2, 2), _t(2, 3, 4, 2, 2)
    v = flow.flow_target(x0, eps)
    assert float(losses.flow_matching_loss(v, x0, eps)) == 0.0
    wrong = v + 1.0
    assert abs(float(losses.flow_matching_loss(wrong, x0, eps)) - 1.0) < 1e-6
    mask = torch.tensor([[True, False, False]] * 2)
    bad_late = v.clone()
    bad_late[:, 1:] += 5
    assert float(losses.flow_matching_loss(bad_late, x0, eps, frame_mask=mask)) == 0.0
    assert float(losses.ode_regression_loss(x0, x0)) == 0.0
    assert abs(float(losses.ode_regression_loss(x0 + 2, x0)) - 4.0) < 1e-5
    torch.testing.assert_close(losses.classifier_free_guidance(torch.ones(2), torch.zeros(2), 4.0), torch.full((2,), 4.0))


def test_critic_loss_is_flow_matching_on_detached_samples():
    x = _t(1, 2, 3, 2, 2).requires_grad_()
    eps = _t(1, 2, 3, 2, 2)
    v = flow.flow_target(x.detach(), eps) + 0.5
    loss = losses.critic_denoising_loss(v.requires_grad_(), x, eps)
    loss.backward()
    assert x.grad is None and abs(loss.item() - 0.25) < 1e-6
