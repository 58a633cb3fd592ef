"""Which modules a checkpoint, package or CLI run may name a class from: the one resolution function.

A checkpoint or package names its task and model classes by dotted path. Importing a module runs
its code, so a file that names ``this.Model`` must not even import ``this``: :func:`resolve_class`
checks the path against an allow-list *before* any import, then imports and checks the subclass.

Trusted are ``matsciml`` and its submodules, plus modules the user names: ``trusted_modules=[...]``
in Python, ``--trust-module NAME`` on the command line, or the ``MATSCIML_TRUSTED_MODULES``
environment variable (comma-separated). The CLI writes its ``--trust-module`` names into that
variable, so the processes Lightning's DDP launcher starts (which re-run the command line, with
the flag already removed) inherit them. Trusting ``my_models`` trusts ``my_models.sub`` too.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from argparse import ArgumentError
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

ENV_VAR = "MATSCIML_TRUSTED_MODULES"
FLAG = "--trust-module"
_ALWAYS = ("matsciml",)

T = TypeVar("T")


class UntrustedClassError(ValueError):
    """A class path names a module outside the trusted ones, or not a class of the required kind."""


def trusted_modules(extra: Iterable[str] | None = None) -> tuple[str, ...]:
    """``matsciml``, the modules in ``MATSCIML_TRUSTED_MODULES`` and ``extra``, checked to be module names."""
    from_env = [name.strip() for name in os.environ.get(ENV_VAR, "").split(",") if name.strip()]
    if isinstance(extra, str):  # a bare string would be trusted letter by letter
        raise TypeError(f"trusted_modules must be a list of module names, got the string {extra!r}")
    names = [*_ALWAYS, *from_env, *(extra or ())]
    for name in names:
        if not _is_dotted_name(name):
            raise ValueError(f"trusted module {name!r} is not a module name (e.g. my_models or my_models.egnn)")
    return tuple(dict.fromkeys(names))


def _is_dotted_name(text: Any) -> bool:
    return isinstance(text, str) and bool(text) and all(part.isidentifier() for part in text.split("."))


def is_trusted(module: str, trusted: Sequence[str]) -> bool:
    """Whether ``module`` is one of ``trusted`` or a submodule of one (``matsciml_x`` is not ``matsciml``'s)."""
    return any(module == name or module.startswith(name + ".") for name in trusted)


def check_trusted(class_path: Any, trusted: Iterable[str] | None = None, what: str = "class") -> str:
    """The module part of ``class_path`` if it may be imported; imports nothing.

    Args:
        class_path: ``"package.module.ClassName"`` from a file.
        trusted: modules trusted beyond ``matsciml`` and the environment variable.
        what: what the class is for, in the error (``"model class"``).

    Raises:
        UntrustedClassError: not a dotted path, or a module nobody trusted.
    """
    if not _is_dotted_name(class_path) or "." not in class_path:
        raise UntrustedClassError(f"{what} {class_path!r} is not a dotted class path such as matsciml.models.EGNN")
    module = class_path.rpartition(".")[0]
    allowed = trusted_modules(trusted)
    if not is_trusted(module, allowed):
        top = module.partition(".")[0]
        raise UntrustedClassError(
            f"{what} {class_path!r} is in module {module!r}, which is not trusted (trusted: {', '.join(allowed)}); "
            f"it was not imported. If you trust the file, pass trusted_modules=[{top!r}] in Python, "
            f"--trust-module {top} on the command line, or set {ENV_VAR}={top}"
        )
    return module


def resolve_class(class_path: Any, base: type[T], trusted: Iterable[str] | None = None, what: str = "class") -> type[T]:
    """The class named ``class_path``, a subclass of ``base``, imported only from a trusted module.

    Args:
        class_path: ``"package.module.ClassName"`` from a checkpoint, package or config.
        base: the class it must derive from (e.g. ``AbstractEnergyModel``).
        trusted: modules trusted beyond ``matsciml`` and ``MATSCIML_TRUSTED_MODULES``.
        what: what the class is for, in the error (``"model class"``).

    Raises:
        UntrustedClassError: an untrusted module (refused before importing it), a module or name
            that does not exist, or a class that is not a ``base``.
    """
    module = check_trusted(class_path, trusted, what)
    name = class_path.rpartition(".")[2]
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError as err:
        raise UntrustedClassError(f"{what} {class_path!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UntrustedClassError(f"{what} {class_path!r} is not a {base.__name__} subclass")
    return cls


def check_class_paths(value: Any, trusted: Iterable[str] | None = None, where: str = "hyper_parameters") -> None:
    """Refuse, without importing, any ``class_path`` / ``_class_path`` in nested hyper-parameters.

    jsonargparse imports every ``class_path`` it parses, at any depth, so a config read from a
    checkpoint is checked whole before it is parsed.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("class_path", "_class_path"):
                check_trusted(item, trusted, f"{where}.{key}")
            else:
                check_class_paths(item, trusted, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_class_paths(item, trusted, f"{where}[{i}]")


def is_zip(source: Any) -> bool:
    """Whether ``source`` (a path or a seekable binary stream, left where it was) is a zip archive.

    torch.save and Lightning write zip files (since torch 1.6); torch's reader of the older format
    preallocates what a damaged length field claims (a MemoryError from an 8-byte file), so the
    loaders refuse anything else unread. ``zipfile`` itself raises on some damaged archives
    (multi-disk ones): those are not zip files a loader can read either.
    """
    import zipfile

    start = source.tell() if hasattr(source, "seek") else None
    try:
        return zipfile.is_zipfile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    finally:
        if start is not None:
            source.seek(start)


def check_checkpoint_classes(path: str | os.PathLike | None, trusted: Iterable[str] | None = None) -> None:
    """Refuse a checkpoint whose hyper-parameters name a class outside the trusted modules, unimported.

    For ``--ckpt_path``, which LightningCLI reads (weights-only) and parses with jsonargparse
    (importing each ``class_path``); a missing path is left to Lightning's own error.
    """
    if not path or not Path(path).is_file():
        return
    import torch

    if not is_zip(path):
        raise UntrustedClassError(f"{path}: not a weights-only checkpoint (not a zip file, as Lightning writes)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # what Lightning reads: no pickled code
    except Exception as err:  # torch 2.2 would unpickle it later with weights_only=False: refuse it here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UntrustedClassError(
            f"{path}: not a weights-only checkpoint (it holds pickled objects, which matsciml never loads): {reason}"
        ) from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    check_class_paths(hparams or {}, trusted, where=f"{path}: hyper_parameters")


def pop_trust_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``--trust-module NAME`` / ``--trust-module=NAME`` options, and the names."""
    rest, names, args = [], [], iter(argv)
    for arg in args:
        if arg == FLAG or arg.startswith(FLAG + "="):
            name = next(args, None) if arg == FLAG else arg.partition("=")[2]
            if not _is_dotted_name(name):  # a usage error, as argparse reports one
                raise ArgumentError(None, f"{FLAG} needs a module name (e.g. {FLAG} my_models), got {name!r}")
            names.append(name)
        else:
            rest.append(arg)
    return rest, names


@contextlib.contextmanager
def trusting(names: Iterable[str]) -> Iterator[None]:
    """Add ``names`` to ``MATSCIML_TRUSTED_MODULES`` for the duration of a command.

    The environment, unlike a Python global, reaches child processes (DDP ranks, workers);
    the previous value comes back afterwards, so one in-process command cannot widen the trust
    of the next.
    """
    names, previous = list(names), os.environ.get(ENV_VAR)
    if names:
        os.environ[ENV_VAR] = ",".join(trusted_modules(names)[len(_ALWAYS) :])
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous
