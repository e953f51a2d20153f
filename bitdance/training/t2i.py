"""The text-to-image training task (:class:`T2ITask`) that :class:`bitdance.training.Trainer` runs: captioned
images at mixed resolutions, a Qwen3 LLM (pretrained, from scratch, or distilled), packed batches
(:mod:`bitdance.training.t2i_packing`) and an export in the released folder layout.
"""


import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bitdance.data import fetch_batch
from bitdance.formats.t2i_folder import FIELDS_BESIDE_HEAD_JSON, HEAD_CONFIG, load_folder
from bitdance.models.config import T2IConfig
from bitdance.models.t2i import BitDanceT2I, add_special_tokens
from bitdance.training.config import TrainConfig, TrainingError
from bitdance.training.distributed import Dist
from bitdance.training.t2i_packing import distill_from, pack_batch, training_loss
from bitdance.training.tasks import Task, cached_or_encoded, latent_cache_path, load_data

__all__ = ["T2ITask", "T2ITrainModule", "parse_resolutions", "dataset_captions"]


# --------------------------------------------------------------------------------------------
# Text-to-image task: a Qwen3 LLM + projector + vision head on a frozen binary tokenizer
# --------------------------------------------------------------------------------------------
class _Spec:
    """What the checkpoint records as ``model_config`` (compared on resume)."""

    def __init__(self, d: dict):
        self.d = json.loads(json.dumps(d, default=str))  # plain types only: the safe loader reads it back

    def to_dict(self) -> dict:
        return self.d


def parse_resolutions(spec: str, default: int) -> tuple[list[tuple[int, int]], list[float]]:
    """``"32x32:3,16x16:1"`` (HxW pixels, optional sampling weight) -> ([(32, 32), (16, 16)], [3.0, 1.0])."""
    if not spec.strip():
        return [(default, default)], [1.0]
    res, weights = [], []
    for item in spec.split(","):
        try:
            size, _, w = item.strip().partition(":")
            h, _, wd = size.lower().partition("x")
            res.append((int(h), int(wd or h)))
            weights.append(float(w) if w else 1.0)
        except ValueError:
            raise TrainingError(f"bad --resolutions item {item!r}; expected HxW[:weight], e.g. 32x32:3") from None
    if any(h < 1 or w < 1 for h, w in res) or any(not x > 0 for x in weights) or len(set(res)) != len(res):
        raise TrainingError(f"bad --resolutions {spec!r}: positive sizes and weights, each size once")
    return res, weights


def dataset_captions(ds) -> list[str]:
    """Captions of a dataset: ``ds.captions`` (Twemoji), or for an image folder the text of a sidecar
    ``<image>.txt`` if there is one, else the class folder name (``_`` -> space)."""
    if hasattr(ds, "captions"):
        return [str(c) for c in ds.captions]
    if hasattr(ds, "samples") and hasattr(ds, "class_names"):
        out = []
        for path, label in ds.samples:
            side = Path(path).with_suffix(".txt")
            text = side.read_text(encoding="utf-8").strip() if side.is_file() else ""
            out.append(text or ds.class_names[label].replace("_", " "))
        return out
    raise TrainingError(f"dataset {type(ds).__name__} has no captions (t2i needs Twemoji or an image folder)")


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 3, S, S') -> (B, 3, h, w): centre crop to the aspect ratio, then antialiased bicubic."""

    H, W = x.shape[-2:]
    if H * w != W * h:  # crop the longer side
        if H * w > W * h:
            ch = round(W * h / w)
            x = x[..., (H - ch) // 2:(H - ch) // 2 + ch, :]
        else:
            cw = round(H * w / h)
            x = x[..., :, (W - cw) // 2:(W - cw) // 2 + cw]
    if tuple(x.shape[-2:]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


class T2ITrainModule(nn.Module):
    """The trained T2I model behind one ``forward`` (= :func:`bitdance.training.t2i_packing.training_loss`), so that
    DDP / FSDP see a normal module call; ``net`` is the :class:`bitdance.models.t2i.BitDanceT2I`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def layers(self):  # FSDP shards these blocks one by one
        return self.net.llm.model.layers

    def forward(self, packed, *, text_weight: float, perturb_rate: float, generator=None):

        loss, logs = training_loss(self.net, packed, text_weight=text_weight, perturb_rate=perturb_rate,
                                   generator=generator)
        if logs["num_text_targets"] == 0:  # all prompts dropped: keep the LM head in the graph for DDP
            loss = loss + 0.0 * self.net.llm.get_output_embeddings().weight.sum()
        return loss, logs


class T2ITask(Task):
    """Text-to-image training: captions + images encoded by a frozen binary tokenizer, packed
    mixed-resolution rows (:func:`bitdance.training.t2i_packing.pack_batch`), vision + ``text_weight`` x text loss."""


    def __init__(self, cfg: TrainConfig, d: Dist, log):
        from dataclasses import fields as dc_fields

        from bitdance.formats.official import load_tokenizer
        from bitdance.formats.weights import CheckpointError

        self.cfg = cfg
        self.data = load_data(cfg)
        self.captions = dataset_captions(self.data)
        size = cfg.image_size or self.data.image_size
        self.res, self.res_weights = parse_resolutions(cfg.resolutions, size)
        valid = {f.name for f in dc_fields(T2IConfig)}
        over = dict(cfg.model_overrides)
        bad = sorted(set(over) - valid)
        if bad:
            raise TrainingError(f"t2i --model-overrides: unknown T2IConfig field(s) {bad}; valid: {sorted(valid)}")
        over.setdefault("P_mean", -0.8)  # the training time distribution of the release
        over.setdefault("P_std", 0.8)
        try:
            net = self._build(cfg, over, log)
        except (CheckpointError, OSError) as e:
            raise TrainingError(str(e).splitlines()[0]) from None
        if getattr(net, "ae", None) is not None:  # --tokenizer (loaded by _build) or the folder's ae
            self.tokenizer = net.ae
        elif cfg.tokenizer:
            self.tokenizer = load_tokenizer(cfg.tokenizer)
        else:
            raise TrainingError("t2i training needs the image tokenizer: --tokenizer PATH (or a folder with ae.safetensors)")
        net.ae = None  # frozen and outside the trained module; added back on export
        tok = self.tokenizer
        if tok.bits != net.config.latent_dim or tok.down_factor != net.config.down_factor:
            raise TrainingError(f"image tokenizer has {tok.bits} bits / down factor {tok.down_factor}; the model "
                                f"expects {net.config.latent_dim} / {net.config.down_factor}")
        for h, w in self.res:
            try:
                net.config.check_resolution(h, w)
            except ValueError as e:
                raise TrainingError(str(e)) from None
        self.tokenizer = tok.to(d.device).eval()
        for p in self.tokenizer.parameters():
            p.requires_grad_(False)
        self.t2i_config = net.config
        self.text_tokenizer = net.text_tokenizer
        self.llm_config = net.llm.config
        self.model = T2ITrainModule(net.float()).to(d.device)
        llm_d = {k: v for k, v in self.llm_config.to_dict().items()
                 if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
        self.model_config = _Spec({"llm": llm_d, "t2i": dataclasses.asdict(self.t2i_config),
                                   "vocab": len(self.text_tokenizer)})
        self.latents: dict[tuple[int, int], torch.Tensor] = {}
        if cfg.cache_latents:
            for r in self.res:
                self.latents[r] = self._cached_latents(r, d, log)

    # model --------------------------------------------------------------------------------------
    def _build(self, cfg: TrainConfig, over: dict, log):
        from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM


        folder_kw = {k: over[k] for k in FIELDS_BESIDE_HEAD_JSON if k in over}
        folder_kw.setdefault("resolutions", tuple(self.res))
        if cfg.distill_from:
            teacher = load_folder(cfg.distill_from, dtype=torch.float32, load_ae=not cfg.tokenizer,
                                              **folder_kw)
            rest = {k: v for k, v in over.items() if k != "parallel_num"}
            rest.setdefault("resolutions", tuple(self.res))
            log(f"distilling {cfg.distill_from} (P={teacher.config.parallel_num}) into "
                f"P={over.get('parallel_num', 64)}")
            net = distill_from(teacher, parallel_num=over.get("parallel_num", 64), **rest)
            return net
        if cfg.llm and (Path(cfg.llm) / HEAD_CONFIG).is_file():  # continue from a T2I folder
            net = load_folder(cfg.llm, dtype=torch.float32, load_ae=not cfg.tokenizer, **folder_kw)
            for k, v in over.items():
                if k not in folder_kw and getattr(net.config, k) != v and k not in ("P_mean", "P_std"):
                    raise TrainingError(f"--model-overrides {k}={v!r} conflicts with {cfg.llm} ({getattr(net.config, k)!r})")
            net.config.P_mean, net.config.P_std = over["P_mean"], over["P_std"]
            net.vision_head.config = net.config.head_config(net.hidden_size)
            return net
        tok_path = cfg.text_tokenizer or cfg.llm
        if not tok_path:
            raise TrainingError("t2i from scratch needs --text-tokenizer FOLDER (a Hugging Face tokenizer)")
        if not Path(tok_path).is_dir():
            raise TrainingError(f"{tok_path}: no such tokenizer folder")
        text_tok = AutoTokenizer.from_pretrained(tok_path)
        if text_tok.pad_token_id is None:
            text_tok.pad_token = text_tok.eos_token or text_tok.unk_token
        P = over.get("parallel_num", T2IConfig.parallel_num)
        add_special_tokens(text_tok, P, over.get("max_res_tokens", 256))
        if cfg.llm:
            if not (Path(cfg.llm) / "config.json").is_file():
                raise TrainingError(f"{cfg.llm}: not a Hugging Face model folder (no config.json)")
            llm = Qwen3ForCausalLM.from_pretrained(cfg.llm, dtype=torch.float32)
            if len(text_tok) > llm.get_input_embeddings().num_embeddings:
                llm.resize_token_embeddings(len(text_tok), mean_resizing=False)
        else:
            lc = dict(cfg.llm_config)
            hidden = int(lc.get("hidden_size", 256))
            heads = int(lc.get("num_attention_heads", max(1, hidden // 64)))
            defaults = {"hidden_size": hidden, "num_hidden_layers": 4, "num_attention_heads": heads,
                        "num_key_value_heads": heads, "head_dim": hidden // heads, "intermediate_size": 3 * hidden,
                        "max_position_embeddings": 4096, "tie_word_embeddings": True}
            try:
                qcfg = Qwen3Config(**{**defaults, **lc, "vocab_size": len(text_tok)})
            except (TypeError, ValueError) as e:
                raise TrainingError(f"--llm-config: {e}") from None
            llm = Qwen3ForCausalLM(qcfg)
        hidden = llm.config.hidden_size
        over.setdefault("head_width", hidden)
        over.setdefault("head_dim", 128 if hidden >= 1024 else 64 if hidden % 64 == 0 else 32)
        ae_like = None
        if cfg.tokenizer:
            from bitdance.formats.official import load_tokenizer

            ae_like = load_tokenizer(cfg.tokenizer)
            over.setdefault("latent_dim", ae_like.bits)
            over.setdefault("down_factor", ae_like.down_factor)
        over.setdefault("resolutions", tuple(self.res))
        try:
            t2i_cfg = T2IConfig(**over)
            return BitDanceT2I(llm, text_tok, t2i_cfg, ae=ae_like)
        except (ValueError, TypeError) as e:
            raise TrainingError(f"t2i model: {e}") from None

    def export(self, wrapper: nn.Module, out: Path, step: int) -> None:
        """OUT/model in the released folder layout (bitdance.formats.t2i_folder.save_folder), written to a temporary
        sibling folder and swapped in, so a crash never leaves a half-written model."""
        import copy
        import dataclasses

        from bitdance.pipelines.text_to_image import BitDanceT2IPipeline

        net = wrapper.net
        net.ae = copy.deepcopy(self.tokenizer).float().cpu()
        net.cpu()
        # The trained resolutions become the model's allowed list (stored in config.json under
        # "bitdance"), so BitDancePipeline.from_pretrained(OUT/model) accepts them as they are.
        trained = tuple(tuple(int(v) for v in r) for r in self.res)
        if not net.config.allow_any_resolution:
            net.config = dataclasses.replace(net.config, resolutions=tuple(dict.fromkeys(trained)))
        meta = {"step": step, "resolutions": [list(r) for r in trained]}
        BitDanceT2IPipeline(net, meta=meta).save_pretrained(out / "model")


    def preview(self, net: nn.Module, device, seed: int) -> np.ndarray:
        from bitdance.images import make_grid

        arr = self.sample_images(net, self.sample_prompts(), seed=seed)
        return make_grid(arr, len(arr))

    def new_model(self) -> nn.Module:
        """A fresh module of the trained structure (weights to be loaded)."""
        import copy

        from transformers import Qwen3ForCausalLM


        llm = Qwen3ForCausalLM(copy.deepcopy(self.llm_config))
        return T2ITrainModule(BitDanceT2I(llm, self.text_tokenizer, self.t2i_config))


    # data ---------------------------------------------------------------------------------------
    def _images(self, idx: torch.Tensor, res: tuple[int, int]) -> torch.Tensor:
        x, _ = fetch_batch(self.data, idx)
        return _resize(x.float(), *res)

    def _cached_latents(self, res: tuple[int, int], d: Dist, log) -> torch.Tensor:
        size = self.cfg.image_size or self.data.image_size
        path = latent_cache_path(self.tokenizer, self.cfg,
                                  f"t2i|{self.cfg.data}|{self.cfg.split}|{size}|{res}|{len(self.data)}")

        @torch.no_grad()
        def encode() -> torch.Tensor:
            out = []
            for s in range(0, len(self.data), 256):
                x = self._images(torch.arange(s, min(s + 256, len(self.data))), res).to(d.device)
                out.append(self.tokenizer.encode(x).to(torch.int8).cpu())
            return torch.cat(out)

        return cached_or_encoded(path, len(self.data), d, log, f" at {res[0]}x{res[1]}", encode)

    def loss(self, model, idx: torch.Tensor, device, g: torch.Generator):

        cfg = self.cfg
        # A CPU generator for the host-side draws (resolution, text dropout), seeded from this micro-batch's.
        cg = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,), generator=g, device=g.device)))
        choice = torch.multinomial(torch.tensor(self.res_weights), len(idx), replacement=True, generator=cg)
        samples = []
        for j, i in enumerate(idx.tolist()):
            r = self.res[int(choice[j])]
            if r in self.latents:
                lat = self.latents[r][i].float()
            else:
                with torch.no_grad():
                    lat = self.tokenizer.encode(self._images(torch.tensor([i]), r).to(device))[0].float().cpu()
            samples.append((self.captions[i], lat))
        net = self.model.net
        packed = pack_batch(net, samples, text_dropout=cfg.text_dropout, generator=cg)
        loss, logs = model(packed, text_weight=cfg.text_weight, perturb_rate=cfg.perturb_rate, generator=g)
        return loss, {"loss": loss.detach(), "vision": torch.tensor(logs["vision"]),
                      "text": torch.tensor(logs["text"])}

    # sampling -----------------------------------------------------------------------------------
    def sample_prompts(self, n: int = 8) -> list[str]:
        if self.cfg.sample_prompts.strip():
            return [p.strip() for p in self.cfg.sample_prompts.split("|") if p.strip()]
        step = max(1, len(self.captions) // n)
        return [self.captions[i] for i in range(0, len(self.captions), step)][:n]

    @torch.no_grad()
    def sample_images(self, wrapper: nn.Module, prompts: list[str], *, seed: int = 0, num_steps: int = 25,
                      guidance_scale: float = 4.0, res: tuple[int, int] | None = None) -> np.ndarray:
        """(len(prompts), H, W, 3) uint8 generated at ``res`` (default: the first training resolution)."""
        from bitdance.images import to_uint8
        from bitdance.sampling.flow import FlowSampler

        h, w = res or self.res[0]
        net = wrapper.net
        dev = net.device
        g = torch.Generator(device=dev).manual_seed(seed)
        lat = net.generate(prompts, height=h, width=w, sampler=FlowSampler(num_steps=num_steps),
                           guidance_scale=guidance_scale, generator=g)
        img = self.tokenizer.decode(lat.to(next(self.tokenizer.parameters()).dtype))
        return to_uint8(img).numpy()
