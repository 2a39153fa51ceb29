"""The one exception type for a user's mistake in a setting or an input file.

Library code raises :class:`SettingsError` with a message that starts with the setting it blames
(``data.train_shards: ...``, ``--shard-size: ...``); entry scripts catch the type and print that one line
with a non-zero exit instead of a traceback. It is a ``ValueError`` so callers that already catch
``ValueError`` keep working; :class:`MissingFileError` (a setting naming a file or folder that is not there)
is also a ``FileNotFoundError`` for callers that catch that.
"""

from __future__ import annotations


class SettingsError(ValueError):
    """A setting or input the user gave is wrong; the message names it and says what to do."""


class MissingFileError(SettingsError, FileNotFoundError):
    """A setting names a file or folder that does not exist (nothing is downloaded or created in its place)."""
