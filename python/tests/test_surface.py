"""The module's names, paths and signatures are upstream 2.5.1's (recorded from its wheel)."""

from __future__ import annotations

import importlib

import pytest

import wse_server
from wse_server import RustWSEServer, _wse_accel

# RustWSEServer's methods and their __text_signature__ in upstream 2.5.1, verbatim.
UPSTREAM_METHODS = {
    "broadcast": "($self, topic, data)",
    "broadcast_all": "($self, data)",
    "broadcast_all_bytes": "($self, data)",
    "broadcast_local": "($self, topic, data)",
    "cluster_connected": "($self)",
    "cluster_info": "($self)",
    "cluster_peers_count": "($self)",
    "connect_cluster": "($self, peers, tls_cert=None, tls_key=None, tls_ca=None, "
                       "cluster_port=None, seeds=None, cluster_addr=None)",
    "disconnect": "($self, conn_id)",
    "drain": "($self, close_code=4300, close_reason=\"\", timeout=30)",
    "drain_inbound": "($self, max_count=256, timeout_ms=50)",
    "enable_drain_mode": "($self)",
    "get_cluster_dlq_entries": "($self)",
    "get_connection_count": "($self)",
    "get_connections": "($self)",
    "get_queue_group_info": "($self, topic)",
    "get_topic_subscriber_count": "($self, topic)",
    "health_snapshot": "($self)",
    "inbound_dropped_count": "($self)",
    "inbound_queue_depth": "($self)",
    "is_running": "($self)",
    "presence": "($self, topic)",
    "presence_stats": "($self, topic)",
    "prometheus_metrics": "($self)",
    "reload_cluster_tls": "($self, cert_path, key_path, ca_path)",
    "send": "($self, conn_id, data)",
    "send_bytes": "($self, conn_id, data)",
    "send_event": "($self, conn_id, event, compression_threshold=1024)",
    "set_callbacks": "($self, on_connect, on_message, on_disconnect)",
    "set_topic_acl": "($self, conn_id, allow=None, deny=None)",
    "start": "($self)",
    "stop": "($self)",
    "subscribe_connection": "($self, conn_id, topics, presence_data=None, queue_group=None)",
    "subscribe_with_recovery": "($self, conn_id, topics, recover=False, epoch=None, offset=None)",
    "unsubscribe_connection": "($self, conn_id, topics=None)",
    "update_presence": "($self, conn_id, data)",
}


def test_module_paths_are_upstreams() -> None:
    assert importlib.import_module("wse_server._wse_accel") is _wse_accel
    assert _wse_accel.__file__.endswith("_wse_accel.abi3.so")
    assert RustWSEServer.__module__ == "wse_server._wse_accel"
    assert wse_server.__version__ == "2.4.0"


@pytest.mark.parametrize("name", sorted(UPSTREAM_METHODS))
def test_method_signature_and_docstring(name: str) -> None:
    method = getattr(RustWSEServer, name)
    assert method.__text_signature__ == UPSTREAM_METHODS[name]
    assert method.__doc__ and method.__doc__.strip()


def test_constructor_signature() -> None:
    import inspect

    params = inspect.signature(RustWSEServer).parameters
    assert list(params)[:3] == ["host", "port", "max_connections"]
    assert params["max_connections"].default == 1000
    assert params["max_inbound_queue_size"].default == 131072
    assert params["rate_limit_capacity"].default == 100000.0
    assert params["max_outbound_queue_bytes"].default == 16777216
    assert len(params) == 26


def test_jwt_helpers_signatures() -> None:
    assert wse_server.rust_jwt_encode.__text_signature__ == \
        '(claims, secret, algorithm="HS256", key_id=None)'
    assert wse_server.rust_jwt_decode.__text_signature__ == \
        '(token, secret, algorithm="HS256", issuer=None, audience=None, previous_secret=None, key_id=None)'


def test_every_upstream_top_level_name_is_provided() -> None:
    # Upstream 2.5.1's __all__ (its wse_server/__init__.py), in its order.
    assert wse_server.__all__ == [
        "RustWSEServer", "RustCompressionManager", "RustEventSequencer",
        "RustPriorityMessageQueue", "RustPriorityQueue", "RustSequencer", "RustTokenBucket",
        "rust_jwt_encode", "rust_jwt_decode", "rust_aes_gcm_encrypt", "rust_aes_gcm_decrypt",
        "rust_ecdh_generate_keypair", "rust_ecdh_derive_shared_secret", "rust_hmac_sha256",
        "rust_sha256", "rust_compress", "rust_decompress", "rust_should_compress",
        "rust_sign_message", "rust_match_event", "rust_transform_event", "EventFilter",
        "EventPriority", "DeliveryGuarantee", "__version__"]
    for name in wse_server.__all__:  # what `from wse_server import *` needs
        getattr(wse_server, name)
    with pytest.raises(AttributeError, match="no attribute 'WSERouter'"):
        wse_server.WSERouter  # noqa: B018


def test_jwt_round_trip() -> None:
    from wse_server import rust_jwt_decode, rust_jwt_encode

    secret = b"k" * 32
    tok = rust_jwt_encode({"sub": "alice", "exp": 4_000_000_000}, secret, key_id="k1")
    assert rust_jwt_decode(tok, secret) == {"sub": "alice", "exp": 4_000_000_000}
    assert rust_jwt_decode(tok, b"x" * 32) is None
    assert rust_jwt_decode(tok, b"x" * 32, previous_secret=secret)["sub"] == "alice"
    assert rust_jwt_decode(tok, secret, key_id="k2") is None
    assert rust_jwt_decode("garbage", secret) is None
    assert rust_jwt_decode(tok, secret, "HS512") is None
    with pytest.raises(ValueError):
        rust_jwt_encode({"sub": "a"}, secret, "HS512")
    aud = rust_jwt_encode({"sub": "a", "exp": 4_000_000_000, "aud": "app", "iss": "me"}, secret)
    assert rust_jwt_decode(aud, secret, issuer="me", audience="app")["aud"] == "app"
    assert rust_jwt_decode(aud, secret, issuer="other") is None


def test_every_public_name_has_a_stub_and_a_docstring() -> None:
    import ast
    from pathlib import Path

    stub = Path(wse_server.__file__).with_name("_wse_accel.pyi")
    stubbed = {node.name for node in ast.parse(stub.read_text()).body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    typed_python = {"EventFilter", "EventPriority", "DeliveryGuarantee"}  # .py with annotations
    for name in wse_server.__all__:
        if name == "__version__":
            continue
        obj = getattr(wse_server, name)
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
        assert name in stubbed or name in typed_python, f"{name} is not in _wse_accel.pyi"
