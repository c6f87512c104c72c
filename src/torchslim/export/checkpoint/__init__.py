"""torchslim's single-file checkpoint (``.slim``).

A checkpoint is one safetensors file (:mod:`.format`). Its header metadata holds a JSON manifest under the key
``"torchslim"`` describing how to rebuild the model (a factory plus keyword arguments, plus the modules whose
type or shape changed since the factory built them, :mod:`.codecs`), how each tensor is stored
(:mod:`.encodings`), which weights carry pruning masks, and the compression history and metrics. Nothing is
pickled: loading calls only trusted code (torchslim's and torch.nn's modules, registered codecs and
factories, and what the caller passes as ``trusted``, :mod:`.trust`), never code named only in the file's bytes.

Tensors are stored in whichever registered encoding is smallest, so pruned weights take less room on disk.
Techniques that create their own modules or tensor codings declare :class:`ModuleCodec` and :class:`Encoding`
objects, registered with :func:`register_codecs`.
"""

from .api import load, read_manifest, save
from .codecs import MODULES, ModuleCodec, register_codecs, register_module
from .encodings import ENCODINGS, Encoding, register_encoding
from .format import FORMAT, FORMAT_VERSION, CheckpointExistsError
from .trust import register_factory

__all__ = [
    "save", "load", "read_manifest", "register_factory", "register_codecs", "register_encoding", "register_module",
    "ModuleCodec", "Encoding", "ENCODINGS", "MODULES", "CheckpointExistsError", "FORMAT", "FORMAT_VERSION",
]
