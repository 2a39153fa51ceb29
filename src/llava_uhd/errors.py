"""Exception types for a user's mistake in a setting, an option or an input file.

Library code raises one of these with a message that starts with what it blames (``data.train_shards: ...``,
``--device cuda: ...``, the file and field); the entry script that catches it prints that one line and exits
non-zero instead of showing a traceback.

- :class:`SettingsError` (a ``ValueError``): a training setting or command-line option is wrong. The training
  app (``src/main.py``) catches it as ``config error: ...``; the benchmark commands, which catch
  ``ValueError``, print it as ``error: ...``.

  - :class:`MissingFileError` (also a ``FileNotFoundError``): a setting names a file or folder that is not there.
  - :class:`DataError`: the training data failed its check (more than ``data.max_skip_fraction`` of an
    epoch's samples skipped, or none usable); the training app prints it as ``data error: ...``.
  - :class:`UsageError`: bad input to ``python -m llava_uhd.generate`` (an image, the model folder, the
    prompt); that command catches every ``SettingsError`` and exits with status 1.

- :class:`ReleaseError` (a ``ValueError``): a folder that cannot be read as a released LLaVA-UHD v3 model.
  ``python -m llava_uhd.convert`` prints it; ``python -m llava_uhd.generate`` reports it as a ``UsageError``.
- :class:`EvalError`: bad benchmark input (TSV file, column, image, prediction). ``python -m llava_uhd.eval``
  prints it with exit status 2; the evaluation loop and the ``val_tsv`` loader skip a row whose image it
  names (with a warning), and ``data.val_tsv`` turns an unreadable file into a ``SettingsError``.

Errors that are not a user's mistake stay with the code that raises them: ``datamodules.samples.SampleError``
and ``llava_uhd.conversation.ConversationError`` (a sample that is skipped and counted by reason, never
fatal), ``callbacks.ZeroInitError`` (a WTC that does not start as average pooling; it stops training) and
``llava_uhd.bench.runs.RunError`` (a benchmark run that failed to train or score).
"""

from __future__ import annotations


class SettingsError(ValueError):
    """A setting or input the user gave is wrong; the message names it and says what to do."""


class MissingFileError(SettingsError, FileNotFoundError):
    """A setting names a file or folder that does not exist (nothing is downloaded or created in its place)."""


class UsageError(SettingsError):
    """Bad input to the generate command, named in one message; the command exits with status 1."""


class ReleaseError(ValueError):
    """A folder that cannot be read as a released LLaVA-UHD v3 model; the message names the file and field."""


class EvalError(Exception):
    """Bad benchmark input (file, column, image, prediction): the eval command prints it as one message."""


class DataError(SettingsError):
    """The training data, not a setting, is the problem (too many samples skipped, none usable): entry scripts
    print it as ``data error: ...``. A :class:`SettingsError` so callers that catch that keep working."""
