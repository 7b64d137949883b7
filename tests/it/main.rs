//! The one integration-test binary. Each area is a module; helpers live in `util`.
//! Tests that need the model use the real llama.cpp with the SmolLM2 test model
//! (`models/fetch-test-model.sh`); a missing model fails with the fetch command.

// Tests may unwrap: a failed unwrap is a failed test. (`allow-unwrap-in-tests` in
// clippy.toml covers `#[test]` functions, not the helpers in `util/`.)
#![allow(clippy::unwrap_used)]

mod bot_api_down;
mod budgets;
mod chaos;
mod cli;
mod cloud_apis;
mod corpus;
mod dashboard;
mod data_dir_lock;
mod doctor;
mod drafts;
mod engine;
mod fair_use;
mod fleet;
mod history;
mod http;
mod inputs;
mod memory_limit;
mod open_files;
mod openai_compat;
mod park;
mod personas;
mod providers;
mod refusals;
mod restart;
mod secrets;
mod telegram;
mod tools;
mod util;
mod webhook;
