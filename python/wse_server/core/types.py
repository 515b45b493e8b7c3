"""WSE core types: event priority levels and delivery semantics (as upstream's `wse_server.core.types`)."""

from enum import Enum


class EventPriority(Enum):
    """Event priority levels (the levels of `RustPriorityMessageQueue`)."""

    CRITICAL = 10
    HIGH = 8
    NORMAL = 5
    LOW = 3
    BACKGROUND = 1


class DeliveryGuarantee(Enum):
    """Event delivery guarantees.

    WSE delivers at most once; recovery lets clients catch up on what they missed within the
    history's window, without a redelivery guarantee.
    """

    AT_MOST_ONCE = "at_most_once"
