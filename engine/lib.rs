//! eddy: a real-time analytics engine. Events in (JSON), Rhai queries with per-key state,
//! results out.
//!
//! The pieces, in the order an event meets them: [`event`] parses inputs into frames;
//! [`router`] picks each event's queries, keys, shards and watermarks; [`shard`] runs the
//! queries (compiled in the [`sandbox`], calling the [`builtins`]) for the keys it owns;
//! [`json`] encodes what they emit; [`models`] holds the ONNX models queries may call.
//! [`offline`] drives all of it over a file (`eddy run`), and [`casetest`] checks its output
//! against expected items (`eddy test`);
//! [`server`] runs it as a service (`eddy serve`).

pub mod builtins;
pub mod casetest;
pub mod compiled;
pub mod difftest;
pub mod durable;
pub mod event;
pub mod feed;
pub mod json;
pub mod key;
pub mod link;
pub mod models;
pub mod offline;
pub mod probe;
pub mod query;
pub mod router;
pub mod sandbox;
pub mod sched;
pub mod server;
pub mod shard;
pub mod std_fns;
pub mod synth;

pub use builtins::{Emitted, Topic};
pub use event::{Event, Frame, Parser};
pub use key::Key;
pub use query::{QueryDef, QueryError};
pub use sandbox::Limits;
pub use shard::{QueryId, Shard};
