//! The one integration-test binary. Each area is a module; helpers live in `util`.
//! Tests that need the model use the real llama.cpp with the SmolLM2 test model
//! (`models/fetch-test-model.sh`); a missing model fails with the fetch command.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is a test failure

mod cli;
mod engine;
mod util;
