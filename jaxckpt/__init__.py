"""jaxckpt: fast, safe, open checkpoints for JAX pytrees."""

from jaxckpt.checkpoint.match import MatchStatus as MatchStatus
from jaxckpt.checkpoint.match import match as match
from jaxckpt.checkpoint.reader import Reader as Reader
from jaxckpt.checkpoint.reader import list_variables as list_variables
from jaxckpt.checkpoint.reader import open as open
from jaxckpt.checkpoint.restore import restore as restore
from jaxckpt.checkpoint.save import SaveHandle as SaveHandle
from jaxckpt.checkpoint.save import save as save
from jaxckpt.checkpoint.save import save_async as save_async
from jaxckpt.errors import CheckpointError as CheckpointError
from jaxckpt.errors import CheckpointExistsError as CheckpointExistsError
from jaxckpt.errors import CheckpointNotFoundError as CheckpointNotFoundError
from jaxckpt.errors import CoordinationError as CoordinationError
from jaxckpt.errors import CorruptCheckpointError as CorruptCheckpointError
from jaxckpt.errors import FormatVersionError as FormatVersionError
from jaxckpt.errors import StorageError as StorageError
from jaxckpt.errors import StructureMismatchError as StructureMismatchError
from jaxckpt.errors import UnsupportedLeafError as UnsupportedLeafError
from jaxckpt.interop.convert import convert as convert
from jaxckpt.manager import CheckpointManager as CheckpointManager
from jaxckpt.manager import latest_checkpoint as latest_checkpoint
from jaxckpt.progress import set_progress as set_progress
from jaxckpt.storage import set_storage_options as set_storage_options

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
