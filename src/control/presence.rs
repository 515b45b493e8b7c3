//! `GET /api/v1/presence/{topic}` and `/api/v1/presence/{topic}/stats`: asked of the topic's
//! owner shard through the fabric, answered without scanning anything on the hot path.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use wse_shards::QueryError;

use super::{ApiError, Shared};

/// How long a shard may take to answer before the request fails with 504.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn members(
    State(state): State<Shared>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let members = answer(state.server.presence(&topic)).await?;
    let members: Vec<Value> = members
        .into_iter()
        .map(|m| {
            // The data was validated as JSON when the member joined.
            let data: Value = serde_json::from_str(&m.data).unwrap_or(Value::Null);
            json!({"user_id": m.user_id, "connections": m.connections, "data": data})
        })
        .collect();
    Ok(Json(json!({"topic": topic, "members": members})))
}

pub(super) async fn stats(
    State(state): State<Shared>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (users, connections) = answer(state.server.presence_stats(&topic)).await?;
    Ok(Json(
        json!({"topic": topic, "users": users, "connections": connections}),
    ))
}

async fn answer<T>(query: impl Future<Output = Result<T, QueryError>>) -> Result<T, ApiError> {
    match tokio::time::timeout(QUERY_TIMEOUT, query).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e @ QueryError::InvalidTopic(_))) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_TOPIC",
            e.to_string(),
        )),
        Ok(Err(e @ QueryError::PresenceDisabled)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "PRESENCE_DISABLED",
            format!("{e}: set presence.enabled"),
        )),
        Ok(Err(e @ QueryError::Overloaded)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "OVERLOADED",
            e.to_string(),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "TIMEOUT",
            "the owner shard did not answer in time",
        )),
    }
}
