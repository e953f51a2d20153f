"""Training: exact resume after SIGKILL, multi-process equivalence, NaN handling, both tasks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitdance import BinaryTokenizer, tokenizer_preset
from bitdance.formats.folders import load_component, save_tokenizer_folder
from bitdance.formats.weights import load_file
from bitdance.pipelines.class_conditional import BitDancePipeline
from bitdance.training.config import TrainConfig, TrainingError
from bitdance.training.trainer import global_batch_indices, lr_lambda, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
GEN_MODEL = '{"dim": 64, "n_layer": 2, "n_head": 2, "head_width": 64, "head_depth": 2, "cls_token_num": 2}'


def make_workdir(root: Path) -> Path:
    """A 2-class image folder (24 images, 16x16) and a random 4x tokenizer saved in our format."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["dark", "light"]):
        (root / "data" / name).mkdir(parents=True)
        for i in range(12):
            arr = (rng.random((16, 16, 3)) * 100 + 120 * c).astype(np.uint8)
            Image.fromarray(arr).save(root / "data" / name / f"{i}.png")
    torch.manual_seed(0)
    tok = BinaryTokenizer(tokenizer_preset("tiny-d4c16"))
    save_tokenizer_folder(tok, root / "tok")
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("train"))


def gen_args(w: Path, out: Path, steps: int, **extra) -> list[str]:
    args = ["generator", "--data", str(w / "data"), "--image-size", "16", "--tokenizer", str(w / "tok"),
            "--model", "BitDance-T-4x", "--model-overrides", GEN_MODEL, "--out", str(out),
            "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2",
            "--precision", "fp32", "--no-progress", "--log-every", "1", "--ema-decay", "0.9"]
    for k, v in extra.items():
        if k == "model_overrides":
            args[args.index("--model-overrides") + 1] = v
        else:
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def gen_config(w: Path, out: Path, steps: int, **extra) -> TrainConfig:
    import argparse

    from bitdance.training.config import add_train_args, config_from_args

    p = argparse.ArgumentParser()
    p.add_argument("task")
    add_train_args(p, task="positional")
    a = p.parse_args(gen_args(w, out, steps, **extra))
    return config_from_args(a, a.task)


def free_port() -> str:
    """A port no one listens on now: fixed ports collide when two suites run at once on one machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run_module(args, **kw):
    return subprocess.run([sys.executable, "-m", "bitdance.training", *args], env=ENV, capture_output=True,
                          text=True, timeout=300, **kw)


def weights(out: Path) -> dict[str, torch.Tensor]:
    ck = load_file(out / "checkpoint.pt")
    return {**{f"model.{k}": v for k, v in ck["model"].items()}, **{f"ema.{k}": v for k, v in ck["ema"].items()}}


def test_data_order_is_stateless_and_covers_epochs():
    a = global_batch_indices(3, 8, 20, seed=1)
    assert torch.equal(a, global_batch_indices(3, 8, 20, seed=1))
    epoch0 = torch.cat([global_batch_indices(s, 5, 20, seed=1) for s in range(4)])
    assert sorted(epoch0.tolist()) == list(range(20))
    f = lr_lambda(TrainConfig(task="tokenizer", steps=100, warmup_steps=10))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.0)


def test_resume_after_sigkill_matches_uninterrupted_run(workdir, tmp_path):
    steps = 30
    ref = run_module(gen_args(workdir, tmp_path / "ref", steps, ckpt_every=5))
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bitdance.training",
                             *gen_args(workdir, out, steps, ckpt_every=5)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(x)["step"] >= 12 for x in metrics.read_text().splitlines() if x):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = load_file(out / "checkpoint.pt")
    assert 5 <= ck["step"] < steps, "the run must be killed mid-training, after a checkpoint"

    res = run_module(gen_args(workdir, out, steps, ckpt_every=5) + ["--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step {ck['step']}" in res.stderr
    a, b = weights(tmp_path / "ref"), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert load_file(out / "checkpoint.pt")["step"] == steps


def test_two_processes_equal_one_process_on_the_same_global_batch(workdir, tmp_path):
    single = run_module(gen_args(workdir, tmp_path / "one", 1, micro_batch_size=4))
    assert single.returncode == 0, single.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "bitdance.training", *gen_args(workdir, tmp_path / "two", 1)]
    two = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    one_loss = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    two_loss = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert one_loss == pytest.approx(two_loss, rel=1e-5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def test_nan_loss_stops_with_last_good_checkpoint_intact(workdir, tmp_path):
    out = tmp_path / "nan"
    cfg = gen_config(workdir, out, 50, lr=1e9, warmup_steps=0, ckpt_every=1)
    with pytest.raises(TrainingError, match="non-finite (loss|gradients) at step (\\d+)") as e:
        train(cfg)
    failed_at = int(str(e.value).split("at step ")[1].split()[0])
    assert "Last good checkpoint" in str(e.value)
    ck = load_file(out / "checkpoint.pt")
    assert ck["step"] == failed_at  # the checkpoint of the last finite step, not overwritten
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    BitDancePipeline.from_pretrained(out / "model")  # the exported model is loadable


def test_resume_refuses_a_different_model(workdir, tmp_path):
    out = tmp_path / "r"
    train(gen_config(workdir, out, 2))
    other = gen_config(workdir, out, 4, model_overrides=GEN_MODEL.replace('"dim": 64', '"dim": 128'))
    other.resume = True
    with pytest.raises(TrainingError, match="different task/model config"):
        train(other)


def test_tokenizer_training_exports_a_loadable_tokenizer(workdir, tmp_path):
    out = tmp_path / "tok"
    cfg = TrainConfig(task="tokenizer", data=str(workdir / "data"), image_size=16, model="tiny-d4c16",
                      out=str(out), steps=6, batch_size=8, lr=1e-3, warmup_steps=1, precision="fp32",
                      progress=False, log_every=2)
    summary = train(cfg)
    assert summary["steps"] == 6
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"rec_loss", "entropy", "commitment", "codebook_entropy"} <= rows[-1].keys()
    tok = load_component(out / "tokenizer", "tokenizer")
    assert tok.config == tokenizer_preset("tiny-d4c16")
    assert (out / "reconstructions.png").exists()


def test_bad_setups_are_clear(workdir, tmp_path):
    with pytest.raises(TrainingError, match="needs a trained tokenizer"):
        TrainConfig(task="generator", tokenizer="")
    from bitdance.data import DatasetError

    with pytest.raises(DatasetError):
        train(TrainConfig(task="tokenizer", data=str(tmp_path / "nowhere"), out=str(tmp_path / "o"), steps=1))
    with pytest.raises(TrainingError, match="micro-batches"):
        train(gen_config(workdir, tmp_path / "m", 1, batch_size=6, micro_batch_size=4))


def test_fsdp_two_processes_match_ddp(workdir, tmp_path):
    """Sharded training (FSDP2 on gloo) computes the same step as replicated training."""
    def launch(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               free_port(), "-m", "bitdance.training", *gen_args(workdir, out, 2), *extra]
        r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    launch(tmp_path / "ddp")
    launch(tmp_path / "fsdp", "--fsdp")
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    BitDancePipeline.from_pretrained(tmp_path / "fsdp" / "model")


def test_tokenizer_gan_terms_train_the_discriminator(workdir, tmp_path):
    out = tmp_path / "gan"
    cfg = TrainConfig(task="tokenizer", data=str(workdir / "data"), image_size=16, model="tiny-d4c16",
                      out=str(out), steps=4, batch_size=8, lr=1e-3, warmup_steps=1, precision="fp32",
                      progress=False, log_every=1, gan_weight=0.5, disc_start=2)
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "d_loss" not in rows[0] and "d_loss" in rows[-1]  # the discriminator starts at disc_start
    assert rows[-1]["adv_weight"] > 0 and np.isfinite(rows[-1]["g_adv"])
    ck = load_file(out / "checkpoint.pt")
    assert "disc" in ck and "disc_optimizer" in ck


def test_cuda_device_follows_the_local_rank(monkeypatch):
    """`--device cuda` under torchrun: each process takes the GPU of its local rank, not all of them cuda:0."""
    from bitdance.training.distributed import Dist

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")  # no process group here
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert Dist("cuda").device == torch.device("cuda", 1)
    assert Dist("cuda:0").device == torch.device("cuda", 0)  # an explicit index is kept
    assert Dist("cpu").device == torch.device("cpu")


def test_every_train_option_is_in_one_section_with_help():
    import dataclasses

    from bitdance.training.config import SECTIONS

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    listed = [n for section in SECTIONS.values() for n in section]
    assert sorted(listed) == sorted(names) and len(set(listed)) == len(listed)
    assert listed == names  # the class body reads in --help order
    assert all(f.metadata["help"] for f in dataclasses.fields(TrainConfig))
