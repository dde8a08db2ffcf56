//! The record model, at the bottom of the crate (it imports nothing else of it): records
//! and outputs as the WIT contract has them, the error classes of dead letters, dead
//! letters themselves, record ids, the JSON-lines encoding of records, and every `weir.*`
//! header name.

mod class;
mod dead_letter;
pub mod headers;
mod id;
pub mod json;
mod keyed;
pub mod wit;

pub use class::ErrorClass;
pub use dead_letter::{DeadLetter, DeadLetterLine, ErrorInfo, replay_count, set_replay_count};
pub use id::{IdSpec, record_id};
pub use keyed::KeyedWrite;
pub use wit::{Output, Record, SourceMeta, TransformError};
