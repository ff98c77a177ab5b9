"""Exception hierarchy.

Every error attnkit raises derives from :class:`AttnkitError`. Errors about user input also derive from
``ValueError`` or ``TypeError`` so that callers catching the builtin types keep working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class AttnkitError(Exception):
    """Base class of every attnkit error."""


class InvalidArgumentError(AttnkitError, ValueError):
    """An argument has a bad value or shape; the message names the argument, the value seen and what is allowed."""


class InvalidArgumentTypeError(AttnkitError, TypeError):
    """An argument has the wrong type (a list where a tensor is expected, an int dtype, ...)."""


class KVCacheOverflowError(InvalidArgumentError):
    """Appending new keys/values would write past the end of the cache."""


class EnvironmentVariableError(AttnkitError, ValueError):
    """An ``ATTNKIT_*`` environment variable holds a value attnkit cannot use."""


class BackendUnsupportedError(AttnkitError, ValueError):
    """An explicitly requested backend cannot run this call; ``reasons`` says why."""

    def __init__(self, backend: str, reasons: Sequence[str]):
        self.backend = backend
        self.reasons = list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"backend {backend!r} cannot run this call:\n{lines}")


class NoBackendError(AttnkitError, RuntimeError):
    """``backend='auto'`` found no backend able to run this call; ``reasons`` maps each backend to its reasons."""

    def __init__(self, reasons: Mapping[str, Sequence[str]], summary: str = ""):
        self.reasons = {k: list(v) for k, v in reasons.items()}
        parts = [f"no attnkit backend can run this call{': ' + summary if summary else ''}"]
        for name, rs in self.reasons.items():
            parts.append(f"  {name}:")
            parts.extend(f"    - {r}" for r in rs)
        super().__init__("\n".join(parts))


class BackendCompileError(AttnkitError, RuntimeError):
    """A backend failed to compile a kernel (the compiler log is in the message)."""
