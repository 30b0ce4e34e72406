"""The sampler's equations against closed forms and against diffusers' DDIM step."""

from __future__ import annotations

import torch

from gen3diffusion.diffusion.sampler import build_scheduler, eps_from_x0, predict_x0
from gen3diffusion.models.conditioning import combine_cfg


def test_predict_x0_and_eps_from_x0_invert_each_other():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    a = torch.tensor(0.37, dtype=torch.float64)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # Eq. 1
    torch.testing.assert_close(predict_x0(x_t, eps, a), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_from_x0(x_t, x0, a), eps, rtol=0, atol=1e-12)


def test_fifty_leading_ddim_steps():
    s = build_scheduler()
    s.set_timesteps(50)
    assert s.timesteps.tolist() == list(range(981, 0, -20))


def test_ddim_step_with_eps_from_x0_moves_to_that_x0():
    """Eq. 10: feeding eps^ = eps_from_x0(x_t, x0^) makes DDIM's clean estimate exactly x0^ and its update
    x_prev = sqrt(a_prev) x0^ + sqrt(1 - a_prev) eps^."""
    s = build_scheduler()
    s.set_timesteps(50)
    t, t_prev = 481, 461
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(1, 5, 4, 8, 8, generator=g)
    x0_3d = torch.randn(x_t.shape, generator=g)
    a_t, a_prev = s.alphas_cumprod[t], s.alphas_cumprod[t_prev]
    eps_hat = eps_from_x0(x_t, x0_3d, a_t)
    out = s.step(eps_hat, t, x_t)
    torch.testing.assert_close(out.pred_original_sample, x0_3d, rtol=1e-4, atol=1e-4)
    expected = a_prev.sqrt() * x0_3d + (1 - a_prev).sqrt() * eps_hat
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-4, atol=1e-4)


def test_last_step_uses_alphas_cumprod_zero():
    """set_alpha_to_one=False: the step from t=1 lands on alphas_cumprod[0], not 1."""
    s = build_scheduler()
    s.set_timesteps(50)
    x_t = torch.randn(1, 4, 2, 2)
    x0 = torch.randn(1, 4, 2, 2)
    eps = eps_from_x0(x_t, x0, s.alphas_cumprod[1])
    a0 = s.alphas_cumprod[0]
    torch.testing.assert_close(s.step(eps, 1, x_t).prev_sample, a0.sqrt() * x0 + (1 - a0).sqrt() * eps)


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    u, c = torch.randn(3, 4), torch.randn(3, 4)
    eps = torch.cat([u, c])  # the guided batch: [uncond ; cond]
    torch.testing.assert_close(combine_cfg(eps, 1.0), c)
    torch.testing.assert_close(combine_cfg(eps, 0.0), u)
    torch.testing.assert_close(combine_cfg(eps, 5.0), u + 5 * (c - u))
