//! Values between Python and the engine: JSON ⇄ Python objects, and application events as the
//! `(event_type, conn_id, data)` tuples upstream's `drain_inbound` returns.
//!
//! Owns: the shapes Python code sees. Never: talks to the engine.

use pyo3::IntoPyObjectExt;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value};
use wse_shards::{AppEvent, AppEventKind};

/// A JSON value as the Python object `json.loads` would give.
pub fn json_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_bound_py_any(py)?,
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_bound_py_any(py)?,
            (None, Some(u)) => u.into_bound_py_any(py)?,
            _ => n.as_f64().unwrap_or(f64::NAN).into_bound_py_any(py)?,
        },
        Value::String(s) => s.into_bound_py_any(py)?,
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, item) in map {
                dict.set_item(k, json_to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

/// A Python object (dict, list, tuple, str, int, float, bool, None) as JSON.
///
/// # Errors
/// `TypeError` for anything else, or a dict key that is not a string.
pub fn py_to_json(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // bool before int: Python's bool is an int.
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.cast::<PyInt>().is_ok() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Ok(Value::from(obj.extract::<f64>()?));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let f = f.value();
        return Ok(serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_cow()?.into_owned()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in d.iter() {
            let Ok(k) = k.cast::<PyString>() else {
                return Err(PyTypeError::new_err("JSON object keys must be str"));
            };
            map.insert(k.to_cow()?.into_owned(), py_to_json(&v)?);
        }
        return Ok(Value::Object(map));
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return l
            .iter()
            .map(|v| py_to_json(&v))
            .collect::<PyResult<_>>()
            .map(Value::Array);
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t
            .iter()
            .map(|v| py_to_json(&v))
            .collect::<PyResult<_>>()
            .map(Value::Array);
    }
    Err(PyTypeError::new_err(format!(
        "{} is not JSON serializable",
        obj.get_type().name()?
    )))
}

/// What a client message becomes for Python: a JSON object is a dict (`"msg"`); any other text
/// is a str (`"raw"`), as upstream hands them over.
pub enum Message<'py> {
    Msg(Bound<'py, PyAny>),
    Raw(Bound<'py, PyAny>),
    Bin(Bound<'py, PyAny>),
}

/// An application event as upstream's `drain_inbound` tuple `(event_type, conn_id, data)`:
///
/// | event_type | conn_id | data |
/// |---|---|---|
/// | `connect` | str | `""` (authentication off) |
/// | `auth_connect` | str | the JWT `sub` (str) |
/// | `msg` | str | the message, a dict |
/// | `raw` | str | text that is not a JSON object, a str |
/// | `bin` | str | bytes |
/// | `disconnect` | str | `None` |
/// | `presence_join` / `presence_leave` | `None` | `{"topic", "user_id", "data"}` |
/// | `rpc` | str | `{"request", "method", "data"}` (never today: the embedded server does not
/// take Centrifuge rpcs, they are answered 108) |
pub fn event_tuple<'py>(py: Python<'py>, e: &AppEvent) -> PyResult<Bound<'py, PyTuple>> {
    let conn = e.conn.map(|c| c.to_string());
    let (name, conn, data): (&str, Option<String>, Bound<'py, PyAny>) = match e.kind {
        AppEventKind::Connect => ("connect", conn, "".into_bound_py_any(py)?),
        AppEventKind::AuthConnect => ("auth_connect", conn, auth_user(e).into_bound_py_any(py)?),
        AppEventKind::Msg | AppEventKind::Raw | AppEventKind::Bin => match message(py, e)? {
            Message::Msg(d) => ("msg", conn, d),
            Message::Raw(s) => ("raw", conn, s),
            Message::Bin(b) => ("bin", conn, b),
        },
        AppEventKind::Disconnect => ("disconnect", conn, py.None().into_bound(py)),
        AppEventKind::PresenceJoin => ("presence_join", None, payload_json(py, e)?),
        AppEventKind::PresenceLeave => ("presence_leave", None, payload_json(py, e)?),
        AppEventKind::Rpc => ("rpc", conn, payload_json(py, e)?),
    };
    PyTuple::new(
        py,
        [
            name.into_bound_py_any(py)?,
            conn.into_bound_py_any(py)?,
            data,
        ],
    )
}

/// The message an `msg`/`raw`/`bin` event carries, as upstream hands it to Python.
pub fn message<'py>(py: Python<'py>, e: &AppEvent) -> PyResult<Message<'py>> {
    Ok(match e.kind {
        AppEventKind::Bin => Message::Bin(PyBytes::new(py, &e.payload).into_any()),
        _ => match serde_json::from_slice::<Value>(&e.payload) {
            Ok(v @ Value::Object(_)) => Message::Msg(json_to_py(py, &v)?),
            _ => Message::Raw(String::from_utf8_lossy(&e.payload).into_bound_py_any(py)?),
        },
    })
}

/// The user of an `auth_connect` event: the token's `sub` (the engine's user id otherwise).
pub fn auth_user(e: &AppEvent) -> String {
    serde_json::from_slice::<Value>(&e.payload)
        .ok()
        .and_then(|v| v.get("sub").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| e.user.to_string())
}

fn payload_json<'py>(py: Python<'py>, e: &AppEvent) -> PyResult<Bound<'py, PyAny>> {
    let v = serde_json::from_slice::<Value>(&e.payload).unwrap_or(Value::Object(Map::new()));
    json_to_py(py, &v)
}
