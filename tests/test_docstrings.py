"""Every public function and class of ``zoo`` and ``converters`` names each of its arguments in its docstring.

The project's rule "public docstrings list every argument", checked over the whole of both packages: every module
(``pkgutil.walk_packages``) is imported, and each public name it defines is checked: the names of its ``__all__``
(or, for a module without one, its names without a leading underscore) whose object was defined in that module (a
re-exported name is checked where it is defined). A function's docstring, or a class's docstring together with its
own ``__init__``'s, must mention every parameter of the signature by name (as a word: ``n_iter``, not inside
``n_iters``), except ``self`` / ``cls`` and the variadic ``*args`` / ``**kwargs``. A class without an ``__init__``
of its own takes its parent's arguments, documented there.

Nothing is skipped: a module that does not import, or a signature that cannot be read, is reported as an offender
too. The failure message lists every offender at once.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import types
from collections.abc import Callable, Iterator

import converters
import zoo
from zoo.ops.masks import AllowedMask

PACKAGES = (zoo, converters)


def _module_names() -> tuple[list[str], list[str]]:
    """Every module of the packages (the packages themselves included), and the ones that failed to import."""
    failed: list[str] = []
    names = [pkg.__name__ for pkg in PACKAGES]
    for pkg in PACKAGES:
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=failed.append):
            names.append(info.name)
    return sorted(set(names)), failed


def _public_objects(module: types.ModuleType) -> Iterator[tuple[str, object]]:
    """``(name, object)`` of the public names defined in ``module``."""
    names = vars(module).get("__all__")
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) == module.__name__ and (inspect.isclass(obj) or inspect.isfunction(obj)):
            yield name, obj


def _documented(obj: object) -> tuple[Callable[..., object], str] | None:
    """The callable whose signature a docstring must cover, and that docstring; None for a class that inherits its
    ``__init__`` (its arguments are documented where that ``__init__`` is defined)."""
    if inspect.isclass(obj):
        init = vars(obj).get("__init__")
        if init is None:
            return None
        return init, f"{obj.__doc__ or ''}\n{init.__doc__ or ''}"
    return obj, obj.__doc__ or ""  # type: ignore[return-value]


def _mentions(doc: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", doc) is not None


def undocumented_arguments(fn: Callable[..., object], doc: str) -> list[str]:
    """The parameters of ``fn`` that ``doc`` does not mention (``self``, ``cls``, ``*args``, ``**kwargs`` exempt)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.name not in ("self", "cls") and p.kind not in variadic and not _mentions(doc, p.name)
    ]


def _audit() -> tuple[list[str], int]:
    """(offenders, one line each; the number of docstrings checked)."""
    names, failed = _module_names()
    offenders = [f"{name}: the package walk could not import it" for name in failed]
    checked = 0
    seen: set[int] = set()
    for module_name in names:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # a module that does not import is an offender, not a skip
            offenders.append(f"{module_name}: does not import ({type(e).__name__}: {e})")
            continue
        for name, obj in _public_objects(module):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            target = _documented(obj)
            if target is None:
                continue
            fn, doc = target
            where = f"{module_name}.{name}"
            try:
                missing = undocumented_arguments(fn, doc)
            except (TypeError, ValueError) as e:
                offenders.append(f"{where}: signature cannot be read ({e})")
                continue
            checked += 1
            if not doc.strip():
                offenders.append(f"{where}: no docstring (arguments: {', '.join(missing) or 'none'})")
            elif missing:
                offenders.append(f"{where}: docstring does not name {', '.join(missing)}")
    return offenders, checked


def test_public_docstrings_name_every_argument() -> None:
    offenders, checked = _audit()
    # the walk reaches the whole of both packages (a walker that found nothing would pass vacuously)
    assert checked > 300, f"only {checked} public functions and classes were checked"
    assert not offenders, (
        f"{len(offenders)} public docstrings of zoo / converters do not name every argument (Google-style "
        "'Args:' block, or a sentence naming the argument in backticks):\n  " + "\n  ".join(offenders)
    )


def test_checker_flags_undocumented_arguments_only() -> None:
    def documented(x: int, n_iter: int, *args: int, **kwargs: int) -> None:
        """Uses ``x``.

        Args:
            n_iter: iterations.
        """

    def undocumented(x: int, n_iter: int, scale: float = 1.0) -> None:
        """Uses ``x`` for n_iters iterations at scaled steps (names inside other words do not count)."""

    assert undocumented_arguments(documented, documented.__doc__) == []
    assert undocumented_arguments(undocumented, undocumented.__doc__) == ["n_iter", "scale"]


def test_walk_covers_every_module_and_checks_classes_through_init() -> None:
    names, failed = _module_names()
    assert not failed
    for expected in ("zoo.nn.residual_stack", "zoo.ops.masks", "zoo.data.translation.numbers", "converters.registry"):
        assert expected in names

    class Undocumented:
        """A class."""

        def __init__(self, width: int) -> None:
            self.width = width

    class Inherits(Undocumented):
        """No __init__ of its own: the parent's arguments, documented (or not) there."""

    fn, doc = _documented(Undocumented)
    assert undocumented_arguments(fn, doc) == ["width"]
    fn, doc = _documented(AllowedMask)  # a dataclass: its generated __init__, its class docstring
    assert undocumented_arguments(fn, doc) == []
    assert _documented(Inherits) is None
