//! `drover top`: a live terminal view of the supervisor, fed by one event
//! subscription and a status report once a second. Start at `app.rs`.

mod app;
mod feed;
mod model;
mod view;

pub use app::top;
