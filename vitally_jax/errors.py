"""User-facing errors: one clear line, a documented exit code, no traceback unless --debug.

Every error a user can cause by bad input derives from `VitallyError`. Command-line entry points wrap their
work in `vitally_jax.cli.run_cli`, which prints `error: <message>` on one line and exits with `exit_code`.
"""


class VitallyError(Exception):
    """Base class; the message must name the file/field and say what was expected."""

    exit_code = 2


class ConfigError(VitallyError):
    """Invalid configuration key or value."""

    exit_code = 3


class DataError(VitallyError):
    """Missing/corrupt images, wrong shapes or dtypes, bad metadata tables."""

    exit_code = 4


class CheckpointError(VitallyError):
    """No usable checkpoint, or a checkpoint that does not match the model."""

    exit_code = 5


class WeightsError(VitallyError):
    """A weight file whose keys or shapes do not match the requested model."""

    exit_code = 6


class BenchmarkInputError(VitallyError):
    """Embeddings/metadata/annotations that the map benchmarks cannot score."""

    exit_code = 7


class ResourceError(VitallyError):
    """Unwritable output location, disk full, and similar environment problems."""

    exit_code = 8


class TrainingDivergedError(VitallyError):
    """A non-finite loss; the last good checkpoint is left intact."""

    exit_code = 9


class OutputError(VitallyError):
    """An output path that is not ours to write: someone else's files, an input, or an artefact without --overwrite."""

    exit_code = 10
