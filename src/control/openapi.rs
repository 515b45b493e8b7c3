//! `GET /api/v1/openapi.json`: the server API's OpenAPI 3.1 description.
//!
//! Owns: serving the hand-written document (`openapi.json` beside this file). A test checks that
//! every path it describes is routed, and that every `/api/v1/` route is described.

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

/// The document, as written.
pub(super) const DOCUMENT: &str = include_str!("openapi.json");

pub(super) async fn document() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_route_is_described_and_every_description_routed() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        let described: std::collections::BTreeSet<String> =
            doc["paths"].as_object().unwrap().keys().cloned().collect();
        // The router's source names every route once, as a string literal.
        let router = include_str!("mod.rs");
        let routed: std::collections::BTreeSet<String> = router
            .split('"')
            .filter(|s| s.starts_with("/api/v1/"))
            .map(str::to_owned)
            .collect();
        assert_eq!(described, routed);
    }
}
