"""Algorithm 1 (self-rollout) and Algorithm 2 (inference) through the KV cache."""

import pytest
import torch
from conftest import WAN_CONFIGS, make_model

from selfforcing import flow
from selfforcing.sampling import cache_chunk, denoise_chunk, rollout_with_kv_cache, sample_exit_steps

CFG = WAN_CONFIGS["a"]
STEPS = flow.denoising_step_list([1000, 750, 500, 250], shift=5.0)


class ForwardRecorder:
    """Wraps a model and records, for every forward, whether gradients were on and what it was given."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, ctx, **kw):
        self.calls.append(dict(grad=torch.is_grad_enabled(), x=x.detach().clone(), t=t.clone(), start=kw.get("start_frame")))
        return self.model(x, t, ctx, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _setup(seed=0, frames=6, block=2):
    model = make_model(CFG, num_frame_per_block=block)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, frames, CFG["in_channels"], 4, 4, generator=g)
    ctx = torch.randn(2, 3, CFG["text_dim"], generator=g)
    return model, noise, ctx


@pytest.mark.parametrize("exits", [[0, 0, 0], [3, 3, 3], [2, 0, 1]])
def test_gradient_truncation(exits):
    """(Acceptance a of the training issue) only the exit-step forward of each chunk runs with gradient, the
    cache never holds a tensor that requires grad, and the generator's gradient is exactly the sum over chunks
    of the gradients of those exit forwards, recomputed alone from their recorded (detached) inputs."""
    model, noise, ctx = _setup()
    rec = ForwardRecorder(model)
    cache = model.new_kv_cache(2, 4, 4, max_frames=6)
    weights = torch.randn(2, 6, CFG["in_channels"], 4, 4, generator=torch.Generator().manual_seed(9))
    res = rollout_with_kv_cache(rec, noise, ctx, STEPS, block_sizes=[2, 2, 2], exit_steps=exits, kv_cache=cache,
                                generator=torch.Generator().manual_seed(1))
    grad_calls = [c for c in rec.calls if c["grad"]]
    assert res.grad_forwards == len(grad_calls) == 3  # one per supervised chunk
    assert len(rec.calls) == sum(e + 1 for e in exits) + 3  # denoising passes + one cache pass per chunk
    assert not cache.k.requires_grad and cache.k.grad_fn is None
    assert res.video.requires_grad
    (res.video * weights).sum().backward()
    rollout_grad = [p.grad.clone() for p in model.parameters()]

    # recompute: rebuild the cache from the clean outputs without grad, and differentiate each exit forward alone
    model.zero_grad()
    video = res.video.detach()
    cache2 = model.new_kv_cache(2, 4, 4, max_frames=6)
    for c, call in enumerate(grad_calls):
        s = 2 * c
        assert call["start"] == s
        t = call["t"]
        x0 = flow.flow_to_x0(model(call["x"], t, ctx, kv_cache=cache2, start_frame=s), call["x"], t)
        (x0 * weights[:, s:s + 2]).sum().backward()
        with torch.no_grad():
            model(video[:, s:s + 2], torch.zeros(2, 2), ctx, kv_cache=cache2, start_frame=s)
    for a, p in zip(rollout_grad, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in rollout_grad) > 0


def test_exit_input_comes_from_the_no_grad_steps():
    """The exit step's input is the re-noised prediction of the previous step at the next listed timestep."""
    model, noise, ctx = _setup()
    rec = ForwardRecorder(model)
    rollout_with_kv_cache(rec, noise, ctx, STEPS, block_sizes=[2, 2, 2], exit_steps=[2, 2, 2],
                          generator=torch.Generator().manual_seed(1))
    chunk0 = [c for c in rec.calls if c["start"] == 0]
    torch.testing.assert_close(torch.tensor([float(c["t"][0, 0]) for c in chunk0]), torch.tensor([*STEPS[:3].tolist(), 0.0]).float())
    assert [c["grad"] for c in chunk0] == [False, False, True, False]
    assert torch.equal(chunk0[0]["x"], noise[:, :2])


def test_longer_rollout_supervises_only_the_last_frames():
    model, noise, ctx = _setup(frames=8)
    res = rollout_with_kv_cache(model, noise, ctx, STEPS, block_sizes=[2, 2, 2, 2], exit_steps=[1] * 4,
                                grad_from_frame=4)
    assert res.grad_forwards == 2
    params = list(model.parameters())
    early = torch.autograd.grad(res.video[:, :4].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in early)  # unsupervised chunks: no gradient
    late = torch.autograd.grad(res.video[:, 4:].sum(), params, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in late)


def test_inference_rollout_equals_manual_algorithm_2():
    """rollout_with_kv_cache without gradient == a hand-written Algorithm 2 loop with the same noise draws."""
    model, noise, ctx = _setup()
    with torch.no_grad():
        res = rollout_with_kv_cache(model, noise, ctx, STEPS, block_sizes=[2, 2, 2],
                                    generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        cache = model.new_kv_cache(2, 4, 4, max_frames=6)
        outs = []
        for c in range(3):
            s = 2 * c
            x = noise[:, s:s + 2]
            for j, tj in enumerate(STEPS):
                t = torch.full((2, 2), float(tj))
                x0 = flow.flow_to_x0(model(x, t, ctx, kv_cache=cache, start_frame=s), x, t)
                if j + 1 < len(STEPS):
                    x = flow.add_noise(x0, torch.randn(x0.shape, generator=g), torch.full((2, 2), float(STEPS[j + 1])))
            outs.append(x0)
            model(x0, torch.zeros(2, 2), ctx, kv_cache=cache, start_frame=s)
    assert res.grad_forwards == 0
    torch.testing.assert_close(res.video, torch.cat(outs, 1))


def test_exit_step_sampling():
    g = torch.Generator().manual_seed(0)
    shared = [sample_exit_steps(5, 4, generator=g) for _ in range(200)]
    assert all(len(set(s)) == 1 for s in shared)
    assert {s[0] for s in shared} == {0, 1, 2, 3}  # uniform over all steps
    indep = [sample_exit_steps(5, 4, same_step_across_blocks=False, generator=g) for _ in range(50)]
    assert any(len(set(s)) > 1 for s in indep)
    assert sample_exit_steps(3, 4, last_step_only=True) == [3, 3, 3]
    with pytest.raises(ValueError, match="exit_step 4 outside the 4"):
        denoise_chunk(None, torch.zeros(1, 1, 1, 1, 1), STEPS, None, exit_step=4)


def test_context_noise_caches_a_noised_chunk():
    model, noise, ctx = _setup()
    with torch.no_grad():
        outs = {}
        for cn in (0.0, 100.0):
            cache = model.new_kv_cache(2, 4, 4, max_frames=4)
            cache_chunk(model, noise[:, :2], ctx, kv_cache=cache, start_frame=0, context_noise=cn,
                        generator=torch.Generator().manual_seed(0))
            outs[cn] = model(noise[:, 2:4], torch.full((2, 2), 500.0), ctx, kv_cache=cache, start_frame=2)
    assert (outs[0.0] - outs[100.0]).abs().max() > 1e-5


def test_bidirectional_ode_sampler_records_the_few_step_states():
    """ODE pairs: with N a multiple of the few-step list length, the recorded states sit exactly at the warped
    timesteps; with a flow that is exact for a single point mass the ODE lands on it."""
    from selfforcing.sampling import sample_bidirectional

    target = torch.randn(1, 2, 3, 2, 2, generator=torch.Generator().manual_seed(0))

    class PointMass:  # v(x_t, t) = (x_t - x0*) / sigma: the exact flow of a dirac at x0*
        def __call__(self, x, t, ctx, **kw):
            sigma = (t / 1000).reshape(*t.shape, 1, 1, 1)
            return (x - target) / sigma

    noise = torch.randn(1, 2, 3, 2, 2)
    x0, states = sample_bidirectional(PointMass(), noise, None, num_steps=48, shift=5.0, record_timesteps=STEPS)
    torch.testing.assert_close(x0, target, atol=1e-5, rtol=0)
    assert states.shape == (1, 5, 2, 3, 2, 2)
    assert torch.equal(states[:, 0], noise)
    for k, t in enumerate(STEPS.tolist()):  # each state is on the straight path at its timestep
        torch.testing.assert_close(states[:, k], flow.add_noise(target, noise, torch.full((1, 2), t)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not on the 50-step grid"):
        sample_bidirectional(PointMass(), noise, None, num_steps=50, shift=5.0, record_timesteps=STEPS)


def test_causal_many_step_sampler_with_separate_cfg_caches():
    from selfforcing.sampling import sample_causal_many_step

    model, noise, ctx = _setup()
    null = torch.zeros_like(ctx)
    with torch.no_grad():
        a = sample_causal_many_step(model, noise, ctx, block_sizes=[2, 2, 2], null_context=null, num_steps=4,
                                    guidance_scale=3.0)
        # the first chunk equals Euler with CFG on full forwards of that chunk alone
        from selfforcing.sampling import ode_sigmas
        sig = ode_sigmas(4, 5.0)
        x = noise[:, :2]
        for i in range(4):
            t = torch.full((2, 2), float(sig[i] * 1000))
            vc, vu = model(x, t, ctx), model(x, t, null)
            x = x + float(sig[i + 1] - sig[i]) * (vu + 3.0 * (vc - vu))
    torch.testing.assert_close(a[:, :2], x, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(a).all()


def test_pending_cache_pass_before_a_gradient_first_step():
    """``denoise_chunk(pending=...)`` whose first step is the exit step with gradient runs the previous chunk's cache
    pass on its own first (a cache pass never carries gradient), so the result equals cache pass + plain sampler."""
    model, noise, ctx = _setup()
    clean = noise[:, :2].flip(0)
    outs = []
    for fused in (False, True):
        cache = model.new_kv_cache(2, 4, 4, max_frames=6)
        with torch.no_grad():
            model(noise[:, :2], torch.full((2, 2), 500.0), ctx, kv_cache=cache, start_frame=0)
            if not fused:
                cache_chunk(model, clean, ctx, kv_cache=cache, start_frame=0)
        x0 = denoise_chunk(model, noise[:, 2:4], STEPS, ctx, exit_step=0, grad_at_exit=True, kv_cache=cache,
                           start_frame=2, pending=clean if fused else None)
        assert x0.requires_grad and not cache.k.requires_grad
        outs.append(x0.detach())
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
