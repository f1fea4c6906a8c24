"""Model cards: the ``README.md`` that ``save_pretrained`` writes beside ``config.json`` and ``model.safetensors``.

The layout is Hugging Face's: a YAML front matter (``library_name``, ``tags``, ``license``, ``pipeline_tag``,
``base_model``, and ``model-index`` results when metrics are known), then the text: what the model is, its
pretrained configuration (timm's keys), where its weights come from and what the conversion computes, its
architecture arguments, the training settings it was given, its metrics (each marked published or measured, and
whether it is the source's or this model's), and how to load it.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

__all__ = ["describe_factory", "model_card"]

_PIPELINES = {"ImageClassifier": "image-classification", "TranslationTask": "translation"}


def _public_path(cls: type) -> str:
    """The shortest already-imported module path that exports ``cls`` (``torch.optim.SGD``, not
    ``torch.optim.sgd.SGD``), as one would write it in a recipe; nothing is imported."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{'.'.join(parts[:i])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_factory(factory: Any) -> dict[str, Any] | None:
    """``{"class_path": ..., "init_args": {...}}`` of an optimiser / schedule callable ``factory`` when it can be
    read (a class, ``functools.partial`` of one, or LightningCLI's callable), else its repr under ``"callable"``;
    None for ``factory=None``."""
    if factory is None:
        return None
    if inspect.isclass(factory):
        return {"class_path": _public_path(factory), "init_args": {}}
    if isinstance(factory, functools.partial):
        target = factory.func
        args = factory.args
        if not inspect.isclass(target) and args and inspect.isclass(args[0]):  # jsonargparse: partial(fn, cls, ...)
            target, args = args[0], args[1:]
        if inspect.isclass(target) and not args:
            kwargs = {k: v for k, v in factory.keywords.items() if _plain(v)}
            return {"class_path": _public_path(target), "init_args": kwargs}
    return {"callable": repr(factory)}


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _task_kind(model: nn.Module) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in _PIPELINES:
            return _PIPELINES[cls.__name__]
    return None


def _yaml_scalar(value: Any) -> str:
    return json.dumps(value)  # JSON scalars are YAML scalars


def _front_matter(model: nn.Module, cfg: Mapping[str, Any], repo_id: str | None) -> str:
    family = type(model).__name__
    tags = ["zoo", "pytorch", "lightning", family]
    arch = cfg.get("architecture")
    if arch:
        tags.append(str(arch))
    kind = _task_kind(model)
    lines = ["---", "library_name: zoo", "tags:"]
    lines += [f"- {_yaml_scalar(t)}" for t in dict.fromkeys(tags)]
    if cfg.get("license"):
        lines.append(f"license: {_yaml_scalar(cfg['license'])}")
    if kind:
        lines.append(f"pipeline_tag: {kind}")
    source = cfg.get("source")
    if isinstance(source, str) and source.startswith("hf-hub:"):
        lines.append(f"base_model: {_yaml_scalar(source[len('hf-hub:') :].split('@')[0])}")
    results = [(name, m) for name, m in _metrics(cfg).items() if m.get("of", "model") == "model"]
    if results:
        lines += ["model-index:", f"- name: {_yaml_scalar(repo_id or arch or family)}", "  results:"]
        for name, m in results:
            dataset, _, metric = name.partition("/")
            label = f"{metric or name} ({m.get('kind', 'reported')})"
            lines += [
                "  - task:",
                f"      type: {kind or 'other'}",
                "    dataset:",
                f"      name: {_yaml_scalar(dataset)}",
                f"      type: {_yaml_scalar(dataset)}",
                "    metrics:",
                f"    - type: {_yaml_scalar(metric or name)}",
                f"      value: {_yaml_scalar(m.get('value'))}",
                f"      name: {_yaml_scalar(label)}",
            ]
    lines.append("---")
    return "\n".join(lines)


def _metrics(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    metrics = cfg.get("metrics") or {}
    out = {}
    for name, m in metrics.items():
        if isinstance(m, Mapping) and "value" in m:
            out[str(name)] = dict(m)
        elif isinstance(m, (int, float)):
            out[str(name)] = {"value": m}
    return out


def model_card(model: nn.Module, config: Mapping[str, Any], repo_id: str | None = None) -> str:
    """The ``README.md`` text of ``model`` saved with ``config`` (``zoo.hub.model_config``).

    Args:
        model: the model the card describes (its ``pretrained_cfg`` as :func:`zoo.hub.stated_pretrained_cfg`
            states it: source weights and metrics only when they were loaded into it; its class docstring and
            training settings).
        config: its saved config, ``{"class_path": ..., "init_args": {...}}``.
        repo_id: the Hub repository the usage line loads from (``"hf-hub:<repo_id>"``); None for "<this folder>".
    """
    from zoo.hub import stated_pretrained_cfg

    # source weights, conversion and metrics only where they hold (weights loaded, head kept): not the table entry
    # of a model built without its weights
    cfg = dict(stated_pretrained_cfg(model) or {})
    family = type(model).__name__
    arch = cfg.get("architecture")
    # a tag whose weights were not loaded names weights this model does not have: the architecture alone
    tag_weights_absent = bool((getattr(model, "pretrained_cfg", None) or {}).get("source")) and not cfg.get("source")
    tag = cfg.get("tag") if not tag_weights_absent else None
    title = f"{arch}.{tag}" if arch and tag else (arch or family)
    load_from = f"hf-hub:{repo_id}" if repo_id else "<this folder>"
    parts = [_front_matter(model, cfg, repo_id), "", f"# {title}", ""]
    doc = (inspect.getdoc(type(model)) or "").split("\n\n")[0].replace("\n", " ")
    parts += [f"A `zoo` {family}: {doc}" if doc else f"A `zoo` {family}.", ""]
    if cfg.get("description"):
        parts += [str(cfg["description"]), ""]
    parts += [
        "## Usage",
        "",
        "```python",
        "import zoo",
        "",
        f'model = zoo.from_pretrained("{load_from}").eval()',
        "```",
        "",
    ]
    source = cfg.get("source")
    if source or cfg.get("conversion"):
        parts += ["## Source weights and conversion", ""]
        if source:
            parts.append(f"- Source: `{source}`")
        if cfg.get("conversion"):
            parts.append(f"- Conversion: {cfg['conversion']}")
        if cfg.get("model_args"):
            parts.append(f"- Arguments the configuration sets: `{json.dumps(cfg['model_args'])}`")
        parts.append("")
    metrics = _metrics(cfg)
    if metrics:
        parts += ["## Metrics", "", "| metric | value | kind | of | note |", "|---|---|---|---|---|"]
        for name, m in metrics.items():
            parts.append(
                f"| {name} | {m.get('value')} | {m.get('kind', '')} | {m.get('of', '')} | {m.get('note', '')} |"
            )
        parts.append("")
    parts += [
        "## Architecture",
        "",
        f"Class `{config['class_path']}`, constructor arguments:",
        "",
        "```json",
        json.dumps(config.get("init_args", {}), indent=2, sort_keys=True),
        "```",
        "",
    ]
    training = {
        name: describe_factory(getattr(model, f"{name}_factory", None)) for name in ("optimizer", "lr_scheduler")
    }
    training = {k: v for k, v in training.items() if v is not None}
    # the image task's other training settings, where they differ from their defaults
    for name, default in (("layer_decay", None), ("mixup_alpha", 0.0), ("cutmix_alpha", 0.0)):
        value = getattr(model, name, default)
        if value != default:
            training[name] = value
    if getattr(model, "checkpoint_in_fit", False):
        training["grad_checkpointing"] = True
    if training:
        parts += [
            "## Training settings given to this model",
            "",
            "Not part of the saved model (give them again to train): ",
            "",
            "```json",
            json.dumps(training, indent=2, sort_keys=True, default=repr),
            "```",
            "",
        ]
    if cfg:
        shown = {k: v for k, v in cfg.items() if k not in ("metrics", "description") and _plain(v)}
        reads = (
            " (`timm.data.resolve_data_config({}, model=model)` reads the input size and transforms)"
            if "input_size" in shown
            else ""
        )
        parts += [
            "## Pretrained configuration",
            "",
            f"timm's keys{reads}:",
            "",
            "```json",
            json.dumps(shown, indent=2, sort_keys=True),
            "```",
            "",
        ]
    return "\n".join(parts)
