"""The fast sampler (static KV cache, one guidance batch, hoisted condition embedding, optional
torch.compile of the head) is the same algorithm as a straightforward one: same tokens for a seed in fp32."""

import re

import pytest
import torch

from bitdance.models.presets import bitdance_preset, tokenizer_preset
from bitdance.models.transformer import BitDance
from bitdance.sampling.flow import FlowSampler, guidance_at

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(P: int, seed: int = 0, **overrides) -> BitDance:
    torch.manual_seed(seed)
    cfg = bitdance_preset(f"BitDance-T-{P}x", image_size=32, tokenizer=tokenizer_preset("tiny-d4c16"), **overrides)
    model = BitDance(cfg).eval()
    net = model.head.net
    for lin in [*net.ada_ln_blocks, net.final_layer.ada_ln_modulation, net.final_layer.linear]:
        torch.nn.init.normal_(lin.weight, std=0.05)  # the zero init would make every sample pure noise
    return model


@torch.no_grad()
def straightforward_generate(model: BitDance, class_ids, sampler: FlowSampler, guidance_scale: float,
                             schedule: str, generator: torch.Generator) -> torch.Tensor:
    """Written for clarity, not speed: the whole sequence is recomputed at every AR step (no cache), the
    conditional and unconditional rows go through the head in separate calls, and the head network embeds
    its condition again at every flow step. The Euler(-Maruyama) updates are spelled out here."""
    cfg = model.config
    dev = model.pos_for_diff.weight.device
    B, P, steps = len(class_ids), cfg.parallel_num, cfg.num_steps
    ids = torch.cat([class_ids, torch.full_like(class_ids, cfg.num_classes)])
    tokens = torch.zeros(2 * B, cfg.num_tokens, cfg.latent_dim, device=dev)
    dts = sampler.timesteps(dev).diff()
    for step in range(steps):
        done = step * P
        x = torch.cat([model._class_prefix(ids), model.proj_in(tokens[:, :done])], dim=1)
        L = x.shape[1]
        h = model._transformer(x, 0, model.attn_mask[:L, :L])
        cond = model.norm(h[:, -P:]) + model.pos_for_diff.weight[done: done + P]
        scale = guidance_at(guidance_scale, step, steps, schedule)
        guided = scale > 1.0
        rows = B if guided else 2 * B

        def velocity(z, t):
            def v_of(c):
                return (model.head.net(z, t, c) - z) / (1 - t).clamp_min(0.05)
            if not guided:
                return v_of(cond)
            v_c, v_u = v_of(cond[:B]), v_of(cond[B:])
            return v_u + scale * (v_c - v_u)

        z = torch.randn((rows, P, cfg.latent_dim), generator=generator, device=dev)
        t = torch.zeros((), device=dev)
        for i in range(sampler.num_steps):
            v, dt = velocity(z, t), dts[i]
            if sampler.method == "euler_maruyama":
                score = (t * v - z) / ((1 - t) ** 2 + t * (1 - t))
                noise = torch.randn(z.shape, generator=generator, device=dev)
                z = z + (v + (1 - t) * score) * dt + (2.0 * (1.0 - t) * dt).sqrt() * noise
            else:
                z = z + v * dt
            t = t + dt
        t_last = torch.tensor(1 - sampler.last_step_size, device=dev)
        z = z + velocity(z, t_last) * sampler.last_step_size
        new = torch.where(z > 0, 1.0, -1.0)
        tokens[:, done: done + P] = torch.cat([new, new]) if guided else new
    return model.from_sequence(tokens[:B])


@pytest.mark.parametrize("P,method,schedule", [(1, "euler_maruyama", "linear"), (4, "euler_maruyama", "linear"),
                                               (4, "euler", "constant"), (16, "euler_maruyama", "linear")])
def test_fast_sampler_equals_straightforward(P, method, schedule):
    model = _model(P)
    labels = torch.tensor([3, 7, 0])
    sampler = FlowSampler(num_steps=6, method=method)
    slow = straightforward_generate(model, labels, sampler, 3.0, schedule, torch.Generator().manual_seed(5))
    with torch.inference_mode():
        fast = model.generate(labels, sampler=sampler, guidance_scale=3.0, guidance_schedule=schedule,
                              generator=torch.Generator().manual_seed(5))
    assert fast.shape == slow.shape
    assert torch.equal(fast, slow), f"{(fast != slow).float().mean().item():.4%} of bits differ"
    assert fast.abs().eq(1).all()
    # and the samples depend on the seed (the comparison is not trivially true)
    with torch.inference_mode():
        other = model.generate(labels, sampler=sampler, guidance_scale=3.0, guidance_schedule=schedule,
                               generator=torch.Generator().manual_seed(6))
    assert not torch.equal(fast, other)


@pytest.mark.parametrize("P", [1, 4])
def test_hoisted_adaln_gives_the_same_tokens(P, monkeypatch):
    """The head's adaLN outputs computed for all flow steps up front (small batches) or at every flow step
    (beyond DiffusionHead.HOIST_ELEMENTS) give the same tokens."""
    model = _model(P)
    labels = torch.tensor([3, 1])
    kw = dict(sampler=FlowSampler(num_steps=4), guidance_scale=3.0, guidance_schedule="constant")
    with torch.inference_mode():
        hoisted = model.generate(labels, generator=torch.Generator().manual_seed(2), **kw)
        monkeypatch.setattr(type(model.head), "HOIST_ELEMENTS", 0)
        per_step = model.generate(labels, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(hoisted, per_step)


def _route_products(graph: str, few: str, kv: str, monkeypatch) -> tuple[str, str, str]:
    """Sends the compiled graphs' products where a test asks: ``graph`` "static", "wide-mkl" or "wide-onednn",
    ``few`` / ``kv`` the switches of bitdance's kernels (skipped where they cannot run). Returns the graph, the
    KV-cache attention that will run and the wide products' library ("" = the CPU's choice)."""
    import bitdance.compiling
    import bitdance.models.head
    from bitdance.kernels import PANEL_ISA, kernels_unsupported

    graph, _, products = graph.partition("-")
    if products == "mkl" and not torch.backends.mkl.is_available():
        pytest.skip("this torch build has no MKL")
    if few == "panel" and kernels_unsupported(PANEL_ISA):
        pytest.skip(f"the panel kernel cannot run here: {kernels_unsupported(PANEL_ISA)}")
    if kernels_unsupported():
        kv = "library"  # torch's kernel then, and the rest is tested all the same
    monkeypatch.setenv(bitdance.compiling.KV_ATTENTION_ENV, kv)
    monkeypatch.setenv(bitdance.compiling.FEW_ROW_PRODUCTS_ENV, few)
    if products:
        monkeypatch.setenv(bitdance.compiling.WIDE_PRODUCTS_ENV, products)
    # the tiny model's calls have 4 x P rows: with oneDNN the threshold moves so that "wide" takes the graph of
    # many rows; with MKL every fp32 call does (the rule itself runs, also where dynamo traces the head)
    if products != "mkl":
        min_rows = 1 if graph == "wide" else 10**9
        monkeypatch.setattr(bitdance.compiling, "wide_min_rows", lambda: min_rows)
        monkeypatch.setattr(bitdance.models.head, "wide_min_rows", lambda: min_rows)
    return graph, kv, products


# `reload`: the weights change after compiling, and the graphs must follow. Compiling again is most of a case's
# time (40-70 s on a 2-core Ice Lake Xeon), so it is checked once per way the frozen weights are held: packed for
# the C++ templates, for MKL, for oneDNN (dynamic rows) and for the panel kernel.
@pytest.mark.parametrize("P, attention, graph, few, kv, reload", [
    (1, "bidirectional", "static", "library", "kernel", True),
    (4, "bidirectional", "static", "library", "kernel", False),
    (4, "causal", "static", "library", "kernel", False),
    (1, "bidirectional", "wide-mkl", "library", "kernel", True),
    (4, "bidirectional", "wide-onednn", "library", "library", True),
    (4, "bidirectional", "wide-mkl", "library", "kernel", False),
    (4, "bidirectional", "wide-mkl", "panel", "kernel", True),
    (4, "causal", "static", "panel", "kernel", False)])
def test_compiled_sampling_gives_the_same_tokens(P, attention, graph, few, kv, reload, monkeypatch):
    """torch.compile (inductor, CPU here: weights frozen; C++ GEMM templates or the panel kernel for few
    rows, MKL with static rows or oneDNN with dynamic rows for many) of the head's inner loop and the
    transformer's cached step (the cache written and read by one opaque op: bitdance's KV-cache kernel where
    every cached position is visible, else with the mask rows of the block) gives the tokens of the eager code
    for a seed in fp32, and (where `reload`) follows the weights when they change after compiling."""
    from torch._inductor.utils import run_and_get_code

    import bitdance.compiling

    graph, kv, products = _route_products(graph, few, kv, monkeypatch)
    model, other = _model(P, block_attention=attention), _model(P, seed=1, block_attention=attention)
    labels = torch.tensor([1, 2])
    kw = dict(sampler=FlowSampler(num_steps=3), guidance_scale=2.5)
    with torch.inference_mode():
        eager = model.generate(labels, generator=torch.Generator().manual_seed(0), **kw)
    model.compile_sampling()  # the transformer's step too: the default on CPUs
    assert model._compiled_decode is not None
    tokens = torch.zeros(4, P, model.config.latent_dim)
    assert model._compiled_decode.graph_for(tokens) == graph
    assert model._compiled_decode.graph_for(tokens.bfloat16()) == "static"
    assert model._compiled_decode.wide_products == (products or bitdance.compiling.wide_products())
    assert model._compiled_decode.few_row_products == few
    try:
        with torch.inference_mode():
            compiled, code = run_and_get_code(model.generate, labels, generator=torch.Generator().manual_seed(0),
                                              **kw)
        assert torch.equal(eager, compiled), f"{(eager != compiled).float().mean().item():.4%} of bits differ"
        assert ("kv_attention" in "\n".join(code)) == (kv == "kernel" and attention == "bidirectional")
        if not reload:
            return
        with torch.no_grad():
            model.load_state_dict(other.state_dict())  # the frozen copies are stale now
        with torch.inference_mode():
            reloaded = model.generate(labels, generator=torch.Generator().manual_seed(0), **kw)
            expected = other.generate(labels, generator=torch.Generator().manual_seed(0), **kw)
        assert not torch.equal(expected, eager)
        assert torch.equal(reloaded, expected)
    finally:
        model.compile_sampling(mode="off")


def test_compiled_sampling_reads_int8_weights_as_stored(monkeypatch):
    """A 1x model with int8 weights (computing in fp32), compiled where the panel kernel runs the few-row
    products: its graphs hold the int8 weights (packed for the kernel, not widened to fp32 constants), and it
    samples the tokens of the same model's eager code."""
    from torch._inductor.utils import run_and_get_code

    import bitdance.compiling
    from bitdance.kernels import kernels_unsupported
    from bitdance.models.quantized import quantize_

    if kernels_unsupported() is not None:
        pytest.skip(f"bitdance's kernels cannot run here: {kernels_unsupported()}")
    monkeypatch.setenv(bitdance.compiling.FEW_ROW_PRODUCTS_ENV, "panel")
    monkeypatch.setenv(bitdance.compiling.WIDE_PRODUCTS_ENV, "mkl")
    model = _model(1)
    assert quantize_(model, "int8") > 0
    labels = torch.tensor([1, 2])
    kw = dict(sampler=FlowSampler(num_steps=3), guidance_scale=2.5)
    with torch.inference_mode():
        eager = model.generate(labels, generator=torch.Generator().manual_seed(0), **kw)
    model.compile_sampling()
    try:
        with torch.inference_mode():
            compiled, code = run_and_get_code(model.generate, labels, generator=torch.Generator().manual_seed(0),
                                              **kw)
        assert torch.equal(eager, compiled), f"{(eager != compiled).float().mean().item():.4%} of bits differ"
        code = "\n".join(code)
        assert "panel_linear" in code and re.search(r"torch\.int8 \(\d+, \d+, (16|32)\)", code)
    finally:
        model.compile_sampling(mode="off")


@pytest.mark.parametrize("P, graph, few, method, hoist", [
    (1, "static", "library", "euler_maruyama", True), (4, "wide-mkl", "panel", "euler_maruyama", True),
    (1, "static", "library", "euler", False)])
def test_whole_flow_compiled_gives_the_same_tokens(P, graph, few, method, hoist, monkeypatch):
    """compile_sampling(whole_flow=True): each AR step's flow loop runs as one compiled call on noise drawn up
    front, and gives the eager tokens for a seed in fp32 (Euler-Maruyama and Euler; adaLN outputs hoisted or
    computed at each update)."""
    from unittest import mock

    from bitdance.compiling import FrozenCompiled

    _route_products(graph, few, "kernel", monkeypatch)
    if not hoist:
        monkeypatch.setattr(type(_model(P).head), "HOIST_ELEMENTS", 0)
    model = _model(P)
    labels = torch.tensor([1, 2])
    kw = dict(sampler=FlowSampler(num_steps=3, method=method), guidance_scale=2.5)
    with torch.inference_mode():
        eager = model.generate(labels, generator=torch.Generator().manual_seed(0), **kw)
    model.compile_sampling(whole_flow=True)
    flow, calls = model.head._compiled_flow, []
    real_call = FrozenCompiled.__call__

    def counted(self, *args):
        calls.append("flow" if self is flow else "step" if self is model.head._compiled_step else "other")
        return real_call(self, *args)

    try:
        with torch.inference_mode(), mock.patch.object(FrozenCompiled, "__call__", counted):
            compiled = model.generate(labels, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(eager, compiled), f"{(eager != compiled).float().mean().item():.4%} of bits differ"
        assert calls.count("flow") == model.config.num_steps and "step" not in calls
    finally:
        model.compile_sampling(mode="off")
    assert model.head._compiled_flow is None


def test_compiled_sampling_runs_in_bf16():
    """The compiled sampler in bf16 (the default dtype on CPUs with bf16 units): the transformer's cached step
    runs its graph (bf16 takes the graph of few rows and torch's KV-cache attention, whose output layout the
    graph checks) and every token is a point of the hypercube. bf16 rounds differently compiled and eager,
    so the tokens are not compared."""
    from torch._inductor.utils import run_and_get_code

    model = _model(4).to(torch.bfloat16)
    labels = torch.tensor([1, 2])
    model.compile_sampling()
    try:
        with torch.inference_mode():
            tokens, code = run_and_get_code(model.generate, labels, sampler=FlowSampler(num_steps=2),
                                            guidance_scale=2.5, generator=torch.Generator().manual_seed(0))
        assert "cached_attention" in "\n".join(code)
        assert tokens.shape == (2, model.config.latent_dim, *(2 * [model.config.grid_size]))
        assert set(tokens.unique().tolist()) <= {-1.0, 1.0}
    finally:
        model.compile_sampling(mode="off")


def test_wide_products_follow_the_cpu_vendor_and_the_override(monkeypatch):
    """MKL's packed GEMM (static rows) for the graph of many rows on Intel CPUs running AVX2 or AVX-512 kernels,
    oneDNN (dynamic rows) elsewhere; $BITDANCE_WIDE_PRODUCTS overrides it and a value it does not know is an
    error naming it."""
    import bitdance.compiling as compiling

    monkeypatch.delenv(compiling.WIDE_PRODUCTS_ENV, raising=False)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr(compiling, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert compiling.wide_products() == "mkl"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert compiling.wide_products() == "mkl"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert compiling.wide_products() == "onednn"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(compiling, "cpu_vendor", lambda: "AuthenticAMD")
    assert compiling.wide_products() == "onednn"
    monkeypatch.setenv(compiling.WIDE_PRODUCTS_ENV, "MKL")
    assert compiling.wide_products() == "mkl"
    monkeypatch.setenv(compiling.WIDE_PRODUCTS_ENV, "blas")
    with pytest.raises(ValueError, match="BITDANCE_WIDE_PRODUCTS='blas'"):
        compiling.wide_products()
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    monkeypatch.setenv(compiling.WIDE_PRODUCTS_ENV, "mkl")
    with pytest.raises(ValueError, match="no MKL"):
        compiling.wide_products()
    monkeypatch.delenv(compiling.WIDE_PRODUCTS_ENV)
    monkeypatch.setattr(compiling, "cpu_vendor", lambda: "GenuineIntel")
    assert compiling.wide_products() == "onednn"


def test_frozen_compiled_counts_rows_and_follows_train_mode(monkeypatch):
    """On CPUs a call takes the oneDNN graph by the rows of its products: those of its first tensor, or what
    ``rows`` says (the head's preparation: the adaLN outputs of all flow times, 26 x the condition's rows);
    with MKL every fp32 call takes it. With dynamo's guards on the module dropped, switching to training mode
    must still compile again."""
    from bitdance.compiling import ONEDNN_MIN_ROWS, WIDE_PRODUCTS_ENV, FrozenCompiled

    monkeypatch.setenv(WIDE_PRODUCTS_ENV, "onednn")  # the row threshold of oneDNN (MKL's is 1: below)
    model = _model(1)
    model.compile_sampling()
    try:
        cond = torch.zeros(4, model.head.net.cond_embed.in_features)
        times = FlowSampler(num_steps=25).flow_times(torch.device("cpu"))
        assert 4 < ONEDNN_MIN_ROWS <= 4 * times.numel()
        prepare = model.head._compiled_prepare
        assert prepare.graph_for(cond, times) == "wide"
        assert prepare.graph_for(cond, None) == "static"
        assert prepare.graph_for(cond.bfloat16(), times) == "static"
        plain = FrozenCompiled(lambda m, x, t: m(x), model.head.net.cond_embed)
        assert plain.graph_for(cond, times) == "static"
        if torch.backends.mkl.is_available():
            monkeypatch.setenv(WIDE_PRODUCTS_ENV, "mkl")
            with_mkl = FrozenCompiled(lambda m, x, t: m(x), model.head.net.cond_embed)
            assert with_mkl.graph_for(cond[:1], None) == "wide" and with_mkl.wide_products == "mkl"
            assert with_mkl.graph_for(cond.bfloat16(), None) == "static"

        step = model.head._compiled_step
        assert not step.refresh()
        model.train()
        assert step.refresh()  # rebuilt: the graph had dropout etc. of eval mode baked in
        assert not step.refresh()
        model.eval()
        assert step.refresh()
    finally:
        model.compile_sampling(mode="off")


def test_padded_products_pad_the_weight_and_slice_the_output(monkeypatch):
    """fp32 products whose width is not a multiple of 24 run with zero rows added to the weight (so that the
    AVX2 GEMM template takes its widest micro-kernel) and the same outputs; with AVX2 kernels the graphs of few
    rows are traced that way."""
    from torch.overrides import TorchFunctionMode

    from bitdance.compiling import AVX2_TEMPLATE_WIDTH, FEW_ROW_PRODUCTS_ENV, FrozenCompiled, PaddedProducts

    widths = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                widths.append(args[1].shape[0])
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    odd, even = torch.nn.Linear(32, 40), torch.nn.Linear(32, 2 * AVX2_TEMPLATE_WIDTH, bias=False)
    odd_bf16 = torch.nn.Linear(32, 40).bfloat16()
    x = torch.randn(4, 32, generator=g)
    with torch.no_grad(), Record(), PaddedProducts():  # the inner mode sees each call first
        y_odd, y_even, _ = odd(x), even(x), odd_bf16(x.bfloat16())
    assert widths == [2 * AVX2_TEMPLATE_WIDTH, 2 * AVX2_TEMPLATE_WIDTH, 40]  # 40 padded to 48; bf16 as it is
    with torch.no_grad():
        assert y_odd.shape == (4, 40) and torch.allclose(y_odd, odd(x), atol=1e-6)
        assert torch.equal(y_even, even(x))

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv(FEW_ROW_PRODUCTS_ENV, "library")  # else on an Intel CPU the panel kernel takes them
    compiled = FrozenCompiled(lambda m, x: m(x), odd)
    with torch.no_grad():
        assert torch.allclose(compiled(x), odd(x), atol=1e-5)
    assert compiled._compiled._orig_mod.products is PaddedProducts


def test_attention_cpu_fp32_few_keys_matches_sdpa(monkeypatch):
    """fp32 on CPU with few keys and no mask (a 4x head's patch; a 16x head's when compiled into the graph of
    few rows) takes the broadcast-and-sum path."""
    import bitdance.models.head as head
    from bitdance.compiling import ONEDNN_MIN_ROWS, WIDE_PRODUCTS_ENV
    from bitdance.models.head import FEW_KEYS, FEW_KEYS_COMPILED, attention

    monkeypatch.setenv(WIDE_PRODUCTS_ENV, "onednn")  # the graph of few rows exists below ONEDNN_MIN_ROWS rows

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (FEW_KEYS, FEW_KEYS, FEW_KEYS))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def no_fused_kernel(*args, **kwargs):
        raise AssertionError("the fused kernel was called")

    k16, v16 = (torch.randn(2, 3, FEW_KEYS_COMPILED, 16, generator=g) for _ in range(2))
    ref16 = torch.nn.functional.scaled_dot_product_attention(q, k16, v16)
    monkeypatch.setattr(head.F, "scaled_dot_product_attention", no_fused_kernel)
    torch.testing.assert_close(attention(q, k, v), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="fused kernel"):  # more keys, or a mask: the fused kernel
        attention(q, torch.cat([k, k], -2), torch.cat([v, v], -2))
    # traced by torch.compile, up to FEW_KEYS_COMPILED keys: the broadcasts too
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(attention, fullgraph=True)(q, k16, v16), ref16, atol=1e-5, rtol=1e-5)
    # ... but only in the graph of few rows: from ONEDNN_MIN_ROWS rows (batch x queries) on, the fused kernel
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def traced(batch):  # batch x the queries of q: the rows of the traced call
        shape = (batch, -1, -1, -1)
        return attention(torch.randn(batch, 3, q.shape[-2], 16, generator=g), k16[:1].expand(shape), v16[:1].expand(shape))

    traced(ONEDNN_MIN_ROWS // q.shape[-2] - 1)
    with pytest.raises(AssertionError, match="fused kernel"):
        traced(ONEDNN_MIN_ROWS // q.shape[-2])
    if torch.backends.mkl.is_available():  # with MKL every fp32 call is in the graph of many rows
        monkeypatch.setenv(WIDE_PRODUCTS_ENV, "mkl")
        with pytest.raises(AssertionError, match="fused kernel"):
            traced(1)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_cpu_bf16_path_matches_sdpa(masked):
    """bf16 on CPU with short keys takes the explicit-scores path; it must compute the same attention."""
    from bitdance.models.head import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (5, 9, 9))
    mask = None
    if masked:
        mask = torch.rand(5, 9, generator=g) > 0.4
        mask[:, 0] = True  # every query sees at least one key
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(attention(q, k, v, mask), ref)  # fp32: the fused kernel itself
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
