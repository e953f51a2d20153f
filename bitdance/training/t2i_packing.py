"""Text-to-image training arithmetic: packed variable-length batches, the loss and 16 -> 64 distillation.

Several (prompt, latents) samples of possibly different resolutions are packed into one row (each sees
only itself, positions restart per sample) so that a batch wastes no padding; :func:`training_loss` is the
head's velocity loss per block of P plus a small text cross-entropy; :func:`distill_from` turns a P = 16
model into a P = 64 one that inherits every weight.
"""


from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bitdance.models.t2i import BitDanceT2I, add_special_tokens, additive_mask, query_token
from bitdance.models.transformer import flip_bits, generation_order
from bitdance.sampling import block_mask

__all__ = ["IGNORE_INDEX", "PackedBatch", "pack_batch", "packed_embeddings", "packed_head_condition",
           "training_loss", "distill_from"]


IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """Several (prompt, latents) samples packed into one row (batch dim 1) of length T.

    Image inputs are kept as tokens (not embeddings) so that :func:`training_loss` can perturb them
    before :func:`packed_embeddings` projects them. ``cond_index`` / ``targets`` / ``target_pos_embed``
    are ordered sample by sample, block by block, so they reshape to (num_blocks, P, ...).
    """

    input_ids: torch.Tensor  # (1, T) text / special ids; image positions hold the pad id (unused)
    image_index: torch.Tensor  # (N_in,) sequence positions of the fed image tokens
    image_tokens: torch.Tensor  # (N_in, d) clean fed tokens in {-1,+1}
    image_pos_embed: torch.Tensor  # (N_in, hidden) 2D sin-cos of the fed tokens' own positions
    mask: torch.Tensor  # (1, T, T) bool, True = may attend
    position_ids: torch.Tensor  # (1, T) RoPE positions restarting at 0 for each sample
    labels: torch.Tensor  # (1, T) next-token text targets, IGNORE_INDEX elsewhere
    cond_index: torch.Tensor  # (M,) positions whose hidden states condition the head
    targets: torch.Tensor  # (M, d) clean tokens to predict
    target_pos_embed: torch.Tensor  # (M, hidden) 2D sin-cos of the predicted positions
    sample_ids: torch.Tensor  # (T,) sample index of each position
    dropped: list[bool]  # per sample: True if the prompt was replaced by the unconditional form
    grids: list[tuple[int, int]]  # per sample (h, w) token grid


def pack_batch(model: BitDanceT2I, samples: Sequence[tuple[str, torch.Tensor]], *, text_dropout: float = 0.1,
               generator: torch.Generator | None = None) -> PackedBatch:
    """Pack (prompt, latents (d, h, w) in {-1,+1}) samples of possibly different resolutions into one row.

    Each sample contributes its text (with probability ``text_dropout`` the unconditional form, drawn with
    ``generator``), ``<|vision_start|>``, ``<|res_h|>``, the first block ``[<|res_w|>, queries]`` and its
    image tokens in patch-wise order except the last block (which is only predicted). The mask is
    (causal OR same image block) AND same sample; RoPE positions restart at 0 for each sample. Text
    labels: next-token targets inside the chat-formatted conditional text (``<|im_start|>user`` ...
    ``assistant\\n``); dropped (unconditional) samples have no text targets.
    """
    cfg = model.config
    P, d = cfg.parallel_num, cfg.latent_dim
    pad = model.text_tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    ids, labels, pos_ids, sids, blk_ids = [], [], [], [], []
    img_idx, img_tok, img_pe, cond_idx, tgt, tgt_pe = [], [], [], [], [], []
    dropped, grids = [], []
    offset = 0
    next_blk = 0  # global block counter (text positions get a block of their own)
    for s, (prompt, lat) in enumerate(samples):
        if lat.dim() != 3 or lat.shape[0] != d:
            raise ValueError(f"sample {s}: latents must be (d={d}, h, w), got {tuple(lat.shape)}")
        h, w = int(lat.shape[1]), int(lat.shape[2])
        cfg.check_resolution(h * cfg.down_factor, w * cfg.down_factor)
        drop = text_dropout > 0 and float(torch.rand((), generator=generator)) < text_dropout
        text = model.text_ids(model.prompt_text(None if drop else prompt))
        prefix = model.prefix_ids(None if drop else prompt, h)  # the text, <|vision_start|>, <|res_h|>
        Lp = len(prefix)
        n_blocks = (h * w) // P
        L = Lp + P * n_blocks
        seq = prefix + model.first_block_ids(w) + [pad] * (P * (n_blocks - 1))
        lab = [IGNORE_INDEX] * L
        if not drop:
            for j in range(len(text) - 1):
                lab[j] = text[j + 1]
        ids += seq
        labels += lab
        pos_ids += list(range(L))
        sids += [s] * L
        blk_ids += list(range(next_blk, next_blk + Lp))
        blk_ids += [next_blk + Lp + i // P for i in range(P * n_blocks)]
        next_blk += Lp + n_blocks

        order = generation_order(h, w, cfg.patch_size)
        tokens = lat.reshape(d, h * w).t()[order]  # (h*w, d) generation order
        pe = model.image_pos_embed(h, w)
        start_img = offset + Lp + P
        img_idx.append(torch.arange(start_img, offset + L))
        img_tok.append(tokens[:-P])
        img_pe.append(pe[:-P])
        cond_idx.append(torch.arange(offset + Lp, offset + L))
        tgt.append(tokens)
        tgt_pe.append(pe)
        dropped.append(drop)
        grids.append((h, w))
        offset += L
    if not grids:
        raise ValueError("no samples")
    sid = torch.tensor(sids)
    blk = torch.tensor(blk_ids)
    mask = block_mask(blk) & (sid[None, :] == sid[:, None])  # packed samples never see each other
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long), image_index=torch.cat(img_idx),
        image_tokens=torch.cat(img_tok).float(), image_pos_embed=torch.cat(img_pe), mask=mask[None],
        position_ids=torch.tensor([pos_ids], dtype=torch.long), labels=torch.tensor([labels], dtype=torch.long),
        cond_index=torch.cat(cond_idx), targets=torch.cat(tgt).float(), target_pos_embed=torch.cat(tgt_pe),
        sample_ids=sid, dropped=dropped, grids=grids)


def packed_embeddings(model: BitDanceT2I, packed: PackedBatch, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(1, T, hidden) LLM inputs: text embeddings, with the image positions replaced by
    projector(tokens) + their 2D sin-cos (``image_tokens`` overrides ``packed.image_tokens``, e.g. flipped)."""
    dev = model.device
    emb = model.llm.get_input_embeddings()(packed.input_ids.to(dev))
    toks = packed.image_tokens if image_tokens is None else image_tokens
    if toks.shape[0] == 0:
        return emb
    img = model.embed_image_tokens(toks.to(dev), packed.image_pos_embed.to(dev)).to(emb.dtype)
    idx = packed.image_index.to(dev)
    return emb.index_copy(1, idx, img[None])


def packed_head_condition(model: BitDanceT2I, packed: PackedBatch,
                          image_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM forward over the packed row -> (head condition (M, hidden) = hidden state + 2D sin-cos of the
    predicted position, the full last hidden state (1, T, hidden))."""
    dev, ldt = model.device, model.llm_dtype
    embeds = packed_embeddings(model, packed, image_tokens)
    hid = model.llm.model(inputs_embeds=embeds.to(ldt), attention_mask=additive_mask(packed.mask.to(dev), ldt),
                          position_ids=packed.position_ids.to(dev), use_cache=False).last_hidden_state
    cond = hid[0, packed.cond_index.to(dev)].float() + packed.target_pos_embed.to(dev)
    return cond, hid


def training_loss(model: BitDanceT2I, packed: PackedBatch, *, text_weight: float = 0.01, perturb_rate: float = 0.1,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Vision loss (head velocity MSE, per block of P) + ``text_weight`` x text cross-entropy.

    Bit flips (r1 < perturb_rate * r2) apply to the fed image tokens only; the head targets stay clean.
    The head's time distribution comes from the config (``P_mean`` / ``P_std``; -0.8 / 0.8 in training).
    """
    P, d = model.config.parallel_num, model.config.latent_dim
    dev = model.device
    toks = flip_bits(packed.image_tokens.to(dev), perturb_rate, generator=generator) if perturb_rate > 0 \
        else packed.image_tokens.to(dev)
    cond, hid = packed_head_condition(model, packed, toks)
    head_dtype = model.vision_head.net.cond_embed.weight.dtype
    cond = cond.to(head_dtype).view(-1, P, cond.shape[-1])
    targets = packed.targets.to(dev).view(-1, P, d)
    vision = model.vision_head.loss(targets, cond, generator=generator)
    labels = packed.labels.to(dev)
    # Next-token targets live at the position *before* the target token: labels[j] = ids[j + 1].
    sel = labels[0] != IGNORE_INDEX
    if bool(sel.any()):
        logits = model.llm.lm_head(hid[0, sel]).float()
        text = F.cross_entropy(logits, labels[0, sel])
    else:
        text = vision.new_zeros(())
    loss = vision + text_weight * text
    logs = {"loss": float(loss.detach()), "vision": float(vision.detach()), "text": float(text.detach()),
            "num_image_tokens": int(targets.shape[0] * P), "num_text_targets": int(sel.sum())}
    return loss, logs


def distill_from(model16: BitDanceT2I, *, parallel_num: int = 64, **config_overrides) -> BitDanceT2I:
    """A model with ``parallel_num`` tokens per step inheriting every weight of ``model16`` (LLM, projector,
    vision head, image tokenizer; all copied, ``model16`` is left unchanged).

    The head's weights do not depend on P. Missing ``<|query_i|>`` tokens are added to (a copy of) the
    tokenizer and the embeddings are resized; each new query embedding (and, for an untied LM head, its
    output row) is initialised to the **mean of the existing query embeddings** ``<|query_1|>`` ..
    ``<|query_{P_old-1}|>`` (the new tokens start as an "average query"; RoPE positions tell them apart).
    ``config_overrides`` set other T2IConfig fields (e.g. ``resolutions``). Fine-tune with more
    :func:`training_loss` steps.
    """
    import copy
    from dataclasses import replace

    old_cfg = model16.config
    cfg = replace(old_cfg, parallel_num=parallel_num, **config_overrides)
    tok = copy.deepcopy(model16.text_tokenizer)
    llm = copy.deepcopy(model16.llm)
    add_special_tokens(tok, parallel_num, cfg.max_res_tokens)
    old_ids = [model16.token_id(query_token(i)) for i in range(1, old_cfg.parallel_num)]
    emb = llm.get_input_embeddings()
    if len(tok) > emb.num_embeddings:
        llm.resize_token_embeddings(len(tok), mean_resizing=False)
    vocab = tok.get_vocab()
    new_ids = [vocab[query_token(i)] for i in range(old_cfg.parallel_num, parallel_num)]
    with torch.no_grad():
        tables = [llm.get_input_embeddings().weight]
        out = llm.get_output_embeddings()
        if out is not None and out.weight is not tables[0]:
            tables.append(out.weight)
        for W in tables:
            if old_ids:
                init = W[old_ids].float().mean(0).to(W.dtype)
            else:  # P_old = 1: no query tokens to copy from
                init = W.float().mean(0).to(W.dtype)
            W[new_ids] = init
    ae = copy.deepcopy(model16.ae) if model16.ae is not None else None
    new = BitDanceT2I(llm, tok, cfg, ae=ae)
    new.projector.load_state_dict(model16.projector.state_dict())
    new.vision_head.load_state_dict(model16.vision_head.state_dict())
    p = next(model16.projector.parameters())
    new.projector.to(device=p.device, dtype=p.dtype)
    hp = next(model16.vision_head.parameters())
    new.vision_head.to(device=hp.device, dtype=hp.dtype)
    return new.train(model16.training)
