"""Released models by name through ``huggingface_hub``, without a network.

The tests lay out a Hugging Face cache folder as the hub writes it (``models--org--name/blobs/<sha256>``,
``snapshots/<commit>/<file>`` linking to the blob, ``refs/<branch or tag>`` holding the commit) with tiny
stand-ins under the released repository ids and file names, and load by name through the hub's own code
(``hf_hub_download`` / ``snapshot_download`` with ``local_files_only`` in this process; ``HF_HUB_OFFLINE=1`` and
``HF_HOME`` for the command line, which the hub reads when it is imported).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_pipeline

from bitdance.formats.hub import RELEASED, HubError, resolve
from bitdance.formats.official import load_tokenizer, save_official_generator, save_official_tokenizer
from bitdance.formats.weights import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
T2I_CASE = Path(os.environ.get("BITDANCE_T2I_REFERENCE_DIR", ROOT.parent / "shared" / "reference" / "official_t2i"))
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def lay_out(cache: Path, repo_id: str, files: dict[str, Path], *, commit: str = COMMIT_A,
            refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``files`` (name in the repository -> a file here) into the hub cache at ``commit``; ``refs`` point
    at it. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for rel, src in files.items():
        data = Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache with the ImageNet repository (B-16x and its tokenizer; B-16x again at commit B, tagged
    v2, with other weights) and the tokenizer repository."""
    work = tmp_path_factory.mktemp("hub")
    cache = work / "hub"
    made = {}
    for seed, commit, refs in ((0, COMMIT_A, ("main",)), (1, COMMIT_B, ("v2",))):
        pipe = tiny_pipeline("BitDance-T-16x", seed=seed)
        gen, tok = work / f"gen{seed}.pt", work / f"tok{seed}.pt"
        save_official_generator(gen, pipe.model)
        save_official_tokenizer(tok, pipe.tokenizer)
        lay_out(cache, "shallowdream204/BitDance-ImageNet", {"BitDance_B_16x.pt": gen, "ae_d16c32.pt": tok},
                commit=commit, refs=refs)
        made[seed] = pipe
    tok = work / "ae_d32c256.safetensors"
    save_official_tokenizer(tok, made[0].tokenizer)
    lay_out(cache, "shallowdream204/BitDance-Tokenizer", {tok.name: tok, "ae_d32c256_config.json":
                                                           work / "ae_d32c256_config.json"})
    return cache, made


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_released_names_and_repository_ids_load_through_the_cache(hub):
    from bitdance import BitDancePipeline

    cache, made = hub
    by_name = BitDancePipeline.from_pretrained("BitDance-B-16x", cache_dir=cache, local_files_only=True)
    by_repo = BitDancePipeline.from_pretrained("shallowdream204/BitDance-ImageNet", model="BitDance_B_16x.pt",
                                               cache_dir=cache, local_files_only=True)
    for pipe in (by_name, by_repo):
        assert _same_weights(pipe.model, made[0].model)
        assert _same_weights(pipe.tokenizer, made[0].tokenizer)  # ae_d16c32.pt of the repository, picked itself
    found = resolve("BitDance-B-16x", cache_dir=cache, local_files_only=True)
    assert found.path.name == "BitDance_B_16x.pt" and found.tokenizer.name == "ae_d16c32.pt"
    assert f"snapshots/{COMMIT_A}" in found.path.as_posix()


def test_revision_picks_the_snapshot(hub):
    from bitdance import BitDancePipeline

    cache, made = hub
    for revision in ("v2", COMMIT_B):
        pipe = BitDancePipeline.from_pretrained("BitDance-B-16x", revision=revision, cache_dir=cache,
                                                local_files_only=True)
        assert _same_weights(pipe.model, made[1].model)
        assert not _same_weights(pipe.model, made[0].model)
    with pytest.raises(HubError, match="BitDance-B-16x: BitDance_B_16x.pt is not in the Hugging Face cache"):
        resolve("BitDance-B-16x", revision="v3", cache_dir=cache, local_files_only=True)


def test_tokenizers_by_name(hub):
    cache, made = hub
    for name, kw in (("d32c256", {}),
                     ("shallowdream204/BitDance-Tokenizer", {"model": "ae_d32c256.safetensors"})):
        tok = load_tokenizer(name, cache_dir=cache, local_files_only=True, **kw)
        assert _same_weights(tok, made[0].tokenizer)
    tok = load_tokenizer("BitDance-B-16x", cache_dir=cache, local_files_only=True)  # the model's own tokenizer
    assert _same_weights(tok, made[0].tokenizer)
    from bitdance import BitDancePipeline

    # a tokenizer named for a model: resolved where tokenizers are loaded, with the same hub options
    pipe = BitDancePipeline.from_pretrained("BitDance-B-16x", tokenizer="BitDance-B-16x", revision="v2",
                                            cache_dir=cache, local_files_only=True)
    assert _same_weights(pipe.model, made[1].model) and _same_weights(pipe.tokenizer, made[0].tokenizer)


def test_offline_and_not_cached_says_what_to_download(hub, tmp_path):
    from bitdance import BitDancePipeline

    cache, _ = hub
    with pytest.raises(HubError) as e:
        BitDancePipeline.from_pretrained("BitDance-B-4x", cache_dir=cache, local_files_only=True)
    msg = str(e.value)
    assert "\n" not in msg and "bitdance download BitDance-B-4x" in msg and "BitDance_B_4x.pt" in msg
    with pytest.raises(HubError, match="bitdance download BitDance-14B-64x"):
        BitDancePipeline.from_pretrained("BitDance-14B-64x", cache_dir=tmp_path, local_files_only=True)


@pytest.mark.parametrize("name, kw, message", [
    ("shallowdream204/BitDance-ImageNet", {}, "holds several models; pick one with model="),
    ("bitdance-b-16x", {}, "did you mean the released model 'BitDance-B-16x'"),
    ("no/such/place.pt", {}, "no/such/place.pt: no such file or folder$"),
    ("BitDance-B-16x", {"model": "BitDance_B_4x.pt"}, "is one model"),
    ("d32c256", {}, "is an image tokenizer, not a generator"),
])
def test_bad_names_are_one_line_errors(hub, name, kw, message):
    from bitdance import BitDancePipeline

    cache, _ = hub
    with pytest.raises(CheckpointError, match=message):
        BitDancePipeline.from_pretrained(name, cache_dir=cache, local_files_only=True, **kw)


def test_a_local_path_wins_over_a_name(hub, tmp_path, monkeypatch):
    """A folder that happens to be spelled like a repository id is the folder."""
    from bitdance import BitDancePipeline

    _, made = hub
    monkeypatch.chdir(tmp_path)
    made[1].save_pretrained(tmp_path / "shallowdream204" / "BitDance-ImageNet")
    pipe = BitDancePipeline.from_pretrained("shallowdream204/BitDance-ImageNet")
    assert _same_weights(pipe.model, made[1].model)


def test_fetched_files_go_through_the_unpickling_allow_list(tmp_path):
    """A hub file is loaded exactly as a local one: a pickle that calls a function is refused."""
    from bitdance import BitDancePipeline

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, bad)
    cache = tmp_path / "hub"
    lay_out(cache, "someone/BitDance-ImageNet-copy", {"BitDance_B_16x.pt": bad})
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        BitDancePipeline.from_pretrained("someone/BitDance-ImageNet-copy", model="BitDance_B_16x.pt",
                                         cache_dir=cache, local_files_only=True)


def test_text_to_image_folder_by_name(tmp_path):
    pytest.importorskip("transformers")
    case = T2I_CASE / "t2i_p4_64x64" / "model"
    if not case.is_dir():
        pytest.skip(f"no reference text-to-image folder at {case}")
    from bitdance import BitDancePipeline
    from bitdance.pipelines.text_to_image import BitDanceT2IPipeline

    cache = tmp_path / "hub"
    files = {p.name: p for p in case.iterdir() if p.is_file()}
    (tmp_path / "README.md").write_text("not fetched")
    files["README.md"] = tmp_path / "README.md"
    snapshot = lay_out(cache, RELEASED["BitDance-14B-64x"].repo_id, files)
    pipe = BitDancePipeline.from_pretrained("BitDance-14B-64x", cache_dir=cache, local_files_only=True)
    assert isinstance(pipe, BitDanceT2IPipeline)
    direct = BitDanceT2IPipeline.from_pretrained(case)
    assert _same_weights(pipe.model, direct.model)
    assert (snapshot / "README.md").exists()  # in the cache, but not among what the loader asked for


def _cli(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "bitdance.apps.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_takes_names_offline(hub, tmp_path):
    """HF_HOME + HF_HUB_OFFLINE=1, as a user without a network would have them: download, info, sample and
    presets --released by name; a name that is not cached is one line saying what to download."""
    cache, _ = hub
    home = tmp_path / "hf"
    home.mkdir()
    shutil.copytree(cache, home / "hub", symlinks=True)
    p = _cli(["download", "BitDance-B-16x"], home)
    assert p.returncode == 0, p.stderr
    assert f"snapshots/{COMMIT_A}/BitDance_B_16x.pt" in p.stdout and "ae_d16c32.pt" in p.stdout
    p = _cli(["download", "BitDance-B-16x", "--dir", str(tmp_path / "copy")], home)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "copy" / "BitDance_B_16x.pt").is_file() and (tmp_path / "copy" / "ae_d16c32.pt").is_file()
    p = _cli(["info", "BitDance-B-16x", "--revision", "v2", "--json"], home)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["kind"] == "class_conditional"
    out = tmp_path / "grid.png"
    p = _cli(["sample", "shallowdream204/BitDance-ImageNet", "--model-file", "BitDance_B_16x.pt", "--classes", "1",
              "--steps", "2", "--out", str(out)], home)
    assert p.returncode == 0, p.stderr
    assert out.is_file()
    p = _cli(["sample", "BitDance-H-1x", "--classes", "1", "--out", str(tmp_path / "no.png")], home)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].endswith("or copy its cache folder "
                                                      "(models--shallowdream204--BitDance-ImageNet) here")
    assert "bitdance download BitDance-H-1x" in p.stderr and not (tmp_path / "no.png").exists()
    p = _cli(["presets", "--released"], home)
    assert p.returncode == 0 and all(name in p.stdout for name in RELEASED)
