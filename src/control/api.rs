//! The server API over HTTP: one endpoint per operation, and `POST /api/v1/batch`.
//!
//! Owns: turning a request (path parameters and JSON body) into an [`ApiCommand`], and its
//! result into a response. Never: interprets a command (see [`super::commands`]).
//!
//! An endpoint's body is the command's fields without `op` and without what its path names:
//! `POST /api/v1/connections/{id}/send` with `{"text":".."}` is the batch entry
//! `{"op":"send","connection_id":"{id}","text":".."}`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{MethodRouter, get, post};
use serde_json::{Map, Value, json};

use super::commands::{ApiCommand, invalid_request};
use super::{ApiError, ApiErrorCode, Shared};

/// Commands one batch may hold; more is refused whole (400) before any runs.
pub(super) const BATCH_COMMANDS_MAX: usize = 1000;

/// `POST` running `op`, with `path_key` (if any) taken from the one path parameter.
pub(super) fn post_op(op: &'static str, path_key: Option<&'static str>) -> MethodRouter<Shared> {
    post(
        move |State(state): State<Shared>,
              path: Result<Path<String>, PathRejection>,
              body: Result<Bytes, BytesRejection>| async move {
            let mut fields = body_fields(body)?;
            if let Some(key) = path_key {
                add_path_param(&mut fields, key, path)?;
            }
            run(&state, op, fields).await
        },
    )
}

/// `POST` running `op` on a route without path parameters.
pub(super) fn post_plain(op: &'static str) -> MethodRouter<Shared> {
    post(
        move |State(state): State<Shared>, body: Result<Bytes, BytesRejection>| async move {
            run(&state, op, body_fields(body)?).await
        },
    )
}

/// `GET` running `op`, with `path_key` (if any) from the path.
pub(super) fn get_op(op: &'static str, path_key: Option<&'static str>) -> MethodRouter<Shared> {
    get(
        move |State(state): State<Shared>, path: Result<Path<String>, PathRejection>| async move {
            let mut fields = Map::new();
            if let Some(key) = path_key {
                add_path_param(&mut fields, key, path)?;
            }
            run(&state, op, fields).await
        },
    )
}

/// `GET` running `op` on a route without path parameters.
pub(super) fn get_plain(op: &'static str) -> MethodRouter<Shared> {
    get(move |State(state): State<Shared>| async move { run(&state, op, Map::new()).await })
}

/// `POST /api/v1/batch`: `{"commands":[{"op":..},..]}` or a bare array. Runs them in order
/// and answers `{"results":[{"ok":true,"result":..} | {"ok":false,"error":{..}}]}` with 200,
/// whatever each command did; a command that cannot be read fails alone.
pub(super) async fn batch(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(super::publish::body_error)?;
    let value: Value = serde_json::from_slice(&body).map_err(super::publish::json_error)?;
    let commands = match value {
        Value::Array(list) => list,
        Value::Object(mut map) => match (map.remove("commands"), map.is_empty()) {
            (Some(Value::Array(list)), true) => list,
            _ => return Err(invalid_request("expected {\"commands\":[...]} or an array")),
        },
        _ => return Err(invalid_request("expected {\"commands\":[...]} or an array")),
    };
    if commands.len() > BATCH_COMMANDS_MAX {
        return Err(invalid_request(format!(
            "at most {BATCH_COMMANDS_MAX} commands per batch"
        )));
    }
    let mut results = Vec::with_capacity(commands.len());
    for command in commands {
        let outcome = match command_from(command) {
            Ok(cmd) => cmd.execute(&state.server).await,
            Err(e) => Err(e),
        };
        results.push(outcome_json(outcome));
    }
    Ok(Json(json!({ "results": results })))
}

/// A batch entry or an event-stream command: an object with a string `op`.
pub(super) fn command_from(value: Value) -> Result<ApiCommand, ApiError> {
    let Value::Object(mut fields) = value else {
        return Err(invalid_request("a command is an object with an `op`"));
    };
    match fields.remove("op") {
        Some(Value::String(op)) => ApiCommand::parse(&op, fields),
        _ => Err(invalid_request("a command needs a string `op`")),
    }
}

/// `{"ok":true,"result":..}` or `{"ok":false,"error":{"code","message","status"}}`.
pub(super) fn outcome_json(outcome: Result<Value, ApiError>) -> Value {
    match outcome {
        Ok(result) => json!({"ok": true, "result": result}),
        Err(e) => {
            let mut body = e.body();
            body["error"]["status"] = json!(e.status.as_u16());
            body["ok"] = json!(false);
            body
        }
    }
}

async fn run(
    state: &Shared,
    op: &str,
    fields: Map<String, Value>,
) -> Result<Json<Value>, ApiError> {
    let cmd = ApiCommand::parse(op, fields)?;
    cmd.execute(&state.server).await.map(Json)
}

/// The body as a JSON object; an empty body is `{}`.
pub(super) fn body_fields(
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let body = body.map_err(super::publish::body_error)?;
    if body.trim_ascii().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice(&body).map_err(super::publish::json_error)? {
        Value::Object(map) => Ok(map),
        _ => Err(invalid_request("the body must be a JSON object")),
    }
}

fn add_path_param(
    fields: &mut Map<String, Value>,
    key: &'static str,
    path: Result<Path<String>, PathRejection>,
) -> Result<(), ApiError> {
    let Path(value) = path.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ApiErrorCode::InvalidRequest,
            format!("path: {}", e.body_text()),
        )
    })?;
    if fields
        .insert(key.to_owned(), Value::String(value))
        .is_some()
    {
        return Err(invalid_request(format!(
            "`{key}` comes from the path, not the body"
        )));
    }
    Ok(())
}
