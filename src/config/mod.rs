//! The config: raw types (what the file says), the JSON schema generated
//! from them, layering of env and `--set` overrides, and the validated
//! model the runtime uses.

pub mod diagnostic;
pub mod env_file;
pub mod identity;
pub mod load;
pub mod model;
pub mod raw;
pub mod resolve;
pub mod schema;
pub mod sockets;
pub mod types;
pub mod warnings;

pub use diagnostic::{Diagnostic, Origin};
pub use load::{Loaded, Overrides, load};
pub use model::Config;
