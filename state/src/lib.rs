//! Local mode's state contract: what `keyway-operator run --local DIR` keeps
//! under `DIR/.keyway/`, and how the operator, `keyway-operator status` and
//! the `keyway` CLI read it.
//!
//! - [`paths`]: where each file lives, and [`OperatorInfo`], how proxies find
//!   a running operator.
//! - [`records`]: the records (one per pool, lease, route; events; problems;
//!   the last published snapshot) and [`StateFile`], all of them in memory.
//! - [`store`]: the SQLite database (WAL mode) that holds them, written per
//!   change in one transaction, so a change costs what changed, not what
//!   exists, and a crash leaves the last committed state.
//! - [`rows`]: a lease as users see it (`status`, `keyway ssh`).
//!
//! This crate does no networking and knows nothing of Kubernetes or of how
//! the operator decides; it is the on-disk contract both sides share.

pub mod paths;
pub mod records;
pub mod rows;
pub mod store;

pub use paths::{OperatorInfo, Paths, STATE_DIR, ensure_state_dir, write_atomic};
pub use records::{
    EventRecord, LeaseRecord, PoolRecord, Problem, RouteRecord, SeenSpec, SnapshotRecord,
    StateFile, SubscriberRecord,
};
pub use rows::{LeaseRow, rows};
pub use store::{Changes, Store, read};
