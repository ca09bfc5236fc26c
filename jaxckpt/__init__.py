"""jaxckpt: fast, safe, open checkpoints for JAX pytrees."""

from ._checkpoint import SaveHandle as SaveHandle
from ._checkpoint import save as save
from ._checkpoint import save_async as save_async
from ._convert import convert as convert
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointExistsError as CheckpointExistsError
from ._errors import CheckpointNotFoundError as CheckpointNotFoundError
from ._errors import CoordinationError as CoordinationError
from ._errors import CorruptCheckpointError as CorruptCheckpointError
from ._errors import FormatVersionError as FormatVersionError
from ._errors import StorageError as StorageError
from ._errors import StructureMismatchError as StructureMismatchError
from ._errors import UnsupportedLeafError as UnsupportedLeafError
from ._manager import CheckpointManager as CheckpointManager
from ._manager import latest_checkpoint as latest_checkpoint
from ._match import MatchStatus as MatchStatus
from ._match import match as match
from ._progress import set_progress as set_progress
from ._reader import Reader as Reader
from ._reader import list_variables as list_variables
from ._reader import open as open
from ._restore import restore as restore
from .storage import set_storage_options as set_storage_options

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "convert",
    "CoordinationError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "latest_checkpoint",
    "list_variables",
    "match",
    "MatchStatus",
    "open",
    "Reader",
    "restore",
    "save",
    "save_async",
    "SaveHandle",
    "set_progress",
    "set_storage_options",
    "StorageError",
    "StructureMismatchError",
    "UnsupportedLeafError",
]
