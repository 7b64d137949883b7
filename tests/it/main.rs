//! The one integration-test binary. Each area is a module; helpers live in `util`.
//! Tests that need the model use the real llama.cpp with the SmolLM2 test model
//! (`models/fetch-test-model.sh`); a missing model fails with the fetch command.

// Tests may panic: a failed setup or check is a failed test.
#![allow(clippy::unwrap_used)]

mod cli;
mod engine;
mod telegram;
mod util;
