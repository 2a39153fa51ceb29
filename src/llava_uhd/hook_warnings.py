"""Silencing a framework's false alarm between two of its hooks, and only then.

Lightning raises some warnings from inside ``trainer.fit`` (at train start, while it sets up loaders) that are
wrong for this product's callbacks and loaders. No ``with warnings.catch_warnings()`` block in our code can
reach around those calls, and ``catch_warnings`` restores the whole filter list on exit, which breaks when two
such windows overlap without nesting. :class:`IgnoreBetweenHooks` adds its filters in one hook and takes
exactly those out again in a later one, leaving every other filter as it finds it.
"""

from __future__ import annotations

import warnings


class IgnoreBetweenHooks:
    """``ignore`` adds an "ignore" filter for one message (a regular expression matched at the start of the
    warning's text); ``restore`` takes out every filter this object added. Call ``restore`` from the hook that
    ends the window and from the failure hooks (``on_exception``, ``teardown``): it is safe to call twice."""

    def __init__(self) -> None:
        self._added: list[tuple] = []

    @property
    def active(self) -> bool:
        """Whether a filter of this object is in place."""
        return bool(self._added)

    def ignore(self, message: str) -> None:
        """Ignore warnings whose message matches ``message`` until :meth:`restore`."""
        before = list(warnings.filters)
        warnings.filterwarnings("ignore", message=message)
        entry = warnings.filters[0]
        if entry not in before:  # an identical filter someone else set stays theirs
            self._added.append(entry)

    def restore(self) -> None:
        """Take out the filters :meth:`ignore` added; the others stay as they are."""
        for entry in self._added:
            if entry in warnings.filters:
                warnings.filters.remove(entry)
        self._added.clear()
