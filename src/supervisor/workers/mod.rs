//! Workers: each instance's state machine (`instance`, pure), the restart
//! policy it applies (`super::policy`), and rolling restarts (`rollout`, pure).

pub mod instance;
pub mod rollout;
pub mod sockets;
