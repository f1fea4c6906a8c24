"""fairseq interop (needs fairseq-fixed, skipped without it): fairseq checkpoint files and live fairseq models become
the zoo SinkformerTranslation with fairseq's log-probabilities at n_iter=1; the zoo_fairseq plugin registers the
Sinkformer archs, equals the plain transformer at n_iter=1 and has near doubly stochastic encoder attention at
n_iter=3; a real fairseq-train run with --user-dir zoo_fairseq writes a checkpoint the zoo model reads.
CPU, tiny random models (fairseq's transformer_tiny shape)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import converters
from zoo.errors import ZooError
from zoo.models.translation import SinkformerTranslation

REPO = Path(__file__).resolve().parents[2]
PAD = 1


def test_plugin_without_fairseq_names_the_extra() -> None:
    """Importing zoo_fairseq without fairseq: one ImportError naming pip install "zoo[fairseq]" (no fairseq needed)."""
    code = (
        "import sys; sys.modules['fairseq'] = None\ntry:\n    import zoo_fairseq\nexcept ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR") and 'pip install "zoo[fairseq]"' in out.stdout


def test_source_never_imports_fairseq() -> None:
    """converters.fairseq imports without fairseq and its matches() does not import it (no fairseq needed)."""
    import converters.fairseq as source

    had = "fairseq" in sys.modules
    assert not source.is_fairseq_transformer(torch.nn.Linear(2, 2))
    assert ("fairseq" in sys.modules) == had
    assert source.SOURCE_NAME in converters._SOURCES["attention"]


@pytest.fixture
def fs() -> object:
    """fairseq and the zoo's fairseq source, or a skip (every test below but the first needs them)."""
    fairseq = pytest.importorskip("fairseq", reason='fairseq is not installed (pip install "zoo[fairseq]")')
    import converters.fairseq  # noqa: F401  (not yet in converters._SOURCE_MODULES)

    return fairseq


def dictionary(n: int) -> object:
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}")
    return d


def fairseq_model(
    arch: str = "transformer_tiny", src: int = 23, tgt: int = 19, seed: int = 0, **extra
) -> torch.nn.Module:
    """fairseq's own build_model on a fake task, every parameter perturbed (biases and norms matter), eval mode."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    args = argparse.Namespace(arch=arch, **extra)
    ARCH_CONFIG_REGISTRY[arch](args)  # the arch's defaults, as fairseq-train applies them
    task = SimpleNamespace(source_dictionary=dictionary(src), target_dictionary=dictionary(tgt))
    torch.manual_seed(seed)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, task)
    model.train_args = args
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def batch(src_vocab: int = 23, tgt_vocab: int = 19) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded sources (fairseq's default), right-padded shifted targets, lengths."""
    g = torch.Generator().manual_seed(7)
    src_len, tgt_len = [7, 4, 6], [5, 3, 6]
    src = torch.full((3, 7), PAD)
    prev = torch.full((3, 6), PAD)
    for i, (s, t) in enumerate(zip(src_len, tgt_len)):
        src[i, 7 - s :] = torch.cat([torch.randint(4, src_vocab, (s - 1,), generator=g), torch.tensor([2])])
        prev[i, :t] = torch.cat([torch.tensor([2]), torch.randint(4, tgt_vocab, (t - 1,), generator=g)])
    return src, torch.tensor(src_len), prev


def fairseq_log_probs(model: torch.nn.Module, src, lengths, prev) -> torch.Tensor:
    with torch.no_grad():
        return model.get_normalized_probs(model(src, lengths, prev), log_probs=True)


def zoo_log_probs(model: torch.nn.Module, src, prev) -> torch.Tensor:
    with torch.no_grad():
        return model.get_normalized_probs(model(src, prev))


def assert_close_valid(a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, tol: float = 2e-5) -> None:
    valid = prev.ne(PAD)
    assert a.shape == b.shape
    assert (a[valid] - b[valid]).abs().max().item() <= tol


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {
            "share_decoder_input_output_embed": True,
            "encoder_normalize_before": True,
            "decoder_normalize_before": True,
            "encoder_learned_pos": True,
        },
    ],
    ids=["post-norm", "pre-norm-tied-learned"],
)
def test_checkpoint_file_matches_fairseq(tmp_path: Path, extra: dict, fs: object) -> None:
    """(1) A fairseq checkpoint file (args + model, as fairseq writes) read by from_fairseq_checkpoint: n_iter=1
    gives fairseq's decoder log-probs on a padded batch."""
    model = fairseq_model(**extra)
    path = tmp_path / "checkpoint_best.pt"
    torch.save({"args": model.train_args, "model": model.state_dict()}, path)
    src, lengths, prev = batch()
    zoo_model = SinkformerTranslation.from_fairseq_checkpoint(path, n_iter=1).eval()
    assert zoo_model.hparams.n_iter == 1
    assert_close_valid(zoo_log_probs(zoo_model, src, prev), fairseq_log_probs(model, src, lengths, prev), prev)


def test_transform_live_model(tmp_path: Path, fs: object) -> None:
    """(2) converters.transform(fairseq_model, to="sinkhorn"): n_iter=1 is fairseq's function, n_iter=3 differs;
    the source is untouched, the copy has its own tensors, inplace=True shares them."""
    model = fairseq_model(share_decoder_input_output_embed=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    src, lengths, prev = batch()
    ref = fairseq_log_probs(model, src, lengths, prev)
    zoo1 = converters.transform(model, to="sinkhorn", n_iter=1)
    assert isinstance(zoo1, SinkformerTranslation) and not zoo1.training
    assert_close_valid(zoo_log_probs(zoo1, src, prev), ref, prev)
    zoo3 = converters.transform(model, to="sinkhorn")  # default n_iter=3
    assert zoo3.hparams.n_iter == 3 and all(a.n_iter == 3 for a in zoo3.attentions)
    assert (zoo_log_probs(zoo3, src, prev) - ref)[prev.ne(PAD)].abs().max() > 1e-3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    p_src = model.encoder.layers[0].self_attn.q_proj.weight
    assert zoo1.encoder.layers[0].self_attn.q_proj.weight.data_ptr() != p_src.data_ptr()
    shared = converters.transform(model, to="sinkhorn", n_iter=1, inplace=True)
    assert shared.encoder.layers[0].self_attn.q_proj.weight is p_src
    assert shared.decoder.output_projection.weight is shared.decoder.embed_tokens.weight


@pytest.mark.parametrize("inplace", [False, True])
def test_transform_keeps_frozen_parameters_and_module_modes(inplace: bool, fs: object) -> None:
    """A frozen source parameter stays frozen, in the source (the reader assigns the source's tensors) and in the
    converted model; a module left in train mode inside an eval-mode model keeps its mode."""
    model = fairseq_model()
    model.encoder.embed_tokens.weight.requires_grad_(False)
    model.decoder.layers[0].fc1.bias.requires_grad_(False)
    model.decoder.layers[1].train()
    frozen = {"encoder.embed_tokens.weight", "decoder.layers.0.fc1.bias"}
    converted = converters.transform(model, to="sinkhorn", n_iter=1, inplace=inplace)
    assert {k for k, p in model.named_parameters() if not p.requires_grad} == frozen
    assert {k for k, p in converted.named_parameters() if not p.requires_grad} == frozen
    assert not converted.training and converted.decoder.layers[1].training
    assert not converted.decoder.layers[0].training


def test_transform_float64_model_says_nothing_about_precision(caplog: pytest.LogCaptureFixture, fs: object) -> None:
    """A float64 fairseq model converts to a float64 zoo model with fairseq's function, and no "cast to the
    model's precision" line (nothing of the source is cast)."""
    model = fairseq_model().double()
    src, lengths, prev = batch()
    ref = fairseq_log_probs(model, src, lengths, prev)
    with caplog.at_level(logging.INFO):
        converted = converters.transform(model, to="sinkhorn", n_iter=1)
    assert not [r for r in caplog.records if "precision" in r.getMessage()]
    assert all(p.dtype == torch.float64 for p in converted.parameters())
    assert_close_valid(zoo_log_probs(converted, src, prev), ref, prev)


def test_transform_rejects_unsupported(fs: object) -> None:
    model = fairseq_model(adaptive_softmax_cutoff="5,10", share_decoder_input_output_embed=False)
    with pytest.raises(ZooError, match="adaptive_softmax_cutoff"):
        converters.transform(model, to="sinkhorn", n_iter=1)
    with pytest.raises(
        ZooError,
        match="unknown option 'lr' .*accepted options are n_iter, record_stats, inplace, "
        "optimizer, lr_scheduler, label_smoothing",
    ):
        converters.transform(fairseq_model(), to="sinkhorn", lr=1e-3)


def test_transform_takes_training_settings_not_the_sources(fs: object) -> None:
    """The converted model trains with what the caller injects; the fairseq args' own settings are not read."""
    model = fairseq_model(lr=[0.25], optimizer="nag", label_smoothing=0.3)
    plain = converters.transform(model, to="sinkhorn")
    assert plain.optimizer_factory is None and plain.hparams.label_smoothing == 0.1  # the task's defaults
    assert not {"lr", "optimizer", "lr_scheduler"} & set(plain.hparams)
    assert plain.pretrained_cfg["source"].startswith("fairseq TransformerModel")
    assert "fairseq's parameters by name" in plain.pretrained_cfg["conversion"]
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    tuned = converters.transform(model, to="sinkhorn", optimizer=sgd, lr_scheduler=None, label_smoothing=0.2)
    conf = tuned.configure_optimizers()
    assert type(conf) is torch.optim.SGD and conf.param_groups[0]["lr"] == 0.1  # constant: no schedule
    assert tuned.hparams.label_smoothing == 0.2
    with pytest.raises(ZooError, match="optimizer must be a callable"):
        converters.transform(model, to="sinkhorn", optimizer="sgd")


def test_plugin_registers_and_matches_transformer(fs: object) -> None:
    """(3) The plugin: archs registered; n_iter=1 is the plain transformer (same init for the same seed, same
    outputs); n_iter=3 differs, its encoder attentions are near doubly stochastic, and the zoo conversion of the
    plugin model computes the same function."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    import zoo_fairseq

    assert MODEL_REGISTRY["sinkformer"] is zoo_fairseq.SinkformerModel
    for arch in (
        "sinkformer",
        "sinkformer_iwslt_de_en",
        "sinkformer_wmt_en_de",
        "sinkformer_tiny",
        "sinkformer_transformer_iwslt_de_en",
    ):
        assert ARCH_MODEL_REGISTRY[arch] is zoo_fairseq.SinkformerModel, arch
    args = argparse.Namespace(arch="sinkformer_iwslt_de_en")
    from fairseq.models import ARCH_CONFIG_REGISTRY

    ARCH_CONFIG_REGISTRY["sinkformer_iwslt_de_en"](args)
    assert (args.sinkhorn_n_iter, args.encoder_ffn_embed_dim, args.encoder_attention_heads) == (3, 1024, 4)

    plain = fairseq_model("transformer_tiny")
    sink = fairseq_model("sinkformer_tiny", sinkhorn_n_iter=1)
    assert isinstance(sink.encoder.layers[0].self_attn, zoo_fairseq.SinkhornMultiheadAttention)
    assert type(sink.decoder.layers[0].self_attn) is not zoo_fairseq.SinkhornMultiheadAttention
    assert sink.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, sink.state_dict()[k]), k  # same draws: the transformer's init
    src, lengths, prev = batch()
    ref = fairseq_log_probs(plain, src, lengths, prev)
    assert_close_valid(fairseq_log_probs(sink, src, lengths, prev), ref, prev)
    enc_ref = plain.encoder(src, lengths)["encoder_out"][0]
    enc = sink.encoder(src, lengths)["encoder_out"][0]
    assert (enc - enc_ref).abs().max() < 2e-5  # padded positions too

    sink.set_n_iter(3)
    assert sink.sinkhorn_n_iter == 3
    out3 = fairseq_log_probs(sink, src, lengths, prev)
    assert (out3 - ref)[prev.ne(PAD)].abs().max() > 1e-3
    # the zoo model converted from the plugin model computes the plugin's Sinkhorn function
    zoo3 = converters.transform(sink, to="sinkhorn", n_iter=3)
    assert_close_valid(zoo_log_probs(zoo3, src, prev), out3, prev, tol=5e-5)

    # an encoder attention on moderate scores: rows and columns over the valid tokens sum to ~1 (softmax: rows only)
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(0)) * 0.5  # (T, B, E)
    pad = src.eq(PAD)
    with torch.no_grad():
        for n_iter, tol in ((3, 0.02), (21, 1e-4)):
            sink.set_n_iter(n_iter)
            _, w = sink.encoder.layers[0].self_attn(x, x, x, key_padding_mask=pad, need_head_weights=True)
            assert w.shape == (2, 3, 7, 7)  # (H, B, T, T)
            valid = ~pad
            rows = w.sum(-1)[:, valid]
            cols = (w * valid[None, :, :, None]).sum(-2)[:, valid]
            assert (rows - 1).abs().max() < 1e-5
            assert (cols - 1).abs().max() < tol, (n_iter, (cols - 1).abs().max())
            assert w[:, pad].abs().max() == 0 and w.transpose(-1, -2)[:, pad].abs().max() == 0
        sink.set_n_iter(1)
        _, w1 = sink.encoder.layers[0].self_attn(x, x, x, key_padding_mask=pad, need_head_weights=True)
        assert ((w1 * (~pad)[None, :, :, None]).sum(-2)[:, ~pad] - 1).abs().max() > 0.1  # softmax: columns are not


@pytest.mark.slow
def test_fairseq_train_with_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fs: object) -> None:
    """(4) fairseq-train --user-dir zoo_fairseq on a tiny binarized dataset (3 updates, CPU); the checkpoint reads
    with from_fairseq_checkpoint (n_iter from --sinkhorn-iters) and agrees with fairseq's own loading."""
    from zoo.data.translation import Dictionary as ZooDictionary
    from zoo.data.translation import write_binarized_split

    g = torch.Generator().manual_seed(0)
    dicts = {}
    for lang in ("de", "en"):
        d = ZooDictionary()
        for i in range(12):
            d.add_symbol(f"{lang}{i}")
        dicts[lang] = d
    data = tmp_path / "data-bin"
    for split, n in (("train", 48), ("valid", 8)):
        src = [
            torch.randint(4, len(dicts["de"]), (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
            + [2]
            for _ in range(n)
        ]
        tgt = [s[:-1][::-1] + [2] for s in src]
        write_binarized_split(data, split, "de", "en", src, tgt, dicts["de"], dicts["en"])
    save = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-c",
        "from fairseq_cli.train import cli_main; cli_main()",
        str(data),
        "--user-dir",
        str(REPO / "zoo_fairseq"),
        "--task",
        "translation",
        "-s",
        "de",
        "-t",
        "en",
        "--arch",
        "sinkformer_transformer_tiny",
        "--sinkhorn-iters",
        "3",
        "--share-decoder-input-output-embed",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--max-tokens",
        "256",
        "--max-update",
        "3",
        "--criterion",
        "label_smoothed_cross_entropy",
        "--label-smoothing",
        "0.1",
        "--dropout",
        "0.1",
        "--save-dir",
        str(save),
        "--cpu",
        "--num-workers",
        "0",
        "--disable-validation",
        "--no-epoch-checkpoints",
        "--log-format",
        "simple",
        "--seed",
        "3",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    path = save / "checkpoint_last.pt"
    assert path.is_file(), out.stdout[-2000:]

    zoo_model = SinkformerTranslation.from_fairseq_checkpoint(
        path, src_dict=data / "dict.de.txt", tgt_dict=data / "dict.en.txt"
    ).eval()
    assert zoo_model.hparams.n_iter == 3
    # the checkpoint's training settings (adam, lr 1e-3, label smoothing ...) are not the architecture's: not read
    assert not {"lr", "optimizer", "lr_scheduler", "adam_betas", "criterion"} & set(zoo_model.hparams)
    assert zoo_model.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == 5e-4  # the task default
    from fairseq import checkpoint_utils

    import zoo_fairseq  # noqa: F401  (fairseq rebuilds the plugin model from the checkpoint)

    # fairseq 0.12 calls torch.load without weights_only: torch >= 2.6 then refuses its pickled configs
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    ref_model = models[0].eval()
    assert isinstance(ref_model, zoo_fairseq.SinkformerModel) and ref_model.sinkhorn_n_iter == 3
    src, lengths, prev = batch(16, 16)
    assert_close_valid(
        zoo_log_probs(zoo_model, src, prev), fairseq_log_probs(ref_model, src, lengths, prev), prev, tol=5e-5
    )
