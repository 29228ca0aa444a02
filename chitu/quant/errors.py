"""The error for a quantization Chitu cannot run: named by the method, its settings or the layer."""
from chitu.errors import UserError


class UnsupportedQuantizationError(UserError):
    pass
