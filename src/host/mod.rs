//! Host limits, decided once at start-up from what the host gives and handed down as
//! numbers: the open-file limit ([`nofile`]).

pub mod nofile;
