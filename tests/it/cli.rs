//! Black-box tests of the `mistral-bot` binary.
