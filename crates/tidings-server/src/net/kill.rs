//! A connection's kill switch (`tidings_core::kill`): the session queue that fires it on
//! overflow holds it, so it is the core's type.

pub use tidings_core::kill::Kill;
