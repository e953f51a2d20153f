"""Devices: generators on another device than the model, and the GPU checks.

A CPU ``torch.Generator`` may drive sampling on a GPU (diffusers' rule): the noise is drawn on the CPU and
moved, so one seed gives the same noise everywhere. The tests marked ``cuda`` need a GPU and are skipped
elsewhere (CI has none); on a GPU machine run ``python -m pytest -q tests/test_devices.py`` or
``bash benchmarks/gpu_check.sh``, which also fills the GPU table of docs/benchmarks.md.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_fast_sampler import _model, straightforward_generate  # tests/ is on sys.path under pytest

from bitdance import BinaryTokenizer, BitDancePipeline, rng
from bitdance.sampling.flow import FlowSampler

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny_pipeline(P: int = 4, seed: int = 0) -> BitDancePipeline:
    gen = _model(P, seed)
    torch.manual_seed(seed)
    return BitDancePipeline(gen, BinaryTokenizer(gen.config.tokenizer))


@pytest.fixture
def exact_cuda():
    """fp32 without TF32 and attention by the math kernel: GPU results comparable to the CPU's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.cpu() == b.cpu()).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Generators on another device (runs everywhere; "meta" stands in for a GPU)
# ----------------------------------------------------------------------------------------------
def test_cpu_generator_draws_for_another_device():
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = rng.randn((4, 5), generator=g, device="meta")
    u = rng.rand((2,), generator=g, device="meta", dtype=torch.float64)
    assert (x.device.type, tuple(x.shape)) == ("meta", (4, 5))
    assert (u.device.type, u.dtype) == ("meta", torch.float64)
    torch.randn(4, 5, generator=ref)
    torch.rand(2, generator=ref, dtype=torch.float64)
    # the generator advanced exactly as the same draws on the CPU would have advanced it
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=ref))


def test_same_device_draws_are_plain_torch_draws():
    a = rng.randn((3, 2), generator=torch.Generator().manual_seed(1), device="cpu")
    assert torch.equal(a, torch.randn(3, 2, generator=torch.Generator().manual_seed(1)))
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert rng.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).flatten().tolist() == [1, 2]


# ----------------------------------------------------------------------------------------------
# GPU checks
# ----------------------------------------------------------------------------------------------
@cuda
def test_cpu_generator_gives_the_same_noise_on_cuda():
    x = rng.randn((64, 16, 32), generator=torch.Generator().manual_seed(0), device="cuda")
    assert x.device.type == "cuda"
    assert torch.equal(x.cpu(), torch.randn(64, 16, 32, generator=torch.Generator().manual_seed(0)))


@cuda
def test_cuda_generator_for_cpu_tensors_is_refused():
    with pytest.raises(ValueError, match="cannot draw cpu tensors"):
        rng.randn((2,), generator=torch.Generator("cuda").manual_seed(0), device="cpu")


@cuda
def test_pipeline_on_cuda_takes_cpu_and_cuda_generators(exact_cuda):
    """The README's `generator=torch.Generator().manual_seed(0)` works on a GPU, deterministically, and
    gives (up to the devices' rounding) the tokens it gives on the CPU."""
    pipe = _tiny_pipeline()
    kw = dict(num_inference_steps=4, guidance_scale=2.0, output_type="latent")
    on_cpu = pipe([1, 2, 3], generator=torch.Generator().manual_seed(0), **kw).latents
    pipe.to("cuda")
    a = pipe([1, 2, 3], generator=torch.Generator().manual_seed(0), **kw).latents
    b = pipe([1, 2, 3], generator=torch.Generator().manual_seed(0), **kw).latents
    assert a.device.type == "cuda" and torch.equal(a, b)
    agree = _agreement(a, on_cpu)
    assert agree > 0.9, f"only {agree:.1%} of bits agree with the CPU run of the same CPU seed"
    c = pipe([1, 2, 3], generator=torch.Generator("cuda").manual_seed(0), num_inference_steps=4,
             guidance_scale=2.0, output_type="np")
    assert c.images.shape == (3, 32, 32, 3)


@cuda
@pytest.mark.parametrize("P", [1, 4, 16])
def test_fast_sampler_equals_straightforward_on_cuda(P, exact_cuda):
    model = _model(P).cuda()
    labels = torch.tensor([3, 7, 0], device="cuda")
    sampler = FlowSampler(num_steps=6)
    slow = straightforward_generate(model, labels, sampler, 3.0, "linear", torch.Generator("cuda").manual_seed(5))
    with torch.inference_mode():
        fast = model.generate(labels, sampler=sampler, guidance_scale=3.0,
                              generator=torch.Generator("cuda").manual_seed(5))
    assert torch.equal(fast, slow), f"{1 - _agreement(fast, slow):.4%} of bits differ"


@cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_head_on_cuda(mode):
    """torch.compile of the head's inner loop (reduce-overhead: CUDA graphs) keeps the tokens of a seed,
    up to the rounding of fused kernels, and replays deterministically."""
    pipe = _tiny_pipeline().to("cuda")
    kw = dict(num_inference_steps=3, guidance_scale=2.5, output_type="latent")
    eager = pipe([1, 2], generator=torch.Generator("cuda").manual_seed(0), **kw).latents
    pipe.compile(mode)
    try:
        first = pipe([1, 2], generator=torch.Generator("cuda").manual_seed(0), **kw).latents
        again = pipe([1, 2], generator=torch.Generator("cuda").manual_seed(0), **kw).latents
    finally:
        pipe.compile("off")
    assert torch.equal(first, again)
    agree = _agreement(first, eager)
    assert agree > 0.98, f"compiled ({mode}) and eager agree on only {agree:.2%} of bits"


@cuda
@pytest.mark.parametrize("dtype,compile", [("fp32", "off"), ("bf16", "off"), ("bf16", "reduce-overhead")])
def test_bench_on_cuda(dtype, compile):
    from bitdance.apps.bench import run_bench

    r = run_bench("BitDance-T-4x", image_size=32, tokenizer="tiny-d4c16", batch=4, steps=2, guidance_scale=2.0, dtype=dtype,
                  device="cuda", compile=compile)
    assert r.device.startswith("cuda") and r.dtype == dtype and r.compile_mode == compile
    assert r.peak_memory_method.startswith("cuda")
    assert 0 < r.mfu < 1 and r.images_per_s > 0 and r.flops_per_image > 0
    assert r.peak_memory_bytes >= r.weights_bytes > 0
    assert r.decode_chunk_bytes and r.decode_chunk_bytes > 0
    assert r.memory_budget_bytes == r.weights_bytes + r.kv_cache_bytes + r.decode_chunk_bytes


@cuda
def test_generator_training_on_cuda_in_bf16(tmp_path):
    """A few bf16 training steps on the GPU, the export sampled there."""
    from test_training import ENV, gen_args, make_workdir

    w = make_workdir(tmp_path / "w")
    args = gen_args(w, tmp_path / "run", 4)
    args[args.index("--precision") + 1] = "bf16"
    r = subprocess.run([sys.executable, "-m", "bitdance.training", *args, "--device", "cuda"], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pipe = BitDancePipeline.from_pretrained(tmp_path / "run" / "model", device="cuda")
    out = pipe([0, 1], num_inference_steps=3, generator=torch.Generator("cuda").manual_seed(0), output_type="np")
    assert out.images.shape == (2, 16, 16, 3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_torchrun_two_gpus_nccl(tmp_path):
    """DDP over NCCL: each rank takes the GPU of its local rank; same loss as one process on the same batch."""
    import json

    from test_training import ENV, gen_args, make_workdir

    w = make_workdir(tmp_path / "w")
    one = subprocess.run([sys.executable, "-m", "bitdance.training", *gen_args(w, tmp_path / "one", 1,
                          micro_batch_size=4), "--device", "cuda"], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29541", "-m", "bitdance.training", *gen_args(w, tmp_path / "two", 1), "--device", "cuda"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def loss(d):
        return json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["loss"]

    assert loss(tmp_path / "one") == pytest.approx(loss(tmp_path / "two"), rel=1e-4)


@cuda
def test_t2i_sequential_offload_on_cuda(exact_cuda):
    """Offloaded parts visit the GPU and leave it: the same tokens as the model held on the GPU, with the decoder
    layers, head and image tokenizer back in host memory between calls."""
    from test_quantized import T2I, T2I_KW

    from bitdance.offload import offloaded_units

    def load(**kw):
        return BitDancePipeline.from_pretrained(T2I, allow_any_resolution=True, dtype=torch.float32, device="cuda",
                                                weights="int8", **kw)

    def sample(pipe):
        return pipe(["a cat"], generator=torch.Generator().manual_seed(0), **T2I_KW).latents.cpu()

    held = sample(load())
    pipe = load(offload=("sequential",))
    assert pipe.model.projector.fc2.weight.device.type == "cuda"
    units = offloaded_units(pipe.model)

    def on_host(u):
        return all(t.device.type == "cpu" for t in list(u.module.parameters()) + list(u.module.buffers()))

    assert all(on_host(u) for u in units)
    out = sample(pipe)
    assert _agreement(out, held) > 0.99
    assert all(u.visits > 0 for u in units[:-1])
    assert all(on_host(u) for u in units)
