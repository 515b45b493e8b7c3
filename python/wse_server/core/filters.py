"""EventFilter: MongoDB-like matching of event dicts (as upstream's `wse_server.core.filters`).

Operators: $eq, $ne, $gt, $lt, $gte, $lte, $in, $nin, $regex, $exists, $contains,
$startswith, $endswith, and $and/$or lists; dot notation reaches nested fields
("payload.price"). Example::

    criteria = {"event_type": {"$in": ["OrderPlaced", "OrderFilled"]},
                "symbol": {"$regex": "^AAPL"}, "quantity": {"$gte": 100}}
    if EventFilter.matches(event, criteria):
        ...
"""

from typing import Any

from wse_server._utilities import rust_match_event


class EventFilter:
    """Event filtering with MongoDB-like criteria (`rust_match_event`)."""

    @staticmethod
    def matches(event: dict[str, Any], criteria: dict[str, Any]) -> bool:
        """Check if an event matches filter criteria."""
        return rust_match_event(event, criteria)
