//! One file per subcommand. Each exposes an `Args` struct (clap) and `run`.

pub mod bench;
pub mod config;
pub mod doctor;
pub mod publish;
pub mod serve;
pub mod subscribe;
pub mod token;
