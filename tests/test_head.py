import pytest
import torch

from bitdance import DiffusionHead, FlowSampler, HeadConfig
from bitdance.models.quantizer import binarize
from bitdance.sampling.flow import guidance_at, time_shift


def test_time_grid_and_shift():
    s = FlowSampler(num_steps=4)
    torch.testing.assert_close(s.timesteps(), torch.tensor([0.0, 0.2375, 0.475, 0.7125, 0.95]))
    t = torch.tensor([0.0, 0.25, 0.5, 0.95])
    torch.testing.assert_close(time_shift(t, 1.0), t)
    shifted = time_shift(t, 3.0)
    assert shifted[0] == 0 and torch.all(shifted[1:] < t[1:])  # shift > 1 stays longer near noise
    with pytest.raises(ValueError, match="num_steps"):
        FlowSampler(num_steps=0)
    with pytest.raises(ValueError, match="unknown sampling method"):
        FlowSampler(method="heun")


def test_flow_times_are_where_the_sampler_evaluates():
    """flow_times lists the times the sampler passes to the denoiser, in order, bit for bit (the head
    precomputes its adaLN outputs for them)."""
    for sampler in (FlowSampler(num_steps=5), FlowSampler(num_steps=3, time_shift=2.0, method="euler")):
        seen = []

        def denoise(x, t):
            seen.append(t.clone())
            return torch.zeros_like(x)

        sampler.sample(denoise, (2, 3), generator=torch.Generator().manual_seed(0))
        times = sampler.flow_times()
        assert times.shape == (sampler.num_steps + 1,)
        assert torch.equal(torch.stack(seen), times)
        assert times[-1] == torch.tensor(1 - sampler.last_step_size)
        assert torch.all(times.diff() > 0)


def test_guidance_schedules():
    assert guidance_at(4.0, 0, 16, "linear") == 1.0
    assert guidance_at(4.0, 8, 16, "linear") == pytest.approx(2.5)
    assert guidance_at(4.0, 3, 16, "constant") == 4.0
    assert guidance_at(1.0, 10, 16, "constant") == 1.0
    with pytest.raises(ValueError, match="guidance schedule"):
        guidance_at(2.0, 1, 4, "cosine")


@pytest.mark.parametrize("method", ["euler", "euler_maruyama"])
def test_sampler_reaches_the_predicted_point(method):
    target = torch.randn(64, 8)
    out = FlowSampler(num_steps=10, method=method).sample(lambda x, t: target, (64, 8),
                                                           generator=torch.Generator().manual_seed(0))
    # An oracle x-predictor pulls every path onto the target; the final step removes what is left.
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)


def test_sampler_guidance_on_velocity():
    c, u = torch.full((4, 3), 1.0), torch.full((4, 3), -1.0)
    seen = []

    def denoise(x, t):
        seen.append(x.shape[0])
        return torch.cat([c, u])

    out = FlowSampler(num_steps=5, method="euler").sample(denoise, (4, 3), guidance_scale=3.0)
    assert set(seen) == {8}  # conditional and unconditional rows in one batch
    torch.testing.assert_close(out, u + 3.0 * (c - u), atol=1e-4, rtol=1e-4)


def test_sampler_seeded():
    f = lambda x, t: torch.zeros_like(x)  # noqa: E731
    a = FlowSampler(num_steps=3).sample(f, (5, 4), generator=torch.Generator().manual_seed(3))
    b = FlowSampler(num_steps=3).sample(f, (5, 4), generator=torch.Generator().manual_seed(3))
    c = FlowSampler(num_steps=3).sample(f, (5, 4), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _head(variant, P=1, **kw):
    cfg = HeadConfig(variant=variant, in_channels=8, cond_channels=12, width=64, depth=2, adaln_blocks=2,
                     head_dim=32, parallel_num=P, **kw)
    return DiffusionHead(cfg)


def test_head_shapes_and_hoisted_condition():
    torch.manual_seed(0)
    for variant, shape in [("mlp", (6, 8)), ("mlp", (6, 1, 8)), ("transformer", (6, 4, 8))]:
        head = _head(variant, P=shape[1] if len(shape) == 3 else 1)
        for p in head.parameters():  # leave the zero init so outputs depend on every input
            p.data.add_(torch.randn_like(p) * 0.05)
        x = torch.randn(shape)
        cond = torch.randn(*shape[:-1], 12)
        t = torch.rand(6)
        out = head.net(x, t, cond)
        assert out.shape == x.shape
        # A scalar time equals the same time given per row (what samplers rely on).
        torch.testing.assert_close(head.net(x, torch.tensor(0.3), cond), head.net(x, torch.full((6,), 0.3), cond))


def test_transformer_head_is_joint_mlp_head_is_not():
    torch.manual_seed(0)
    heads = {v: _head(v, P=4) for v in ("mlp", "transformer")}
    for h in heads.values():
        for p in h.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    x, cond, t = torch.randn(2, 4, 8), torch.randn(2, 4, 12), torch.rand(2)
    for v, h in heads.items():
        x2 = x.clone()
        x2[:, 3] += 1.0  # change the last token of each patch only
        d = (h.net(x2, t, cond) - h.net(x, t, cond))[:, :3].abs().max()
        assert (d > 1e-4) == (v == "transformer")


def test_output_activation_bounds():
    head = _head("mlp", output_activation="tanh")
    for p in head.parameters():
        p.data.normal_(0, 1.0)
    out = head.net(torch.randn(50, 8) * 10, torch.rand(50), torch.randn(50, 12) * 10)
    assert out.abs().max() <= 1.0


@pytest.mark.parametrize("variant", ["mlp", "transformer"])
def test_head_learns_a_conditional_bit_distribution(variant):
    """Two conditions, each with its own fixed 8-bit code: after a short fit the sampled bits match."""
    torch.manual_seed(0)
    P = 2 if variant == "transformer" else 1
    head = _head(variant, P=P, P_mean=0.0, P_std=1.0)
    codes = binarize(torch.randn(2, P, 8))
    conds = torch.randn(2, P, 12)  # per-position conditions, as the AR model's pos_for_diff provides
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        which = torch.randint(0, 2, (64,), generator=g)
        loss = head.loss(codes[which], conds[which], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0
    which = torch.arange(32) % 2
    with torch.no_grad():
        x = head.sample(conds[which], sampler=FlowSampler(num_steps=10), generator=g)
    acc = (binarize(x) == codes[which]).float().mean().item()
    assert acc > 0.95
