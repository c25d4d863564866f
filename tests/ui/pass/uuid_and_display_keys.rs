use std::fmt;

use idem_runtime::{DisplayKey, Error, idempotent};

#[derive(serde::Serialize)]
struct Charge {
    request_id: uuid::Uuid,
    amount: u64,
}

// The usual `Idempotency-Key`: a UUID, as it is.
#[idempotent(key = req.request_id)]
async fn charge(req: Charge) -> Result<u64, Error> {
    Ok(req.amount)
}

// An optional UUID, and a ULID scope.
#[idempotent(key = id, scope = tenant, optional)]
async fn refund(id: Option<uuid::Uuid>, tenant: ulid::Ulid) -> Result<u64, Error> {
    let _ = (id, tenant);
    Ok(0)
}

/// An id type idem does not know, with a stable `Display`.
#[derive(serde::Serialize)]
struct OrderId(u64);

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "order-{}", self.0)
    }
}

// Any `Display` type through the explicit wrapper; the body still owns `order`.
#[idempotent(key = DisplayKey(&order))]
async fn ship(order: OrderId) -> Result<u64, Error> {
    Ok(order.0)
}

// Borrowed fields and `Option`s of wrapped values work too.
#[idempotent(key = order.as_ref().map(DisplayKey), optional)]
async fn cancel(order: Option<OrderId>) -> Result<bool, Error> {
    Ok(order.is_some())
}

fn main() {
    let _ = (charge, refund, ship, cancel);
}
