"""WSE Server -- the wse-shards engine (thread-per-core, io_uring) behind upstream's Python API.

Drop-in for PyPI ``wse-server`` 2.5.1: ``from wse_server import RustWSEServer`` and the rest of
the code stays as it is. What is implemented and what is not yet: docs/PYTHON.md.
"""

from wse_server import _utilities, _wse_accel
from wse_server._wse_accel import (
    ENGINE,
    ENGINE_VERSION,
    RustWSEServer,
    rust_aes_gcm_decrypt,
    rust_aes_gcm_encrypt,
    rust_compress,
    rust_decompress,
    rust_ecdh_derive_shared_secret,
    rust_ecdh_generate_keypair,
    rust_hmac_sha256,
    rust_jwt_decode,
    rust_jwt_encode,
    rust_sha256,
    rust_should_compress,
    rust_sign_message,
)

# Upstream compiles these into `_wse_accel`; ours are Python (`_utilities`). Attached to the
# compiled module as well, so that `from wse_server._wse_accel import RustTokenBucket` works.
for _name in _utilities.__all__:
    setattr(_wse_accel, _name, getattr(_utilities, _name))
del _name
from wse_server._utilities import (  # noqa: E402
    RustCompressionManager,
    RustEventSequencer,
    RustPriorityMessageQueue,
    RustPriorityQueue,
    RustSequencer,
    RustTokenBucket,
    rust_match_event,
    rust_transform_event,
)
from wse_server.core.filters import EventFilter  # noqa: E402
from wse_server.core.types import DeliveryGuarantee, EventPriority  # noqa: E402

# The API version this package mirrors: upstream 2.5.1's package reports "2.4.0".
__version__ = "2.4.0"
#: This package's own version (the wse-shards engine it was built from).
__engine_version__ = ENGINE_VERSION

# Upstream 2.5.1's __all__, every name provided.
__all__ = [
    "RustWSEServer",
    "RustCompressionManager",
    "RustEventSequencer",
    "RustPriorityMessageQueue",
    "RustPriorityQueue",
    "RustSequencer",
    "RustTokenBucket",
    "rust_jwt_encode",
    "rust_jwt_decode",
    "rust_aes_gcm_encrypt",
    "rust_aes_gcm_decrypt",
    "rust_ecdh_generate_keypair",
    "rust_ecdh_derive_shared_secret",
    "rust_hmac_sha256",
    "rust_sha256",
    "rust_compress",
    "rust_decompress",
    "rust_should_compress",
    "rust_sign_message",
    "rust_match_event",
    "rust_transform_event",
    "EventFilter",
    "EventPriority",
    "DeliveryGuarantee",
    "__version__",
]
