"""One exception type for bad input, so every CLI prints one clear line instead of a traceback.

Raise `InputError(what, problem, fix)` wherever user input (a path, a config key, a credential, a
checkpoint) is wrong. The message always names the input and says how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CMSRDError(Exception):
    """Base class of the toolkit's own errors."""


class InputError(CMSRDError, ValueError):
    """A user-supplied input is wrong. The message names the input, the problem and the fix."""

    def __init__(self, what: str, problem: str, fix: str | None = None):
        self.what, self.problem, self.fix = what, problem, fix
        msg = f"{what}: {problem}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


def unknown_name(what: str, problem: str, name: object, valid: Iterable[object]) -> InputError:
    """The one error for a name that is not among `valid` (a config key, a network parameter, a `train.*` key,
    a choice): the closest valid name in the problem when one is close, every valid name in the fix, so a
    typo reads the same wherever it is made. Returned, for the caller to `raise`."""
    names = sorted(str(v) for v in valid)
    close = difflib.get_close_matches(str(name), names, n=1)
    return InputError(
        what, problem + (f" (did you mean `{close[0]}`?)" if close else ""), f"use one of: {', '.join(names)}"
    )


class CredentialsError(InputError):
    """A service refused the credentials (HTTP 401/403, OAuth invalid_client). Every further request would be
    refused too, so a build stops at once with this one error (naming the credential variables) instead of
    recording it against each sample."""


class MissingWeightsError(InputError):
    """A weights file is absent. Names the file, where it is expected and where it comes from."""

    def __init__(self, name: str, expected_path: str, source: str | None = None, why_none: str | None = None):
        fix = f"put the file at {expected_path}"
        if source:
            fix += f" (download from {source}, or run `cmsrd-bench weights fetch` on a machine with network)"
        elif why_none:  # no URL: say why, and suggest no fetch that cannot succeed
            fix += f" ({why_none})"
        super().__init__(f"weights '{name}'", "file not found", fix)
        self.expected_path = expected_path


class SampleError(CMSRDError):
    """One sample failed for a named reason; recorded in the manifest, never stops the build."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
