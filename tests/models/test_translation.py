"""The translation Sinkformer (zoo/models/translation.py): fairseq's parameter names and, at n_iter=1, fairseq's
function (checked against an independent fairseq-style forward written here with F.multi_head_attention_forward);
padding invariance with n_iter 1 and 3; incremental decoding; greedy and beam search; fairseq checkpoints (written
here as fairseq writes them: a dict with an argparse Namespace or a cfg, saved with torch.save) and their errors;
saving and reloading. CPU, random weights, no fairseq."""

from __future__ import annotations

import argparse
import functools
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import zoo
from converters.fairseq_checkpoint import from_fairseq_checkpoint, read_fairseq_checkpoint
from zoo.data.translation import Dictionary
from zoo.errors import ZooError
from zoo.models.translation import (
    SinkformerTranslation,
    sinkformer_transformer_iwslt_de_en,
    sinkformer_transformer_numbers,
    sinkformer_transformer_toy,
    transformer_iwslt_de_en,
)
from zoo.tasks.optim import InverseSqrtLR
from zoo.tasks.translation import beam_search, greedy_search

# fairseq passes a bool key padding mask with a float future mask, as the reference does
pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask"),
    pytest.mark.usefixtures("one_thread"),
]

PAD, EOS = 1, 2

C, H, FFN = 16, 2, 24  # a small width for the reference checks
VS, VT = 29, 23


# ================================================================================================ fairseq reference


def fairseq_args(**overrides: Any) -> argparse.Namespace:
    """The args a fairseq ``transformer_iwslt_de_en`` training writes (after the arch function), small sizes."""
    args = dict(
        arch="transformer_iwslt_de_en",
        encoder_embed_dim=C,
        encoder_ffn_embed_dim=FFN,
        encoder_layers=2,
        encoder_attention_heads=H,
        decoder_embed_dim=C,
        decoder_ffn_embed_dim=FFN,
        decoder_layers=2,
        decoder_attention_heads=H,
        encoder_normalize_before=False,
        decoder_normalize_before=False,
        encoder_learned_pos=False,
        decoder_learned_pos=False,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_fn="relu",
        dropout=0.3,
        adaptive_softmax_cutoff=None,
        adaptive_softmax_dropout=0,
        share_decoder_input_output_embed=True,
        share_all_embeddings=False,
        no_token_positional_embeddings=False,
        adaptive_input=False,
        no_cross_attention=False,
        cross_self_attention=False,
        decoder_output_dim=C,
        decoder_input_dim=C,
        no_scale_embedding=False,
        layernorm_embedding=False,
        tie_adaptive_weights=False,
        checkpoint_activations=False,
        encoder_layers_to_keep=None,
        decoder_layers_to_keep=None,
        encoder_layerdrop=0,
        decoder_layerdrop=0,
        quant_noise_pq=0,
        quant_noise_pq_block_size=8,
        quant_noise_scalar=0,
        max_source_positions=1024,
        max_target_positions=1024,
        task="translation",
        criterion="label_smoothed_cross_entropy",
        label_smoothing=0.1,
        lr=[5e-4],
        optimizer="adam",
        adam_betas="(0.9, 0.98)",
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def fairseq_state_dict(args: argparse.Namespace, vs: int = VS, vt: int = VT, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random fairseq TransformerModel state dict, key by key as fairseq names them."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.3, offset: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + offset

    sd: dict[str, torch.Tensor] = {}
    shared = args.share_all_embeddings
    for side, layers, ffn, vocab in (
        ("encoder", args.encoder_layers, args.encoder_ffn_embed_dim, vs),
        ("decoder", args.decoder_layers, args.decoder_ffn_embed_dim, vt),
    ):
        sd[f"{side}.version"] = torch.Tensor([3])
        emb = sd["encoder.embed_tokens.weight"] if shared and side == "decoder" else r(vocab, C)
        emb[PAD] = 0
        sd[f"{side}.embed_tokens.weight"] = emb
        if getattr(args, f"{side}_learned_pos"):
            sd[f"{side}.embed_positions.weight"] = r(1024 + PAD + 1, C)
        else:
            sd[f"{side}.embed_positions._float_tensor"] = torch.FloatTensor(1)
        if args.layernorm_embedding:
            sd[f"{side}.layernorm_embedding.weight"] = r(C, scale=0.1, offset=1.0)
            sd[f"{side}.layernorm_embedding.bias"] = r(C, scale=0.1)
        attns = ("self_attn", "encoder_attn") if side == "decoder" else ("self_attn",)
        for i in range(layers):
            p = f"{side}.layers.{i}"
            for attn in attns:
                for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                    sd[f"{p}.{attn}.{proj}.weight"] = r(C, C)
                    sd[f"{p}.{attn}.{proj}.bias"] = r(C, scale=0.1)
                sd[f"{p}.{attn}_layer_norm.weight"] = r(C, scale=0.1, offset=1.0)
                sd[f"{p}.{attn}_layer_norm.bias"] = r(C, scale=0.1)
            sd[f"{p}.fc1.weight"], sd[f"{p}.fc1.bias"] = r(ffn, C), r(ffn, scale=0.1)
            sd[f"{p}.fc2.weight"], sd[f"{p}.fc2.bias"] = r(C, ffn), r(C, scale=0.1)
            sd[f"{p}.final_layer_norm.weight"] = r(C, scale=0.1, offset=1.0)
            sd[f"{p}.final_layer_norm.bias"] = r(C, scale=0.1)
        if getattr(args, f"{side}_normalize_before"):
            sd[f"{side}.layer_norm.weight"] = r(C, scale=0.1, offset=1.0)
            sd[f"{side}.layer_norm.bias"] = r(C, scale=0.1)
    sd["decoder.output_projection.weight"] = (
        sd["decoder.embed_tokens.weight"] if args.share_decoder_input_output_embed or shared else r(vt, C)
    )
    return sd


def ref_positions(tokens: torch.Tensor, args: argparse.Namespace, sd: dict, side: str) -> torch.Tensor:
    """fairseq's positions: pad + 1, pad + 2 ... over the non-pad tokens; sinusoids or the learned table."""
    valid = tokens.ne(PAD)
    pos = torch.cumsum(valid.long(), 1) * valid + PAD
    if getattr(args, f"{side}_learned_pos"):
        return sd[f"{side}.embed_positions.weight"][pos]
    half = C // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    ang = pos.unsqueeze(-1).float() * freq
    emb = torch.cat([ang.sin(), ang.cos()], -1)
    return emb.masked_fill(~valid.unsqueeze(-1), 0.0)


def ref_mha(
    q_in: torch.Tensor,
    kv: torch.Tensor,
    sd: dict,
    p: str,
    heads: int,
    kpm: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """fairseq MultiheadAttention's F.multi_head_attention_forward path, (T, B, C) layout."""
    out, _ = F.multi_head_attention_forward(
        q_in,
        kv,
        kv,
        C,
        heads,
        in_proj_weight=None,
        in_proj_bias=torch.cat([sd[f"{p}.q_proj.bias"], sd[f"{p}.k_proj.bias"], sd[f"{p}.v_proj.bias"]]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=sd[f"{p}.out_proj.weight"],
        out_proj_bias=sd[f"{p}.out_proj.bias"],
        training=False,
        key_padding_mask=kpm,
        need_weights=False,
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=sd[f"{p}.q_proj.weight"],
        k_proj_weight=sd[f"{p}.k_proj.weight"],
        v_proj_weight=sd[f"{p}.v_proj.weight"],
    )
    return out


def ln(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.layer_norm(x, (C,), sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5)


def ref_forward(
    args: argparse.Namespace, sd: dict, src: torch.Tensor, prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's TransformerModel forward in eval mode (TransformerEncoder / TransformerDecoder, post- or pre-norm):
    encoder output (B, S, C) and decoder log-probs (B, T, V)."""
    pre_e, pre_d = args.encoder_normalize_before, args.decoder_normalize_before

    def sublayer(x: torch.Tensor, p_norm: str, fn: Any, pre: bool) -> torch.Tensor:
        y = fn(ln(x, sd, p_norm) if pre else x)
        return x + y if pre else ln(x + y, sd, p_norm)

    def ffn(p: str) -> Any:
        return lambda h: F.linear(
            F.relu(F.linear(h, sd[f"{p}.fc1.weight"], sd[f"{p}.fc1.bias"])), sd[f"{p}.fc2.weight"], sd[f"{p}.fc2.bias"]
        )

    # encoder (T x B x C)
    pad = src.eq(PAD)
    x = math.sqrt(C) * sd["encoder.embed_tokens.weight"][src] + ref_positions(src, args, sd, "encoder")
    if args.layernorm_embedding:
        x = ln(x, sd, "encoder.layernorm_embedding")
    x = (x * (1 - pad.unsqueeze(-1).float())).transpose(0, 1)
    kpm = pad if bool(pad.any()) else None
    for i in range(args.encoder_layers):
        p = f"encoder.layers.{i}"
        x = sublayer(
            x,
            f"{p}.self_attn_layer_norm",
            lambda h, p=p: ref_mha(h, h, sd, f"{p}.self_attn", args.encoder_attention_heads, kpm),
            pre_e,
        )
        x = sublayer(x, f"{p}.final_layer_norm", ffn(p), pre_e)
    if pre_e:
        x = ln(x, sd, "encoder.layer_norm")
    enc = x
    # decoder
    y = math.sqrt(C) * sd["decoder.embed_tokens.weight"][prev] + ref_positions(prev, args, sd, "decoder")
    if args.layernorm_embedding:
        y = ln(y, sd, "decoder.layernorm_embedding")
    y = y.transpose(0, 1)
    T = prev.size(1)
    future = torch.triu(torch.full((T, T), float("-inf")), 1)
    self_kpm = prev.eq(PAD) if bool(prev.eq(PAD).any()) else None
    for i in range(args.decoder_layers):
        p = f"decoder.layers.{i}"
        heads = args.decoder_attention_heads
        y = sublayer(
            y,
            f"{p}.self_attn_layer_norm",
            lambda h, p=p, n=heads: ref_mha(h, h, sd, f"{p}.self_attn", n, self_kpm, future),
            pre_d,
        )
        y = sublayer(
            y,
            f"{p}.encoder_attn_layer_norm",
            lambda h, p=p, n=heads: ref_mha(h, enc, sd, f"{p}.encoder_attn", n, kpm),
            pre_d,
        )
        y = sublayer(y, f"{p}.final_layer_norm", ffn(p), pre_d)
    if pre_d:
        y = ln(y, sd, "decoder.layer_norm")
    logits = y.transpose(0, 1) @ sd["decoder.output_projection.weight"].t()
    return enc.transpose(0, 1), F.log_softmax(logits, -1)


def batch(
    seed: int = 0, left_pad: bool = True, vs: int = VS, vt: int = VT
) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """Source (left- or right-padded) and prev_output_tokens (right-padded) of 3 sentences of different lengths."""
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.cat([torch.randint(4, vs, (n,), generator=g), torch.tensor([EOS])]) for n in (6, 3, 9)]
    tgts = [torch.cat([torch.randint(4, vt, (n,), generator=g), torch.tensor([EOS])]) for n in (5, 8, 2)]
    S, T = max(len(s) for s in srcs), max(len(t) for t in tgts)
    src = torch.full((3, S), PAD)
    prev = torch.full((3, T), PAD)
    for i, (s, t) in enumerate(zip(srcs, tgts)):
        if left_pad:
            src[i, S - len(s) :] = s
        else:
            src[i, : len(s)] = s
        prev[i, : len(t)] = torch.cat([torch.tensor([EOS]), t[:-1]])
    return src, prev, srcs, tgts


def save_checkpoint(path: Path, args: argparse.Namespace | None, sd: dict, cfg: Any = None) -> Path:
    """As fairseq's checkpoint_utils.save_state writes it (the fields a reader meets)."""
    torch.save(
        {
            "args": args,
            "cfg": cfg,
            "model": sd,
            "optimizer_history": [{"criterion_name": "x", "num_updates": 7}],
            "extra_state": {"epoch": 3, "val_loss": 4.2},
            "last_optimizer_state": {},
        },
        path,
    )
    return path


VARIANTS = {
    "post-norm": {},
    "pre-norm": {"encoder_normalize_before": True, "decoder_normalize_before": True},
    "learned-pos+ln-embed": {"encoder_learned_pos": True, "decoder_learned_pos": True, "layernorm_embedding": True},
    "untied": {"share_decoder_input_output_embed": False},
    "share-all": {"share_all_embeddings": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_one_iteration_is_fairseqs_function_with_fairseqs_names(variant: str, tmp_path: Path) -> None:
    args = fairseq_args(**VARIANTS[variant])
    vt = VS if args.share_all_embeddings else VT
    sd = fairseq_state_dict(args, vt=vt)
    model = from_fairseq_checkpoint(save_checkpoint(tmp_path / "checkpoint_best.pt", args, sd), n_iter=1).eval()
    own = model.state_dict()
    assert set(own) == set(sd)  # fairseq's names, nothing more, nothing less
    src, prev, _, _ = batch(vt=vt)
    ref_enc, ref_lp = ref_forward(args, sd, src, prev)
    with torch.no_grad():
        enc = model.forward_encoder(src)
        lp = model.get_normalized_probs(model(src, prev))
    valid_src, valid_tgt = src.ne(PAD), prev.ne(PAD)
    torch.testing.assert_close(enc.out[valid_src], ref_enc[valid_src], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lp[valid_tgt], ref_lp[valid_tgt], atol=2e-5, rtol=1e-5)
    assert model.hparams.n_iter == 1 and model.hparams.dropout == 0.3


@pytest.mark.parametrize("n_iter", [1, 3])
def test_padded_batch_equals_each_sentence_alone(n_iter: int) -> None:
    torch.manual_seed(0)
    model = sinkformer_transformer_toy(src_vocab_size=VS, tgt_vocab_size=VT, n_iter=n_iter).eval().double()
    for left_pad in (True, False):
        src, prev, srcs, tgts = batch(left_pad=left_pad)
        with torch.no_grad():
            enc = model.forward_encoder(src).out
            lp = model.get_normalized_probs(model(src, prev))
            for i, (s, t) in enumerate(zip(srcs, tgts)):
                p1 = torch.cat([torch.tensor([EOS]), t[:-1]]).unsqueeze(0)
                enc1 = model.forward_encoder(s.unsqueeze(0)).out[0]
                lp1 = model.get_normalized_probs(model(s.unsqueeze(0), p1))[0]
                torch.testing.assert_close(enc[i][src[i].ne(PAD)], enc1, atol=1e-10, rtol=1e-10)
                torch.testing.assert_close(lp[i, : len(t)], lp1, atol=1e-10, rtol=1e-10)


def test_sinkhorn_changes_the_encoder_and_makes_columns_sum_to_one() -> None:
    torch.manual_seed(0)
    model = sinkformer_transformer_toy(src_vocab_size=VS, tgt_vocab_size=VT, n_iter=1, record_stats=True).eval()
    src, prev, _, _ = batch()
    with torch.no_grad():
        out1 = model.forward_encoder(src).out
        dev1 = model.attention_stats()["encoder.layers.0.self_attn"]["dev"]
        model.set_n_iter(21)
        out21 = model.forward_encoder(src).out
        dev21 = model.attention_stats()["encoder.layers.0.self_attn"]["dev"]
    assert model.hparams.n_iter == 21 and all(a.n_iter == 21 for a in model.encoder_attentions)
    assert all(layer.self_attn.n_iter == 1 and layer.encoder_attn.n_iter == 1 for layer in model.decoder.layers)
    assert not torch.allclose(out1, out21)
    assert float(dev21) < 1e-3 < float(dev1)


def test_incremental_decoding_equals_full_sequence_decoding() -> None:
    torch.manual_seed(1)
    model = (
        sinkformer_transformer_toy(src_vocab_size=VS, tgt_vocab_size=VT, n_iter=3, decoder_normalize_before=True)
        .eval()
        .double()
    )
    src, _, _, _ = batch()
    prev = torch.cat([torch.full((3, 1), EOS), torch.randint(4, VT, (3, 6))], 1)
    with torch.no_grad():
        full = model.get_normalized_probs(model(src, prev))
        enc, cache = model.forward_encoder(src), []
        steps = [model.forward_decoder_step(prev[:, t : t + 1], t, enc, cache) for t in range(prev.size(1))]
    torch.testing.assert_close(torch.stack(steps, 1), full.double(), atol=1e-10, rtol=1e-10)
    # the cache holds one key per step (O(T) per step): layer 0's self-attention keys after 7 steps
    assert cache[0]["self"]["k"].shape[2] == prev.size(1)
    assert cache[0]["cross"]["k"].shape[2] == src.size(1)


def peaked_model(seed: int = 0) -> SinkformerTranslation:
    """A random model whose output distributions are peaked (so eos competes) in float64."""
    torch.manual_seed(seed)
    model = sinkformer_transformer_toy(src_vocab_size=VS, tgt_vocab_size=VT, n_iter=3).eval().double()
    with torch.no_grad():
        model.decoder.output_projection.weight.mul_(4.0)
    return model


def test_beam_one_is_greedy() -> None:
    model = peaked_model()
    src, _, _, _ = batch()
    greedy = greedy_search(model, src, max_len_a=1.0, max_len_b=4, lenpen=1.0)
    beam = beam_search(model, src, beam=1, max_len_a=1.0, max_len_b=4)
    for g, b in zip(greedy, beam):
        assert torch.equal(g["tokens"], b[0]["tokens"])
        assert math.isclose(g["score"], b[0]["score"], rel_tol=1e-9)
        assert int(g["tokens"][-1]) == EOS
    lengths = [len(g["tokens"]) for g in greedy]
    assert max(lengths) > min(lengths)  # some stop at eos, others at max_len


def test_batched_beam_search_equals_each_sentence_alone() -> None:
    model = peaked_model(1)
    for left_pad in (True, False):
        src, _, srcs, _ = batch(left_pad=left_pad)
        batched = beam_search(model, src, beam=4, lenpen=1.2, max_len_a=1.0, max_len_b=3, nbest=4)
        for i, s in enumerate(srcs):
            alone = beam_search(model, s.unsqueeze(0), beam=4, lenpen=1.2, max_len_a=1.0, max_len_b=3, nbest=4)[0]
            assert [h["tokens"].tolist() for h in batched[i]] == [h["tokens"].tolist() for h in alone]
            assert [round(h["score"], 9) for h in batched[i]] == [round(h["score"], 9) for h in alone]
    hyps = batched[0]
    assert [h["score"] for h in hyps] == sorted((h["score"] for h in hyps), reverse=True)
    for h in hyps:  # score = sum of the positional log-probs / length^lenpen, and it matches a forward pass
        n = len(h["tokens"])
        assert math.isclose(h["score"], float(h["positional_scores"].sum()) / n**1.2, rel_tol=1e-9)
        prev = torch.cat([torch.tensor([EOS]), h["tokens"][:-1]]).unsqueeze(0)
        with torch.no_grad():
            lp = model.get_normalized_probs(model(srcs[0].unsqueeze(0), prev))[0]
        torch.testing.assert_close(
            lp.gather(1, h["tokens"].unsqueeze(1)).squeeze(1).float(),
            h["positional_scores"].float(),
            atol=1e-5,
            rtol=1e-5,
        )


def naive_beam_search(
    model: SinkformerTranslation, src: torch.Tensor, K: int, lenpen: float, max_len: int, min_len: int = 1
) -> list[tuple[list[int], float]]:
    """fairseq's SequenceGenerator for one sentence, written plainly: full forward passes (no cache), python lists."""
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finalized: list[tuple[list[int], float]] = []
    for step in range(max_len + 1):
        cands = []
        for b, (toks, score) in enumerate(beams if step > 0 else beams[:1]):
            prev = torch.tensor([[EOS] + toks])
            with torch.no_grad():
                lp = model.get_normalized_probs(model(src.unsqueeze(0), prev))[0, -1].clone()
            lp[PAD] = -math.inf
            if step >= max_len:
                keep = lp[EOS].clone()
                lp[:] = -math.inf
                lp[EOS] = keep
            elif step < min_len:
                lp[EOS] = -math.inf
            cands += [(score + float(lp[v]), b, v) for v in range(lp.numel())]
        top = sorted(cands, key=lambda c: -c[0])[: 2 * K]
        for score, b, v in top[:K]:
            if v == EOS and score > -math.inf and len(finalized) < K:
                finalized.append((beams[b][0] + [EOS], score / (step + 1) ** lenpen))
        if len(finalized) >= K or step >= max_len:
            break
        beams = [(beams[b][0] + [v], score) for score, b, v in top if v != EOS][:K]
    return sorted(finalized, key=lambda h: -h[1])


def test_beam_search_is_fairseqs_algorithm() -> None:
    model = peaked_model(3)
    src, _, srcs, _ = batch()
    out = beam_search(model, src, beam=3, lenpen=0.7, max_len_a=0.5, max_len_b=2, nbest=3)
    for s, hyps in zip(srcs, out):
        ref = naive_beam_search(model, s, K=3, lenpen=0.7, max_len=int(0.5 * len(s) + 2))
        assert [h["tokens"].tolist() for h in hyps] == [t for t, _ in ref]
        assert [round(h["score"], 9) for h in hyps] == [round(sc, 9) for _, sc in ref]


def test_beam_search_respects_length_limits() -> None:
    model = peaked_model(2)
    src, _, srcs, _ = batch()
    out = beam_search(model, src, beam=3, max_len_a=0.0, max_len_b=2, min_len=2, nbest=3)
    for hyps in out:
        assert len(hyps) == 3
        for h in hyps:
            assert 3 <= len(h["tokens"]) <= 3  # min_len 2 non-eos tokens and max_len 2: exactly 2 + eos
            assert int(h["tokens"][-1]) == EOS and PAD not in h["tokens"].tolist()
    with pytest.raises(ZooError, match="beam"):
        beam_search(model, src, beam=12)


# ================================================================================================ input errors


def toy() -> SinkformerTranslation:
    torch.manual_seed(0)
    return sinkformer_transformer_toy(src_vocab_size=24, tgt_vocab_size=20).eval()


SRC = torch.tensor([[5, 9, 2]])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.translate(torch.tensor([[5, 30, 2]])), r"id 30, outside the source vocabulary of 24 .*0\.\.23"),
        (lambda m: m.generate(torch.tensor([[5, -1, 2]])), r"id -1, outside the source vocabulary of 24"),
        (lambda m: m.translate(torch.tensor([5, 9, 2])), r"2-D \(batch, length\).*shape \(3,\).*unsqueeze\(0\)"),
        (lambda m: m.translate(torch.tensor([[5.0, 9.0, 2.0]])), r"integer token ids.*torch\.float32.*\.long\(\)"),
        (lambda m: m.translate([[5, 9, 2]]), r"torch\.Tensor of token ids, got list"),
        (lambda m: m(torch.tensor([[5, 9, 2], [6, 9, 2]]), torch.tensor([[2, 5]])), r"batch size 1 .* 2 sentences"),
        (lambda m: m(SRC, torch.tensor([2.0, 5.0])), r"prev_output_tokens must be a 2-D"),
        (lambda m: m.forward_encoder(torch.tensor([5, 9, 2])), r"src_tokens must be a 2-D"),
        (lambda m: m.translate(SRC, foo=3), r"unknown decoding option 'foo': give beam or lenpen"),
        (lambda m: greedy_search(m, torch.tensor([[5, 30, 2]])), r"id 30, outside the source vocabulary"),
        (lambda m: beam_search(m, torch.tensor([5, 9, 2])), r"src_tokens must be a 2-D"),
        # forward on the CPU, where the range check reads no device (the embedding's IndexError before)
        (
            lambda m: m(torch.tensor([[5, 24, 2]]), torch.tensor([[2, 5]])),
            r"src_tokens holds the id 24, outside the "
            r"source vocabulary of 24 symbols \(ids 0\.\.23\).*src_vocab_size",
        ),
        (
            lambda m: m(SRC, torch.tensor([[2, 20]])),
            r"prev_output_tokens holds the id 20, outside the target "
            r"vocabulary of 20 symbols.*tgt_vocab_size",
        ),
        (lambda m: m(SRC, torch.tensor([[2, -3]])), r"prev_output_tokens holds the id -3, outside the target"),
        (lambda m: m.forward_encoder(torch.tensor([[5, 99]])), r"src_tokens holds the id 99, outside the source"),
    ],
)
def test_bad_token_input_is_one_clear_error(call, message: str) -> None:
    with pytest.raises(ZooError, match=message):
        call(toy())


def test_the_range_check_adds_no_graph_break_under_compile() -> None:
    """Under torch.compile the ids' range is not read (a data-dependent branch): one graph, the same logits."""
    model, tgt = toy(), torch.tensor([[2, 5, 7]])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(SRC, tgt), model(SRC, tgt))


def test_empty_batch_translates_to_nothing() -> None:
    model, empty = toy(), torch.zeros(0, 3, dtype=torch.long)
    assert model.translate(empty) == []
    assert model.generate(empty, beam=2) == []
    assert greedy_search(model, empty) == []
    with torch.no_grad():
        assert model(empty, torch.zeros(0, 2, dtype=torch.long)).shape == (0, 2, 20)


@pytest.mark.parametrize("method", ["translate", "generate"])
def test_beam_zero_is_refused_not_replaced_by_the_default(method: str) -> None:
    model = toy()
    with pytest.raises(ZooError) as direct:
        beam_search(model, SRC, beam=0)
    with pytest.raises(ZooError) as via_task:
        getattr(model, method)(SRC, beam=0)
    assert str(via_task.value) == str(direct.value) and "beam" in str(direct.value)
    with pytest.raises(ZooError, match="nbest"):
        model.generate(SRC, beam=2, nbest=3)


def test_zero_decoding_overrides_are_used_not_the_task_defaults() -> None:
    model = toy()
    # max_len_a=0, max_len_b=1: one token and eos (the defaults 1.2 and 10 allow 4)
    for hyp in model.translate(torch.tensor([[5, 9, 2], [6, 7, 2]]), beam=2, max_len_a=0, max_len_b=1, min_len=0):
        assert len(hyp) <= 2 and int(hyp[-1]) == EOS
    out = model.generate(SRC, beam=2, lenpen=0, nbest=2)[0]
    assert all(h["score"] == pytest.approx(float(h["positional_scores"].double().sum())) for h in out)


def test_forward_checks_inputs_without_host_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a host read would synchronise a device (declared here for the CPU run), forward reads no value: shapes
    and dtypes are checked, the ids' range is not."""
    import zoo.models.translation as translation

    model = toy()
    src, prev = torch.tensor([[5, 9, 2], [1, 6, 2]]), torch.tensor([[2, 5, 7], [2, 8, 1]])

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host sync inside forward")

    monkeypatch.setattr(translation, "host_read_is_free", lambda t: False)
    for name in ("item", "tolist", "cpu", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.no_grad():
        assert model(src, prev).shape == (2, 3, 20)
        model.forward_encoder(src)


# ================================================================================================ checkpoints


def test_checkpoint_with_cfg_dicts_and_legacy_keys(tmp_path: Path) -> None:
    args = fairseq_args(decoder_normalize_before=True)
    sd = fairseq_state_dict(args)
    ref = from_fairseq_checkpoint(save_checkpoint(tmp_path / "a.pt", args, sd)).eval()
    src, prev, _, _ = batch()
    with torch.no_grad():
        expected = ref(src, prev)
    # fairseq >= 0.10: args None, cfg['model'] a Namespace (legacy archs) or a nested dict (dataclass configs)
    nested = {
        "_name": "transformer_iwslt_de_en",
        "encoder": {"embed_dim": C, "ffn_embed_dim": FFN, "layers": 2, "attention_heads": H, "normalize_before": False},
        "decoder": {"embed_dim": C, "ffn_embed_dim": FFN, "layers": 2, "attention_heads": H, "normalize_before": True},
        "share_decoder_input_output_embed": True,
        "dropout": 0.3,
        "quant_noise": {"pq": 0.0},
    }
    # older fairseq: layer_norms.N, embed_out / no output_projection, a stored sinusoid table
    legacy = {k: v for k, v in sd.items() if not k.endswith(("_float_tensor", "output_projection.weight"))}
    for k in [k for k in legacy if "self_attn_layer_norm" in k or "final_layer_norm" in k]:
        idx = "0" if "self_attn_layer_norm" in k else ("2" if k.startswith("decoder") else "1")
        legacy[
            k.replace("self_attn_layer_norm", f"layer_norms.{idx}").replace("final_layer_norm", f"layer_norms.{idx}")
        ] = legacy.pop(k)
    legacy["encoder.embed_positions.weights"] = torch.zeros(1026, C)
    for name, ckpt_args, cfg, state in (
        ("namespace-cfg", None, {"model": args}, sd),
        ("nested-cfg", None, {"model": nested, "task": {"_name": "translation"}}, sd),
        ("legacy-keys", args, None, legacy),
    ):
        model = from_fairseq_checkpoint(save_checkpoint(tmp_path / f"{name}.pt", ckpt_args, state, cfg)).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(src, prev), expected, atol=1e-6, rtol=1e-6, msg=name)
    # the loaded dict works as well as the file, and n_iter defaults to the checkpoint's own value
    model = from_fairseq_checkpoint(
        {
            "args": fairseq_args(arch="sinkformer_transformer_iwslt_de_en", n_iter=5),
            "model": fairseq_state_dict(fairseq_args()),
        }
    )
    assert model.hparams.n_iter == 5 and model.encoder_attentions[0].n_iter == 5


def test_checkpoint_dictionaries_and_weights_argument(tmp_path: Path) -> None:
    args = fairseq_args()
    sd = fairseq_state_dict(args)
    path = save_checkpoint(tmp_path / "checkpoint_best.pt", args, sd)
    src_dict, tgt_dict = Dictionary(), Dictionary()
    for i in range(VS - 4):
        src_dict.add_symbol(f"s{i}")
    for i in range(VT - 4):
        tgt_dict.add_symbol(f"t{i}")
    src_dict.save(tmp_path / "dict.de.txt")
    tgt_dict.save(tmp_path / "dict.en.txt")
    sgd = functools.partial(torch.optim.SGD, lr=1e-4)
    model = SinkformerTranslation.from_fairseq_checkpoint(
        path, n_iter=3, src_dict=tmp_path / "dict.de.txt", tgt_dict=tgt_dict, optimizer=sgd
    )
    assert model.optimizer_factory is sgd and model.hparams.n_iter == 3
    # the checkpoint's training settings (lr 5e-4, adam, label smoothing ...) stay out of the architecture
    assert not {"lr", "optimizer", "adam_betas", "lr_scheduler", "criterion"} & set(model.hparams)
    opt = model.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["initial_lr"] == 1e-4
    with pytest.raises(ZooError, match="vocabulary size mismatch.*source dictionary has 28.*tgt|src_vocab_size: 28"):
        from_fairseq_checkpoint(path, src_dict=VS - 1)
    tgt_dict.add_symbol("extra")
    with pytest.raises(ZooError, match="vocabulary size mismatch: the target dictionary has 24"):
        from_fairseq_checkpoint(path, tgt_dict=tgt_dict)
    # weights= takes the fairseq file when the shape matches
    hp = {k: v for k, v in model.hparams.items() if k in SinkformerTranslation.__init__.__code__.co_varnames}
    again = SinkformerTranslation(**{**hp, "weights": str(path)})
    # and so does a builder (a fairseq pickle records fairseq's arguments, not a zoo class's: the builder's apply)
    built = zoo.sinkformer_transformer_toy(weights=str(path), **{k: v for k, v in hp.items() if k != "n_iter"})
    assert built.hparams.n_iter == 3  # the toy builder's
    for k, v in sd.items():
        if not k.endswith(("_float_tensor", "version")):
            assert torch.equal(again.state_dict()[k], v), k
            assert torch.equal(built.state_dict()[k], v), k


def test_checkpoint_errors(tmp_path: Path) -> None:
    args = fairseq_args()
    sd = fairseq_state_dict(args)
    good = save_checkpoint(tmp_path / "good.pt", args, sd)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ZooError, match="cannot read fairseq checkpoint .*is the file complete"):
        from_fairseq_checkpoint(truncated)
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ZooError, match="cannot read fairseq checkpoint"):
        from_fairseq_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(ZooError, match="does not exist"):
        from_fairseq_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ZooError, match="architecture 'lstm_wiseman_iwslt_de_en' is not supported"):
        from_fairseq_checkpoint({"args": fairseq_args(arch="lstm_wiseman_iwslt_de_en"), "model": sd})
    with pytest.raises(ZooError, match="adaptive_softmax_cutoff='2000,4000' is not supported"):
        from_fairseq_checkpoint({"args": fairseq_args(adaptive_softmax_cutoff="2000,4000"), "model": sd})
    with pytest.raises(ZooError, match="decoder_output_dim=32 differs"):
        from_fairseq_checkpoint({"args": fairseq_args(decoder_output_dim=32), "model": sd})
    with pytest.raises(ZooError, match="neither 'args' nor 'cfg'"):
        from_fairseq_checkpoint({"model": sd})
    with pytest.raises(ZooError, match="expected a dict with a 'model'"):
        from_fairseq_checkpoint({"args": args})
    with pytest.raises(ZooError, match="no encoder.embed_tokens.weight"):
        from_fairseq_checkpoint({"args": args, "model": {k: v for k, v in sd.items() if "embed_tokens" not in k}})
    with pytest.raises(ZooError, match="do not fit SinkformerTranslation.*shape mismatch"):
        from_fairseq_checkpoint({"args": fairseq_args(encoder_ffn_embed_dim=FFN + 8), "model": sd})
    old = dict(sd, **{"encoder.version": torch.Tensor([1])})
    with pytest.raises(ZooError, match="predates the final LayerNorm"):
        from_fairseq_checkpoint(
            {
                "args": fairseq_args(encoder_normalize_before=True),
                "model": fairseq_state_dict(fairseq_args(encoder_normalize_before=True))
                | {"encoder.version": torch.Tensor([1])},
            }
        )
    from_fairseq_checkpoint({"args": args, "model": old})  # post-norm: the version does not matter


def test_checkpoint_needing_omegaconf_gives_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cfg pickled as an omegaconf DictConfig cannot be read without omegaconf (made unimportable here, whether
    or not it is installed: the fairseq extra brings it)."""
    fake = types.ModuleType("omegaconf")

    class DictConfig(dict):
        pass

    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf", "DictConfig"
    fake.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "omegaconf", fake)
    path = tmp_path / "omegaconf.pt"
    torch.save({"args": None, "cfg": DictConfig(model={"_name": "transformer"}), "model": {}}, path)
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # `import omegaconf` now raises ImportError
    with pytest.raises(ZooError, match="omegaconf DictConfig: pip install omegaconf"):
        from_fairseq_checkpoint(path)


class _NotAFairseqClass:
    pass


def test_checkpoint_reader_allow_list(tmp_path: Path) -> None:
    """Allowed: Namespace args, numpy scalars of the training state; anything else is refused before unpickling."""
    import numpy as np

    ok = tmp_path / "ok.pt"
    torch.save(
        {
            "model": {},
            "args": argparse.Namespace(arch="transformer"),
            "extra_state": {"best": np.float64(1.5), "steps": np.int64(3)},
        },
        ok,
    )
    ckpt = read_fairseq_checkpoint(ok)
    assert ckpt["args"].arch == "transformer" and float(ckpt["extra_state"]["best"]) == 1.5
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "args": _NotAFairseqClass()}, bad)
    with pytest.raises(ZooError, match=r"outside the fairseq checkpoint allow-list \(.*_NotAFairseqClass\)"):
        read_fairseq_checkpoint(bad)


# ================================================================================================ builders, saving


def test_registered_builders_and_published_configuration() -> None:
    names = {
        "sinkformer_transformer_iwslt_de_en",
        "transformer_iwslt_de_en",
        "sinkformer_transformer_toy",
        "sinkformer_transformer_numbers",
    }
    assert names <= set(zoo.list_models(family="translation"))
    model = sinkformer_transformer_iwslt_de_en()
    hp = model.hparams
    assert (
        hp.encoder_layers,
        hp.decoder_layers,
        hp.encoder_embed_dim,
        hp.encoder_attention_heads,
        hp.encoder_ffn_embed_dim,
    ) == (6, 6, 512, 4, 1024)
    assert (hp.src_vocab_size, hp.tgt_vocab_size, hp.dropout, hp.n_iter) == (8848, 6632, 0.3, 3)
    assert not hp.encoder_normalize_before and model.encoder.layer_norm is None
    assert model.decoder.output_projection.weight is model.decoder.embed_tokens.weight
    # training settings are injected, not architecture: fairseq's IWSLT'14 Adam and inverse_sqrt by default
    assert not {"optimizer", "lr_scheduler", "lr", "betas", "weight_decay", "warmup_updates"} & set(hp)
    assert hp.label_smoothing == 0.1
    conf = model.configure_optimizers()
    group, sched = conf["optimizer"].param_groups[0], conf["lr_scheduler"]["scheduler"]
    assert type(conf["optimizer"]) is torch.optim.AdamW and conf["lr_scheduler"]["interval"] == "step"
    assert (group["initial_lr"], group["betas"], group["eps"], group["weight_decay"]) == (5e-4, (0.9, 0.98), 1e-8, 1e-4)
    assert type(sched) is InverseSqrtLR and (sched.warmup_updates, sched.warmup_init_lr) == (4000, -1.0)
    assert all(a.n_iter == 3 for a in model.encoder_attentions)
    # the Transformer baseline has the same state dict
    base = transformer_iwslt_de_en()
    assert base.hparams.n_iter == 1
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    numbers = sinkformer_transformer_numbers()
    assert numbers.hparams.encoder_embed_dim == 64
    conf = numbers.configure_optimizers()
    group, sched = conf["optimizer"].param_groups[0], conf["lr_scheduler"]["scheduler"]
    assert (group["initial_lr"], group["weight_decay"], sched.warmup_updates) == (3e-3, 0.0, 100)
    for name in names:
        assert zoo.registry.model_entrypoint(name).__doc__


def test_pretrained_cfg_describes_the_model_as_built(tmp_path: Path) -> None:
    """timm's pretrained_cfg (alias default_cfg) with the keys that apply to translation: the vocabulary sizes in
    place of num_classes, the output projection as classifier, the builder's name, recipe and paper."""
    from zoo.cli import list_recipes

    for name, recipe in (
        ("sinkformer_transformer_iwslt_de_en", "nmt/iwslt14_de_en_sinkformer"),
        ("transformer_iwslt_de_en", "nmt/iwslt14_de_en_sinkformer"),
        ("sinkformer_transformer_numbers", "nmt/numbers_sinkformer"),
        ("sinkformer_transformer_toy", None),
    ):
        model = zoo.create_model(name)
        cfg = model.pretrained_cfg
        assert model.default_cfg is cfg and cfg["architecture"] == name and cfg.get("recipe") == recipe
        assert (cfg["src_vocab_size"], cfg["tgt_vocab_size"]) == (model.src_vocab_size, model.tgt_vocab_size)
        head = model.get_submodule(cfg["classifier"])
        assert head.weight.shape == (model.tgt_vocab_size, model.hparams.decoder_embed_dim)
        assert cfg["source"] is None and cfg["paper_ids"] == "arXiv:2110.11773"
        assert not {"input_size", "mean", "std", "num_classes"} & set(cfg)  # image keys do not apply
        assert recipe is None or recipe in list_recipes()
    model = sinkformer_transformer_toy(src_vocab_size=30, tgt_vocab_size=20)
    assert (model.pretrained_cfg["src_vocab_size"], model.pretrained_cfg["tgt_vocab_size"]) == (30, 20)
    # a fairseq checkpoint: its file is the source, and the conversion is said
    args = fairseq_args()
    path = save_checkpoint(tmp_path / "checkpoint_best.pt", args, fairseq_state_dict(args))
    converted = SinkformerTranslation.from_fairseq_checkpoint(path)
    cfg = converted.pretrained_cfg
    assert cfg["source"] == str(path) and "transformer_iwslt_de_en" in cfg["description"]
    assert "n_iter=1 the model computes the fairseq Transformer's log-probabilities" in cfg["conversion"]
    assert (cfg["src_vocab_size"], cfg["tgt_vocab_size"]) == (VS, VT)
    assert SinkformerTranslation(
        src_vocab_size=VS,
        tgt_vocab_size=VT,
        encoder_layers=2,
        decoder_layers=2,
        encoder_embed_dim=C,
        decoder_embed_dim=C,
        encoder_ffn_embed_dim=FFN,
        decoder_ffn_embed_dim=FFN,
        encoder_attention_heads=H,
        decoder_attention_heads=H,
        share_decoder_input_output_embed=True,
        weights=str(path),
    ).pretrained_cfg["source"] == str(path)


def test_constructor_errors() -> None:
    with pytest.raises(ZooError, match="n_iter"):
        sinkformer_transformer_toy(n_iter=0)
    with pytest.raises(ZooError, match="share_all_embeddings needs a joined dictionary"):
        sinkformer_transformer_toy(src_vocab_size=40, tgt_vocab_size=30, share_all_embeddings=True)
    with pytest.raises(ZooError, match="not divisible"):
        sinkformer_transformer_toy(encoder_attention_heads=3)
    with pytest.raises(ZooError, match="src_vocab_size must be an integer >= 4, got 3 .*4 special symbols"):
        SinkformerTranslation(src_vocab_size=3)
    with pytest.raises(ZooError, match="activation_fn must be one of 'relu', .*got 'swish'"):
        sinkformer_transformer_toy(activation_fn="swish")


def test_save_pretrained_round_trip_keeps_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = sinkformer_transformer_toy(src_vocab_size=VS, share_all_embeddings=True, n_iter=5).eval()
    model.save_pretrained(tmp_path / "m")
    again = SinkformerTranslation.from_pretrained(tmp_path / "m").eval()
    assert again.hparams.n_iter == 5
    assert again.encoder.embed_tokens is again.decoder.embed_tokens
    assert again.decoder.output_projection.weight is again.decoder.embed_tokens.weight
    src, prev, _, _ = batch(vt=VS)
    with torch.no_grad():
        torch.testing.assert_close(again(src, prev), model(src, prev))


def test_fairseq_reader_old_names_warn_and_forward():
    """The fairseq checkpoint reader moved to converters.fairseq_checkpoint; its old names in
    zoo.models.translation are the same functions for one release, with a FutureWarning naming the new home."""
    import converters.fairseq_checkpoint as moved
    import zoo.models.translation as old

    for name in ("read_fairseq_checkpoint", "fairseq_arch", "fairseq_hparams", "from_fairseq_checkpoint"):
        with pytest.warns(FutureWarning, match=f"converters.fairseq_checkpoint.{name}"):
            assert getattr(old, name) is getattr(moved, name)
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018


def test_both_vocabulary_mismatches_in_one_error() -> None:
    # a new corpus: both dictionaries differ from the model; one message names both settings (one edit, one run)
    model = zoo.sinkformer_transformer_toy(src_vocab_size=40, tgt_vocab_size=40)
    src, tgt = Dictionary(), Dictionary()
    for i in range(20):
        src.add_symbol(f"s{i}")
    for i in range(28):
        tgt.add_symbol(f"t{i}")
    with pytest.raises(ZooError, match=r"set src_vocab_size: 24, tgt_vocab_size: 32 \(") as info:
        model.check_dictionaries(src, tgt)
    assert "source dictionary has 24" in str(info.value) and "target dictionary has 32" in str(info.value)
    model.check_dictionaries(40, 40)  # matching sizes pass
